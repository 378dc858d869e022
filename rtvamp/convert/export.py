"""Export loaded torch models to an ONNX bundle (the runtime's contract, see rtvamp.bundle).

Graphs (dynamic batch and length, opset 18, torch.export/dynamo path):
- codec_encoder.onnx: audio float32 [B, 1, N] (N a multiple of hop) → codes int64 [B, n_cb, N/hop]
- codec_decoder.onnx: codes int64 [B, K, T], 1 ≤ K ≤ n_cb (a prefix of the codebooks; MASK ids
  are read as 0 like upstream's VampNet.decode) → audio float32 [B, 1, T·hop]
- coarse.onnx, c2f.onnx: codes int64 [B, C, T] (MASK = vocab_size) → logits float32 [B, Cp, T, V]
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

from ..bundle import MANIFEST, Manifest, sha256_of
from .checkpoint import load_codec, load_transformer
from .lac import LAC
from .layers import fold_weight_norm
from .vampnet import TransformerConfig, VampNetTransformer

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

    quantize_dynamic(str(fp32_path), str(int8_path), op_types_to_quantize=["MatMul"],
                     weight_type=QuantType.QInt8)


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
    """top-1 agreement of the int8 transformers with their fp32 export (int8 only)"""


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


def convert(sources: Sources, out_dir: str | Path, precision: str = "fp32", name: str = "",
            progress: Callable[[str], None] = lambda _msg: None) -> ConversionReport:
    """Official checkpoints → a bundle folder with manifest.json, checked against the torch modules."""
    if precision not in ("fp32", "int8"):
        raise ValueError(f"precision must be fp32 or int8, not {precision!r}")
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
    agreement = {}
    if precision == "int8":
        progress("quantising transformers to int8")
        for model, net in (("coarse", coarse), ("c2f", c2f)):
            fp32_copy = out_dir / f"{model}.fp32-reference.onnx"
            (out_dir / f"{model}.onnx").rename(fp32_copy)
            try:
                quantize_int8(fp32_copy, out_dir / f"{model}.onnx")
                agreement[model] = agreement_int8(fp32_copy, out_dir / f"{model}.onnx", net.cfg)
            finally:
                fp32_copy.unlink()
    files = {}
    for model in ("codec_encoder", "codec_decoder", "coarse", "c2f"):
        path = out_dir / f"{model}.onnx"
        files[model] = {"path": path.name, "sha256": sha256_of(path),
                        "precision": precision if model in ("coarse", "c2f") else "fp32"}
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
        name=name or out_dir.name)
    manifest.check(str(out_dir))
    (out_dir / MANIFEST).write_text(manifest.to_json())
    return ConversionReport(manifest, errors, agreement)


def agreement_int8(fp32_path: Path, int8_path: Path, cfg: TransformerConfig, frames: int = 64, trials: int = 4,
                   seed: int = 0) -> float:
    """Top-1 agreement of int8 vs fp32 logits on random codes (~half MASK ids where predicted)."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    a, b = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (fp32_path, int8_path))
    agree = []
    for _ in range(trials):
        codes = rng.integers(0, cfg.vocab_size, size=(1, cfg.n_codebooks, frames))
        predicted = codes[:, cfg.n_conditioning_codebooks:]
        predicted[rng.random(predicted.shape) < 0.5] = cfg.mask_id
        la, lb = (s.run(None, {"codes": codes})[0] for s in (a, b))
        agree.append(np.mean(la.argmax(-1) == lb.argmax(-1)))
    return float(np.mean(agree))
