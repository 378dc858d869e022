"""Export loaded torch models to an ONNX bundle (the runtime's contract, see rtvamp.bundle).

Graphs (dynamic batch and length, opset 18, torch.export/dynamo path):
- codec_encoder.onnx: audio float32 [B, 1, N] (N a multiple of hop) → codes int64 [B, n_cb, N/hop]
- codec_decoder.onnx: codes int64 [B, K, T], 1 ≤ K ≤ n_cb (a prefix of the codebooks; MASK ids
  are read as 0 like upstream's VampNet.decode) → audio float32 [B, 1, T·hop]
- coarse.onnx, c2f.onnx (+ _int8 variants): codes int64 [B, C, T] (MASK = vocab_size) → logits [B, Cp, T, V]
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..bundle import AGREEMENT_MEASURES, MANIFEST, TRANSFORMERS, Manifest, int8_name, sha256_of
from .checkpoint import load_codec, load_transformer
from .lac import LAC
from .layers import fold_weight_norm
from .vampnet import VampNetTransformer

OPSET = 18
COARSE_CHUNK_SECONDS = 10.0
C2F_CHUNK_SECONDS = 3.0


class EncoderGraph(nn.Module):
    def __init__(self, codec: LAC) -> None:
        super().__init__()
        self.codec = codec

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return self.codec.encode(audio)[1]


class DecoderGraph(nn.Module):
    """Decodes any prefix of K codebooks without unrolling on K: every codebook's term is
    computed on zero-padded codes and the terms of codebooks ≥ K are weighted by 0."""

    def __init__(self, codec: LAC) -> None:
        super().__init__()
        self.codec = codec
        self.n_codebooks = codec.config.n_codebooks
        self.mask_id = codec.config.codebook_size

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        b, k, t = codes.shape
        codes = torch.where(codes >= self.mask_id, torch.zeros_like(codes), codes)
        padded = torch.cat([codes, codes.new_zeros(b, self.n_codebooks, t)], dim=1)
        present = (torch.arange(self.n_codebooks, device=codes.device) < k).to(torch.float32)
        z_q = None
        for i, q in enumerate(self.codec.quantizer.quantizers):
            term = q.project(padded[:, i]) * present[i]
            z_q = term if z_q is None else z_q + term
        return self.codec.decode(z_q)


def _export(module: nn.Module, example: torch.Tensor, input_name: str, output_name: str,
            dynamic: dict[int, object], path: Path) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch").setLevel(logging.ERROR)
        program = torch.onnx.export(
            module, (example,), dynamo=True, opset_version=OPSET,
            input_names=[input_name], output_names=[output_name],
            dynamic_shapes={"audio" if input_name == "audio" else "codes": dynamic},
            optimize=True, verbose=False, report=False)
    program.save(str(path), external_data=False)


def export_codec(codec: LAC, out_dir: Path) -> None:
    fold_weight_norm(codec)
    hop = codec.config.hop_length
    batch, frames = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("frames", min=1, max=100_000)
    audio = torch.zeros(2, 1, hop * 6)
    _export(EncoderGraph(codec).eval(), audio, "audio", "codes", {0: batch, 2: hop * frames},
            out_dir / "codec_encoder.onnx")
    codes = torch.zeros(2, codec.config.n_codebooks, 6, dtype=torch.int64)
    books = torch.export.Dim("codebooks", min=1, max=codec.config.n_codebooks)
    _export(DecoderGraph(codec).eval(), codes, "codes", "audio", {0: batch, 1: books, 2: frames},
            out_dir / "codec_decoder.onnx")


def export_transformer(model: VampNetTransformer, path: Path) -> None:
    fold_weight_norm(model)
    batch, frames = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("frames", min=1, max=4096)
    codes = torch.zeros(2, model.cfg.n_codebooks, 9, dtype=torch.int64)
    _export(model.eval(), codes, "codes", "logits", {0: batch, 2: frames}, path)


def quantize_int8(fp32_path: Path, int8_path: Path) -> None:
    """Dynamic int8 quantisation of a transformer's MatMuls (the codec stays fp32)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic advises pre-processing on the root logger
    try:
        quantize_dynamic(str(fp32_path), str(int8_path), op_types_to_quantize=["MatMul"],
                         weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)


@dataclass(frozen=True)
class Sources:
    """Official checkpoint files a bundle is converted from."""

    codec: Path
    coarse: Path
    c2f: Path
    lora_coarse: Path | None = None
    lora_c2f: Path | None = None


@dataclass(frozen=True)
class ConversionReport:
    manifest: Manifest
    max_abs_error: dict[str, float]
    """torch module vs exported graph on random inputs, per graph (fp32 graphs)"""
    int8_top1_agreement: dict[str, float]
    """per int8 variant (`coarse_int8`, `c2f_int8`): its top-1 agreement with the fp32 export, the
    lower of the recorded measures (the one that decides eligibility); empty without int8"""


def _parity(codec: LAC, coarse: VampNetTransformer, c2f: VampNetTransformer, out_dir: Path,
            seed: int = 0) -> dict[str, float]:
    """Max abs difference between the torch modules and the exported graphs on random inputs."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    hop = codec.config.hop_length
    audio = (0.3 * rng.standard_normal((1, 1, hop * 40))).astype(np.float32)
    codes = rng.integers(0, codec.config.codebook_size, size=(1, codec.config.n_codebooks, 40))
    checks = {"codec_encoder": (EncoderGraph(codec), audio), "codec_decoder": (DecoderGraph(codec), codes)}
    for name, model in (("coarse", coarse), ("c2f", c2f)):
        x = codes[:, :model.cfg.n_codebooks].copy()
        predicted = x[:, model.cfg.n_conditioning_codebooks:]
        predicted[rng.random(predicted.shape) < 0.5] = model.cfg.mask_id
        checks[name] = (model, x)
    errors = {}
    for name, (module, x) in checks.items():
        session = ort.InferenceSession(str(out_dir / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x})[0]
        with torch.no_grad():
            want = module(torch.from_numpy(x)).numpy()
        errors[name] = float(np.abs(got.astype(np.float64) - want).max())
    return errors


def convert(sources: Sources, out_dir: str | Path, int8: bool = True, name: str = "",
            progress: Callable[[str], None] = lambda _msg: None) -> ConversionReport:
    """Official checkpoints → a bundle folder with manifest.json, checked against the torch modules.

    The transformers are always written in fp32; `int8` (default) adds their dynamic-int8
    variants with measured agreement (`add_int8_variants`), which the runtime uses on the CPU
    when they are eligible."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    progress("loading checkpoints")
    codec = load_codec(sources.codec)
    coarse = load_transformer(sources.coarse, codec, sources.lora_coarse)
    c2f = load_transformer(sources.c2f, codec, sources.lora_c2f)
    if c2f.cfg.n_conditioning_codebooks != coarse.cfg.n_codebooks:
        raise ValueError(f"c2f conditions on {c2f.cfg.n_conditioning_codebooks} codebooks but the "
                         f"coarse model makes {coarse.cfg.n_codebooks}")
    progress("exporting coarse transformer")
    export_transformer(coarse, out_dir / "coarse.onnx")
    progress("exporting c2f transformer")
    export_transformer(c2f, out_dir / "c2f.onnx")
    progress("exporting codec")
    export_codec(codec, out_dir)
    progress("checking the exported graphs against the torch modules")
    errors = _parity(codec, coarse, c2f, out_dir)
    for stale in TRANSFORMERS:  # a previous conversion's int8 files in the same folder
        (out_dir / f"{int8_name(stale)}.onnx").unlink(missing_ok=True)
    files = {}
    for model in ("codec_encoder", "codec_decoder", "coarse", "c2f"):
        path = out_dir / f"{model}.onnx"
        files[model] = {"path": path.name, "sha256": sha256_of(path), "precision": "fp32"}
    cfg = codec.config
    hop, sr = cfg.hop_length, cfg.sample_rate
    manifest = Manifest(
        sample_rate=sr, hop_length=hop, n_codebooks=cfg.n_codebooks,
        coarse_codebooks=coarse.cfg.n_codebooks,
        coarse_conditioning_codebooks=coarse.cfg.n_conditioning_codebooks,
        c2f_codebooks=c2f.cfg.n_codebooks,
        c2f_conditioning_codebooks=c2f.cfg.n_conditioning_codebooks,
        vocab_size=coarse.cfg.vocab_size, mask_id=coarse.cfg.mask_id,
        coarse_chunk_frames=int(np.ceil(COARSE_CHUNK_SECONDS * sr / hop)),
        c2f_chunk_frames=int(np.ceil(C2F_CHUNK_SECONDS * sr / hop)),
        files=files,
        sources={role: sha256_of(Path(p)) for role, p in vars(sources).items() if p is not None},
        codec={"encoder_dim": cfg.encoder_dim, "encoder_rates": list(cfg.encoder_rates),
               "decoder_dim": cfg.decoder_dim, "decoder_rates": list(cfg.decoder_rates)},
        name=name or out_dir.name)
    manifest.check(str(out_dir))
    (out_dir / MANIFEST).write_text(manifest.to_json())
    agreement = {}
    if int8:
        progress("quantising transformers to int8, measuring agreement")
        measured = add_int8_variants(out_dir)
        manifest = Manifest.from_json((out_dir / MANIFEST).read_text(), str(out_dir))
        agreement = {int8_name(model): min(values.values()) for model, values in measured.items()}
    return ConversionReport(manifest, errors, agreement)


# -- int8 variants ---------------------------------------------------------------------------------

AUDIO_GROOVES = ((120.0, 0), (96.0, 1), (140.0, 2))
"""(bpm, seed) of the synthesized grooves (rtvamp.synth) whose codes measure int8 agreement"""


def add_int8_variants(bundle_dir: str | Path) -> dict[str, dict[str, float]]:
    """Quantise the fp32 transformers of a bundle folder to dynamic int8 (MatMuls only; the codec
    stays fp32), measure their top-1 agreement with fp32 and add them to its manifest as
    `coarse_int8` / `c2f_int8` (path, sha256, precision "int8", top1_agreement).

    Agreement is measured on random codes and on the codes of synthesized audio encoded by the
    bundle's own codec, both with ~half of the predicted positions MASK (`agreement_int8`).
    Returns {transformer: {measure: agreement}}. Deterministic: the same bundle gives the same
    files and numbers."""
    import dataclasses

    bundle_dir = Path(bundle_dir)
    manifest = Manifest.from_json((bundle_dir / MANIFEST).read_text(), str(bundle_dir))
    audio_codes = encoded_audio_codes(bundle_dir, manifest)
    files = dict(manifest.files)
    measured = {}
    for model in TRANSFORMERS:
        entry = files[model]
        if entry.get("precision", "fp32") != "fp32":
            raise ValueError(f"{bundle_dir}: {model} is {entry.get('precision')}, not fp32: convert it again")
        n_cb, n_cond = ((manifest.coarse_codebooks, manifest.coarse_conditioning_codebooks) if model == "coarse"
                        else (manifest.c2f_codebooks, manifest.c2f_conditioning_codebooks))
        frames = manifest.coarse_chunk_frames if model == "coarse" else manifest.c2f_chunk_frames
        fp32_path, int8_path = bundle_dir / entry["path"], bundle_dir / f"{int8_name(model)}.onnx"
        quantize_int8(fp32_path, int8_path)
        rng = np.random.default_rng(0)
        random_codes = [rng.integers(0, manifest.vocab_size, size=(1, n_cb, 64)) for _ in range(4)]
        real_codes = [c[None, :n_cb, :frames] for c in audio_codes]
        measured[model] = {
            "random_codes": agreement_int8(fp32_path, int8_path, _masked(random_codes, n_cond, manifest.mask_id, 1)),
            "encoded_audio": agreement_int8(fp32_path, int8_path, _masked(real_codes, n_cond, manifest.mask_id, 2))}
        assert tuple(measured[model]) == AGREEMENT_MEASURES
        files[int8_name(model)] = {"path": int8_path.name, "sha256": sha256_of(int8_path), "precision": "int8",
                                   "top1_agreement": {k: round(v, 6) for k, v in measured[model].items()}}
    updated = dataclasses.replace(manifest, files=files)
    updated.check(str(bundle_dir))
    (bundle_dir / MANIFEST).write_text(updated.to_json())
    return measured


def encoded_audio_codes(bundle_dir: Path, manifest: Manifest) -> list[np.ndarray]:
    """Codes int64 [n_codebooks, T] of the AUDIO_GROOVES (4 bars each, −24 LUFS like the vamp
    input), encoded by the bundle's own codec_encoder."""
    from ..audio import TARGET_LUFS, normalise
    from ..sessions import CPU, make_session
    from ..synth import groove

    encoder = make_session(bundle_dir / manifest.files["codec_encoder"]["path"], providers=[CPU])
    sr, hop = manifest.sample_rate, manifest.hop_length
    out = []
    for bpm, seed in AUDIO_GROOVES:
        audio = normalise(groove(bars=4, bpm=bpm, sample_rate=sr, seed=seed), sr, TARGET_LUFS)
        audio = np.pad(audio, (0, (-audio.size) % hop)).astype(np.float32)
        out.append(encoder.run(None, {"audio": audio[None, None]})[0][0])
    return out


def _masked(codes: list[np.ndarray], n_conditioning: int, mask_id: int, seed: int) -> list[np.ndarray]:
    """Copies of `codes` [1, C, T] with ~half the predicted positions (codebooks ≥ n_conditioning)
    set to MASK, the state of a VampNet sampling run half way (seeded)."""
    rng = np.random.default_rng(seed)
    out = []
    for c in codes:
        c = np.array(c, dtype=np.int64)
        predicted = c[:, n_conditioning:]
        predicted[rng.random(predicted.shape) < 0.5] = mask_id
        out.append(c)
    return out


def agreement_int8(fp32_path: Path, int8_path: Path, codes: list[np.ndarray]) -> float:
    """Top-1 agreement of int8 vs fp32 logits: the fraction of MASK positions (the tokens a vamp
    samples) where both graphs give the same argmax, over all `codes` [1, C, T] (MASK = the
    manifest's mask_id, i.e. the logits' vocabulary size). Runs as the runtime does (CPU)."""
    from ..sessions import CPU, make_session

    a, b = (make_session(p, providers=[CPU]) for p in (fp32_path, int8_path))
    same = total = 0
    for c in codes:
        la, lb = (s.run(None, {"codes": c})[0] for s in (a, b))
        n_predict, vocab = la.shape[1], la.shape[-1]
        masked = c[:, c.shape[1] - n_predict:] == vocab
        same += int(np.count_nonzero((la.argmax(-1) == lb.argmax(-1))[masked]))
        total += int(np.count_nonzero(masked))
    if total == 0:
        raise ValueError("no MASK positions to measure agreement on")
    return same / total
