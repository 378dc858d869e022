"""Seeded random-weight checkpoints in the official file format.

Used for the embedded tiny bundle (models/make_tiny.py) and for full-size benchmark bundles:
they have the real architecture and contract but no musical knowledge. Weights are scaled by
1/√fan_in so activations stay O(1) through every layer.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import torch

from .lac import LAC, CodecConfig
from .layers import _WeightNormed
from .vampnet import TransformerConfig, VampNetTransformer

FULL_CODEC = CodecConfig(encoder_dim=64, encoder_rates=(2, 4, 8, 12), decoder_dim=1536,
                         decoder_rates=(6, 4, 4, 2, 2, 2))
FULL_COARSE = TransformerConfig(n_heads=20, n_layers=20, n_codebooks=4, n_conditioning_codebooks=0,
                                embedding_dim=1280)
FULL_C2F = TransformerConfig(n_heads=20, n_layers=16, n_codebooks=14, n_conditioning_codebooks=4,
                             embedding_dim=1280)


def _randomise(module: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            owner = name.rsplit(".", 2)[-2]
            if name.endswith(("weight_g", "alpha")) or owner.startswith("norm"):
                continue  # set from weight_v below / Snake α and RMSNorm gains stay 1
            fan_in = math.prod(p.shape[1:]) if p.dim() > 1 else p.shape[0]
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(max(fan_in, 1)))
            if name.endswith("bias"):
                p.mul_(0.1)
        for m in module.modules():
            if isinstance(m, _WeightNormed):
                m.weight_g.copy_(m.weight_v.pow(2).sum(dim=tuple(range(1, m.weight_v.dim())), keepdim=True).sqrt())
            if hasattr(m, "lora_A"):
                m.lora_A.zero_()
                m.lora_B.zero_()


def _save(module: torch.nn.Module, kwargs: dict, path: Path, drop: tuple[str, ...] = ()) -> None:
    state = {k: v.clone() for k, v in module.state_dict().items() if not any(d in k for d in drop)}
    torch.save({"state_dict": state, "metadata": {"kwargs": kwargs}}, path)


def write_random_checkpoints(out_dir: str | Path, codec: CodecConfig, coarse: TransformerConfig,
                             c2f: TransformerConfig, seed: int = 0) -> dict[str, Path]:
    """Write codec.pth, coarse.pth, c2f.pth (official format) with seeded random weights."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    paths = {}
    lac = LAC(codec)
    _randomise(lac, gen)
    codec_kwargs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(codec).items() if k != "extra"}
    paths["codec"] = out_dir / "codec.pth"
    _save(lac, dict(codec_kwargs, quantizer_dropout=False), paths["codec"])
    for name, cfg in (("coarse", coarse), ("c2f", c2f)):
        model = VampNetTransformer(cfg)
        _randomise(model, gen)
        paths[name] = out_dir / f"{name}.pth"
        kwargs = dict(asdict(cfg), r_cond_dim=0, flash_attn=False, noise_mode="mask", dropout=0.1)
        _save(model, kwargs, paths[name], drop=("lora_A", "lora_B"))
    return paths
