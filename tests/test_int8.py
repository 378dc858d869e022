"""int8 transformer variants: written next to the fp32 ones with their measured top-1 agreement,
run under precision "auto" on the CPU only when eligible (≥ 99 % agreement), fp32 always
selectable, refused when tampered with, and a clear error when asked for but unusable."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

from rtvamp.bundle import (AGREEMENT_MEASURES, INT8_MIN_AGREEMENT, MANIFEST, TRANSFORMERS, BundleError, Manifest,
                           int8_name, load_bundle, sha256_of)
from rtvamp.sessions import default_providers, runs_on_cpu
from rtvamp.transformer import Transformer
from rtvamp.vamp import Vamper

from conftest import CHECKPOINTS, load_npz

FIXTURE_CASES = {"coarse": (1, 7, 130, 260), "c2f": (1, 7, 130)}
ON_CPU = runs_on_cpu(default_providers())


def fixture_codes(name: str) -> list[np.ndarray]:
    """The codes the reference fixtures feed to `name`: the transformer cases (~60 % MASK) and the
    end-to-end case (codes of real audio with its vamp mask applied)."""
    codes = [load_npz(f"transformer/{name}_T{t}.npz")["codes"] for t in FIXTURE_CASES[name]]
    e2e = load_npz("interface/end_to_end.npz")
    masked = np.where(e2e["mask"] == 1, 1024, e2e["codes"])
    if name == "coarse":
        codes.append(masked[:, :4])
    else:
        codes.append(np.concatenate([e2e["codes"][:, :4], masked[:, 4:]], axis=1))
    return codes


def masked_argmax_agreement(a: np.ndarray, b: np.ndarray, codes: np.ndarray) -> float:
    masked = codes[:, codes.shape[1] - a.shape[1]:] == 1024
    return float(np.mean((a.argmax(-1) == b.argmax(-1))[masked]))


def rewrite_manifest(folder, **changes) -> None:
    manifest = Manifest.from_json((folder / MANIFEST).read_text(), str(folder))
    (folder / MANIFEST).write_text(dataclasses.replace(manifest, **changes).to_json())


# -- what the converter writes ---------------------------------------------------------------------


def test_converter_writes_int8_variants_with_hashes_and_agreement(ref_bundle):
    onnx = pytest.importorskip("onnx")
    files = ref_bundle.manifest.files
    for name in TRANSFORMERS:
        fp32, int8 = files[name], files[int8_name(name)]
        assert (fp32["precision"], int8["precision"]) == ("fp32", "int8")
        assert int8["path"] == f"{name}_int8.onnx" != fp32["path"]
        assert sha256_of(ref_bundle.path(int8_name(name))) == int8["sha256"]
        assert set(int8["top1_agreement"]) == set(AGREEMENT_MEASURES)
        assert all(0.9 <= v <= 1.0 for v in int8["top1_agreement"].values()), int8["top1_agreement"]
        ops = [n.op_type for n in onnx.load(str(ref_bundle.path(int8_name(name)))).graph.node]
        fp32_ops = [n.op_type for n in onnx.load(str(ref_bundle.path(name))).graph.node]
        assert "MatMulInteger" in ops and ops.count("MatMul") < fp32_ops.count("MatMul")
    assert {n: e["precision"] for n, e in files.items() if n.startswith("codec")} == {
        "codec_encoder": "fp32", "codec_decoder": "fp32"}


def test_reference_models_do_not_reach_the_agreement_so_auto_keeps_fp32(ref_bundle):
    """On the reference fixtures' own codes (the transformer cases and the end-to-end case), int8
    agrees with fp32 on ~97.5 % (coarse) / ~98.5 % (c2f) of the sampled tokens: the random-weight
    reference models have flat logits (top-1 margins ~0.25 against int8 errors up to ~0.15). So
    their int8 variants are not eligible and "auto" runs them in fp32."""
    from rtvamp.convert.export import agreement_int8

    for name in TRANSFORMERS:
        agreement = agreement_int8(ref_bundle.path(name), ref_bundle.path(int8_name(name)), fixture_codes(name))
        assert 0.95 <= agreement < INT8_MIN_AGREEMENT, (name, agreement)
        eligible, why = ref_bundle.int8_eligibility(name)
        assert not eligible and f"below the {INT8_MIN_AGREEMENT:.0%} required" in why
        model = Transformer(ref_bundle, name, 1, 8)
        assert (model.precision, model.file) == ("fp32", name)
    assert Vamper(ref_bundle, max_batch=1).precision == "fp32"


def test_int8_asked_for_but_not_eligible_is_a_clear_error(ref_bundle):
    with pytest.raises(BundleError, match="int8 was asked for, but the int8 variant of coarse agrees with fp32 "
                                          r"on too few top-1 tokens: .*below the 99% required"):
        Transformer(ref_bundle, "coarse", 1, 8, precision="int8")
    with pytest.raises(BundleError, match="int8 was asked for"):
        Vamper(ref_bundle, max_batch=1, precision="int8")
    timed = Transformer(ref_bundle, "coarse", 1, 8, precision="int8", require_eligible=False)  # benchmarks
    assert (timed.precision, timed.file) == ("int8", "coarse_int8")
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, int8"):
        Transformer(ref_bundle, "coarse", 1, 8, precision="fp16")


# -- an eligible bundle ----------------------------------------------------------------------------

CONFIDENT_BIAS = 8.0


@pytest.fixture(scope="module")
def confident_bundle(ref_bundle_dir, tmp_path_factory):
    """The reference bundle with transformers that are sure of their top token, as trained models
    are: the reference checkpoints with a large random classifier bias (σ = 8, against a logit
    spread of ~1), exported by the converter; the int8 variants are quantised and measured by
    `add_int8_variants` exactly as in a conversion."""
    torch = pytest.importorskip("torch", reason="the converter needs the `convert` extra")
    from rtvamp.convert.checkpoint import load_codec, load_transformer
    from rtvamp.convert.export import add_int8_variants, export_transformer

    out = tmp_path_factory.mktemp("confident_bundle")
    source = load_bundle(ref_bundle_dir)
    files = {}
    for name in ("codec_encoder", "codec_decoder"):
        shutil.copy(source.path(name), out / f"{name}.onnx")
        files[name] = source.manifest.files[name]
    lac = load_codec(CHECKPOINTS / "codec.pth")
    for i, name in enumerate(TRANSFORMERS):
        model = load_transformer(CHECKPOINTS / f"{name}.pth", lac)
        with torch.no_grad():
            bias = model.classifier.layers[0].bias
            bias += CONFIDENT_BIAS * torch.from_numpy(np.random.default_rng(i).standard_normal(bias.shape,
                                                                                               dtype=np.float32))
        export_transformer(model, out / f"{name}.onnx")
        files[name] = {"path": f"{name}.onnx", "sha256": sha256_of(out / f"{name}.onnx"), "precision": "fp32"}
    (out / MANIFEST).write_text(dataclasses.replace(source.manifest, files=files, name="confident").to_json())
    measured = add_int8_variants(out)
    return load_bundle(out), measured


def test_auto_picks_int8_on_the_cpu_when_eligible_and_fp32_stays_selectable(confident_bundle):
    bundle, measured = confident_bundle
    for name in TRANSFORMERS:
        assert min(measured[name].values()) >= INT8_MIN_AGREEMENT, measured
        assert bundle.manifest.files[int8_name(name)]["top1_agreement"] == pytest.approx(measured[name], abs=1e-6)
        assert bundle.int8_eligibility(name) == (True, "")
        assert bundle.transformer_file(name, "auto", on_cpu=True) == (int8_name(name), "int8")
        assert bundle.transformer_file(name, "auto", on_cpu=False) == (name, "fp32")  # e.g. CUDA
        assert bundle.transformer_file(name, "fp32", on_cpu=True) == (name, "fp32")
        assert bundle.transformer_file(name, "int8", on_cpu=False) == (int8_name(name), "int8")

        fp32 = Transformer(bundle, name, 2, 300, precision="fp32")
        int8 = Transformer(bundle, name, 2, 300, precision="int8")
        auto = Transformer(bundle, name, 2, 300)
        assert (fp32.precision, fp32.file, int8.precision, int8.file) == ("fp32", name, "int8", int8_name(name))
        assert auto.precision == ("int8" if ON_CPU else "fp32")
        for codes in fixture_codes(name):
            want_fp32, want_int8 = fp32.logits(codes).copy(), int8.logits(codes).copy()
            np.testing.assert_array_equal(auto.logits(codes), want_int8 if ON_CPU else want_fp32)
            assert not np.array_equal(want_fp32, want_int8)  # really two graphs
            if (codes[:, codes.shape[1] - fp32.n_predict:] == 1024).any():
                assert masked_argmax_agreement(want_fp32, want_int8, codes) >= 0.98
    assert Vamper(bundle, max_batch=1).precision == ("int8" if ON_CPU else "fp32")
    assert Vamper(bundle, max_batch=1, precision="fp32").precision == "fp32"


# -- refused and older bundles ---------------------------------------------------------------------


def test_bundle_without_int8_entries_is_fp32_only(ref_bundle_dir, tmp_path):
    """What an earlier converter wrote (format 1, no int8 entries) still loads and runs fp32."""
    from rtvamp.cli import main

    old = tmp_path / "old"
    shutil.copytree(ref_bundle_dir, old)
    manifest = load_bundle(old).manifest
    for name in TRANSFORMERS:
        (old / f"{name}_int8.onnx").unlink()
    rewrite_manifest(old, files={n: e for n, e in manifest.files.items() if not n.endswith("_int8")})
    bundle = load_bundle(old)
    for name in TRANSFORMERS:
        assert Transformer(bundle, name, 1, 8).precision == "fp32"
        assert Transformer(bundle, name, 1, 8, precision="fp32").file == name
        with pytest.raises(BundleError, match=f"int8 was asked for, but the bundle has no int8 variant of {name}"):
            Transformer(bundle, name, 1, 8, precision="int8")
    assert main(["models", "verify", str(old)]) == 0
    assert main(["models", "verify", str(old), "--precision", "int8"]) == 2


def test_bundle_converted_int8_only_by_an_older_rtvamp(ref_bundle_dir, tmp_path):
    """An older `--precision int8` replaced the fp32 transformers: it runs int8, fp32 is refused."""
    legacy = tmp_path / "legacy"
    shutil.copytree(ref_bundle_dir, legacy)
    files = dict(load_bundle(legacy).manifest.files)
    for name in TRANSFORMERS:
        (legacy / f"{name}_int8.onnx").replace(legacy / f"{name}.onnx")
        files[name] = {"path": f"{name}.onnx", "sha256": files.pop(int8_name(name))["sha256"], "precision": "int8"}
    rewrite_manifest(legacy, files=files)
    bundle = load_bundle(legacy)
    for name in TRANSFORMERS:
        assert (Transformer(bundle, name, 1, 8).precision, Transformer(bundle, name, 1, 8, precision="int8").file) \
            == ("int8", name)
        with pytest.raises(BundleError, match=f"fp32 was asked for, but this bundle's {name} is int8 only"):
            Transformer(bundle, name, 1, 8, precision="fp32")


# -- the embedded tiny bundle and the worker -------------------------------------------------------


def test_tiny_bundle_has_int8_variants_and_runs_fp32_under_auto():
    """The tiny random model's int8 agrees on ~92–96 %: recorded, verified, not eligible."""
    bundle = load_bundle()  # verifies every hash, the int8 files' included
    for name in TRANSFORMERS:
        agreement = bundle.manifest.files[int8_name(name)]["top1_agreement"]
        assert min(agreement.values()) < INT8_MIN_AGREEMENT
        assert not bundle.int8_eligibility(name)[0]
        assert Transformer(bundle, name, 1, 8).precision == "fp32"
    assert Vamper(max_batch=1).precision == "fp32"


def test_worker_reports_its_precision_and_refuses_an_unusable_one():
    from rtvamp.engine.backend import LocalWorker, WorkerError

    with LocalWorker(max_batch=1, precision="fp32", start_timeout_s=180) as worker:
        assert worker.info.precision == "fp32"
    unusable = LocalWorker(max_batch=1, precision="int8", start_timeout_s=180)  # tiny: int8 not eligible
    try:
        with pytest.raises(WorkerError, match="exited with code 2"):
            unusable.start()
    finally:
        unusable.close()
