"""Model layer parity: the converted bundle against outputs of the ORIGINAL VampNet/LAC code."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the converter needs the `convert` extra")

from rtvamp.bundle import BundleError, load_bundle  # noqa: E402
from rtvamp.codec import Codec  # noqa: E402
from rtvamp.convert.checkpoint import CheckpointError, load_codec, load_transformer  # noqa: E402
from rtvamp.convert.export import export_transformer  # noqa: E402
from rtvamp.sessions import make_session  # noqa: E402
from rtvamp.transformer import Transformer  # noqa: E402

from conftest import CHECKPOINTS, load_npz, upstream_logits_to_bundle_layout  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def codec(ref_bundle):
    return Codec(ref_bundle)


@pytest.mark.parametrize("n", [30720, 30821, 44100])
def test_codec_matches_original(codec, n):
    ref = load_npz(f"codec/len{n}.npz")
    np.testing.assert_array_equal(codec.encode(ref["audio_in"]), ref["codes"])
    assert np.abs(codec.decode(ref["codes"]) - ref["audio_out"]).max() <= TOL
    assert np.abs(codec.decode(ref["codes"][:, :4]) - ref["audio_out_4cb"]).max() <= TOL


@pytest.mark.parametrize("n", [30720, 30821, 44100])
def test_torch_codec_latents_match_original(n):
    ref = load_npz(f"codec/len{n}.npz")
    lac = load_codec(CHECKPOINTS / "codec.pth")
    audio = torch.from_numpy(ref["audio_in"])
    audio = torch.nn.functional.pad(audio, (0, (-audio.shape[-1]) % 768))
    with torch.no_grad():
        z, codes = lac.encode(audio)
        z_from_codes = lac.quantizer.from_codes(torch.from_numpy(ref["codes"]))
    np.testing.assert_array_equal(codes.numpy(), ref["codes"])
    assert np.abs(z.numpy() - ref["z"]).max() <= TOL
    assert np.abs(z_from_codes.numpy() - ref["from_codes_z"]).max() <= TOL


def test_vampnet_decode_reads_mask_ids_as_zero(codec):
    ref = load_npz("codec/vampnet_decode.npz")
    assert (ref["codes"] == 1024).any()
    assert np.abs(codec.decode(ref["codes"]) - ref["audio_out"]).max() <= TOL


@pytest.mark.parametrize("n", [1, 767, 768, 769, 5000, 30821])
def test_encoder_gives_ceil_frames_and_decoder_hop_samples(codec, n):
    audio = np.random.default_rng(n).uniform(-0.5, 0.5, size=(1, 1, n)).astype(np.float32)
    codes = codec.encode(audio)
    assert codes.shape == (1, 14, -(-n // 768))
    assert codes.dtype == np.int64 and codes.min() >= 0 and codes.max() < 1024
    for k in (1, 4, 14):
        assert codec.decode(codes[:, :k]).shape == (1, 1, codes.shape[-1] * 768)


@pytest.mark.parametrize("case", ["coarse_T1", "coarse_T7", "coarse_T130", "coarse_T260",
                                  "c2f_T1", "c2f_T7", "c2f_T130"])
def test_transformer_logits_match_original(ref_bundle, case):
    name = case.split("_")[0]
    ref = load_npz(f"transformer/{case}.npz")
    model = Transformer(ref_bundle, name, max_batch=2, max_frames=300)
    want = upstream_logits_to_bundle_layout(ref["logits"], model.n_predict)
    got = model.logits(ref["codes"])
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= TOL


@pytest.mark.parametrize("t", [7, 130])
def test_lora_file_is_merged(tmp_path, t):
    """coarse.pth + coarse_lora.pth (A/B replace the base's, then W + B·A/8) in the exported graph."""
    lac = load_codec(CHECKPOINTS / "codec.pth")
    lora = torch.load(CHECKPOINTS / "coarse_lora.pth", weights_only=True)
    assert all(v.abs().sum() > 0 for v in lora.values()), "fixture LoRA tensors must be non-zero"
    model = load_transformer(CHECKPOINTS / "coarse.pth", lac, CHECKPOINTS / "coarse_lora.pth")
    export_transformer(model, tmp_path / "coarse.onnx")
    ref = load_npz(f"transformer/coarse_plus_lora_file_T{t}.npz")
    got = make_session(tmp_path / "coarse.onnx").run(None, {"codes": ref["codes"]})[0]
    want = upstream_logits_to_bundle_layout(ref["logits"], 4)
    assert np.abs(got - want).max() <= TOL
    plain = load_npz(f"transformer/coarse_T{t}.npz")
    assert np.abs(upstream_logits_to_bundle_layout(plain["logits"], 4) - want).max() > 1e-2


def test_base_lora_factors_change_the_weights():
    lac = load_codec(CHECKPOINTS / "codec.pth")
    state = torch.load(CHECKPOINTS / "coarse.pth", weights_only=True)["state_dict"]
    model = load_transformer(CHECKPOINTS / "coarse.pth", lac)
    w = state["transformer.layers.1.feed_forward.w_2.weight"]
    b, a = state["transformer.layers.1.feed_forward.w_2.lora_B"], state["transformer.layers.1.feed_forward.w_2.lora_A"]
    assert (b @ a).abs().max() > 0
    torch.testing.assert_close(model.transformer.layers[1].feed_forward.w_2.weight, w + b @ a / 8)


def test_architecture_inferred_without_metadata():
    lac = load_codec(CHECKPOINTS / "codec.pth")
    ref = load_npz("transformer/coarse_T130.npz")
    model = load_transformer(CHECKPOINTS / "coarse_no_metadata.pth", lac)
    with torch.no_grad():
        got = model(torch.from_numpy(ref["codes"])).numpy()
    assert np.abs(got - upstream_logits_to_bundle_layout(ref["logits"], 4)).max() <= TOL


def test_torch_modules_and_onnx_agree(ref_bundle):
    lac = load_codec(CHECKPOINTS / "codec.pth")
    model = load_transformer(CHECKPOINTS / "c2f.pth", lac)
    codes = np.random.default_rng(3).integers(0, 1025, size=(2, 14, 50))
    codes[:, :4] = np.minimum(codes[:, :4], 1023)
    with torch.no_grad():
        want = model(torch.from_numpy(codes)).numpy()
    got = Transformer(ref_bundle, "c2f", 2, 50).logits(codes)
    assert np.abs(got - want).max() <= TOL


@pytest.mark.parametrize("t", [1, 7, 575, 1000])
def test_no_nan_or_inf_in_logits(ref_bundle, t):
    rng = np.random.default_rng(t)
    for name, n_cb in (("coarse", 4), ("c2f", 14)):
        codes = rng.integers(0, 1024, size=(1, n_cb, t))
        codes[:, 4 if name == "c2f" else 0:][rng.random((1, n_cb - (4 if name == "c2f" else 0), t)) < 0.6] = 1024
        logits = Transformer(ref_bundle, name, 1, t).logits(codes)
        assert np.isfinite(logits).all()


def _write_state(path, state, kwargs=None):
    torch.save({"state_dict": state, "metadata": {"kwargs": kwargs or {}}}, path)


def test_missing_and_unknown_keys_are_named(tmp_path):
    lac = load_codec(CHECKPOINTS / "codec.pth")
    ck = torch.load(CHECKPOINTS / "coarse.pth", weights_only=True)
    state = dict(ck["state_dict"])
    del state["transformer.layers.2.norm_3.weight"]
    _write_state(tmp_path / "missing.pth", state, ck["metadata"]["kwargs"])
    with pytest.raises(CheckpointError, match="missing key 'transformer.layers.2.norm_3.weight'"):
        load_transformer(tmp_path / "missing.pth", lac)
    state = dict(ck["state_dict"], **{"transformer.layers.0.bogus": torch.zeros(1)})
    _write_state(tmp_path / "unknown.pth", state, ck["metadata"]["kwargs"])
    with pytest.raises(CheckpointError, match="unknown key 'transformer.layers.0.bogus'"):
        load_transformer(tmp_path / "unknown.pth", lac)


def test_truncated_and_foreign_files_are_refused(tmp_path):
    data = (CHECKPOINTS / "codec.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        load_codec(tmp_path / "truncated.pth")
    (tmp_path / "evil.pth").write_bytes(pickle.dumps(shutil.copyfile))  # a pickle that references code
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        load_codec(tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_codec(tmp_path / "absent.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_codec(tmp_path / "list.pth")


@pytest.mark.parametrize("tampered, removed", [("coarse.onnx", "c2f.onnx"), ("coarse_int8.onnx", "c2f_int8.onnx")])
def test_tampered_or_incomplete_bundle_is_refused(ref_bundle_dir, tmp_path, tampered, removed):
    copy = tmp_path / "bundle"
    shutil.copytree(ref_bundle_dir, copy)
    load_bundle(copy)
    with open(copy / tampered, "r+b") as fh:
        fh.seek(200)
        fh.write(b"\x00\x01\x02")
    with pytest.raises(BundleError, match=f"{tampered} does not match its sha256"):
        load_bundle(copy)
    shutil.copy(ref_bundle_dir / tampered, copy / tampered)
    (copy / removed).unlink()
    with pytest.raises(BundleError, match=rf"{removed} \(.*\) is missing"):
        load_bundle(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(copy)
    with pytest.raises(BundleError, match="no such bundle"):
        load_bundle(tmp_path / "nowhere")


def test_manifest_declares_the_contract(ref_bundle):
    m = ref_bundle.manifest
    assert (m.sample_rate, m.hop_length, m.n_codebooks, m.vocab_size, m.mask_id) == (44100, 768, 14, 1024, 1024)
    assert (m.coarse_codebooks, m.c2f_conditioning_codebooks, m.c2f_codebooks) == (4, 4, 14)
    assert (m.coarse_chunk_frames, m.c2f_chunk_frames) == (575, 173)
    assert set(m.sources) == {"codec", "coarse", "c2f"}
    assert set(m.files) == {"codec_encoder", "codec_decoder", "coarse", "c2f", "coarse_int8", "c2f_int8"}
    assert {name: entry["precision"] for name, entry in m.files.items()} == {
        "codec_encoder": "fp32", "codec_decoder": "fp32", "coarse": "fp32", "c2f": "fp32",
        "coarse_int8": "int8", "c2f_int8": "int8"}
    assert "CC BY-NC-SA 4.0" in m.licence
