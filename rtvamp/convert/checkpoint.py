"""Loading official VampNet / LAC checkpoints strictly, with clear errors.

An official checkpoint is a torch pickle `{"state_dict": ..., "metadata": {"kwargs": ...}}`
(audiotools `BaseModel.save`). It is read with `torch.load(weights_only=True)`: a file that
needs arbitrary code to unpickle is refused. Unlike upstream (`strict=False`), every missing or
unknown key is an error that names the key. The architecture comes from `metadata.kwargs` or,
when absent, from tensor shapes (vampnet.md §1.6, §2.6).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from .lac import LAC, CodecConfig
from .vampnet import LORA_TARGETS, TransformerConfig, VampNetTransformer


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, with a message for the user."""


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(state_dict, metadata kwargs or None) of an official checkpoint file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated / foreign files
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: not a loadable checkpoint (truncated, corrupt, or a pickle that needs code "
            f"to load, which is refused for safety): {first_line}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, found {type(obj).__name__}")
    if "state_dict" in obj:
        state, meta = obj["state_dict"], obj.get("metadata")
        kwargs = meta.get("kwargs") if isinstance(meta, dict) else None
    else:  # a bare state dict (LoRA-only files are saved this way)
        state, kwargs = obj, None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: 'state_dict' is not a mapping of names to tensors")
    return {k.removeprefix("_orig_mod."): v for k, v in state.items()}, kwargs


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path,
                 optional: set[str] = frozenset()) -> None:
    expected = module.state_dict()
    missing = sorted(k for k in expected if k not in state and k not in optional)
    unknown = sorted(k for k in state if k not in expected)
    if missing:
        raise CheckpointError(f"{path}: missing key {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unknown:
        raise CheckpointError(f"{path}: unknown key {unknown[0]!r}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(f"{path}: key {key!r} has shape {tuple(tensor.shape)}, "
                                  f"the architecture needs {tuple(expected[key].shape)}")
    module.load_state_dict(state, strict=False)


def codec_config_from(state: dict[str, torch.Tensor], kwargs: dict[str, Any] | None) -> CodecConfig:
    """LAC architecture from kwargs, or from tensor shapes when kwargs are absent."""
    if kwargs:
        names = ("encoder_dim", "encoder_rates", "decoder_dim", "decoder_rates", "n_codebooks",
                 "codebook_size", "codebook_dim", "sample_rate")
        args = {k: kwargs[k] for k in names if k in kwargs}
        for k in ("encoder_rates", "decoder_rates"):
            if k in args:
                args[k] = tuple(int(r) for r in args[k])
        return CodecConfig(**args)
    try:
        enc_rates = tuple(state[f"encoder.block.{i}.block.4.weight_v"].shape[-1] // 2 for i in range(1, 5))
        dec_rates = []
        while f"decoder.model.{len(dec_rates) + 1}.block.1.weight_v" in state:
            dec_rates.append(state[f"decoder.model.{len(dec_rates) + 1}.block.1.weight_v"].shape[-1] // 2)
        n_cb = sum(1 for k in state if re.fullmatch(r"quantizer\.quantizers\.\d+\.codebook\.weight", k))
        book = state["quantizer.quantizers.0.codebook.weight"]
        return CodecConfig(
            encoder_dim=state["encoder.block.0.weight_v"].shape[0], encoder_rates=enc_rates,
            decoder_dim=state["decoder.model.0.weight_v"].shape[0], decoder_rates=tuple(dec_rates),
            n_codebooks=n_cb, codebook_size=book.shape[0], codebook_dim=book.shape[1])
    except KeyError as exc:
        raise CheckpointError(f"codec checkpoint lacks {exc.args[0]!r}; is it a LAC codec?") from None


def transformer_config_from(state: dict[str, torch.Tensor], kwargs: dict[str, Any] | None,
                            vocab_size: int) -> TransformerConfig:
    """VampNet architecture from kwargs, or from tensor shapes when kwargs are absent."""
    if kwargs:
        names = ("n_heads", "n_layers", "n_codebooks", "n_conditioning_codebooks", "latent_dim",
                 "embedding_dim", "vocab_size")
        return TransformerConfig(**{k: int(kwargs[k]) for k in names if k in kwargs})
    try:
        n_codebooks, latent_dim = state["embedding.special.MASK"].shape
        n_predict = state["classifier.layers.0.bias"].shape[0] // vocab_size
        return TransformerConfig(
            n_heads=state["transformer.layers.0.self_attn.relative_attention_bias.weight"].shape[1],
            n_layers=sum(1 for k in state if re.fullmatch(r"transformer\.layers\.\d+\.norm_1\.weight", k)),
            n_codebooks=n_codebooks, n_conditioning_codebooks=n_codebooks - n_predict,
            latent_dim=latent_dim, embedding_dim=state["embedding.out_proj.weight"].shape[0],
            vocab_size=vocab_size)
    except KeyError as exc:
        raise CheckpointError(f"transformer checkpoint lacks {exc.args[0]!r}; is it a VampNet model?") from None


def load_codec(path: str | Path) -> LAC:
    path = Path(path)
    state, kwargs = read_checkpoint(path)
    model = LAC(codec_config_from(state, kwargs))
    _load_strict(model, state, path)
    return model.eval()


def _lora_keys(n_layers: int) -> set[str]:
    return {f"transformer.layers.{l}.{t}.lora_{ab}" for l in range(n_layers) for t in LORA_TARGETS for ab in "AB"}


def load_transformer(path: str | Path, codec: LAC, lora_path: str | Path | None = None) -> VampNetTransformer:
    """A VampNet transformer with LoRA merged (W + B·A/8) and the codec's codebooks attached.

    `lora_path`: a LoRA-only state dict (a fine-tune's `lora.pth`); its A/B replace the base
    file's before merging. Base checkpoints without LoRA keys are accepted (B = 0).
    """
    path = Path(path)
    state, kwargs = read_checkpoint(path)
    cfg = transformer_config_from(state, kwargs, codec.config.codebook_size)
    model = VampNetTransformer(cfg)
    lora = _lora_keys(cfg.n_layers)
    if lora_path is not None:
        lora_state, _ = read_checkpoint(lora_path)
        extra = sorted(set(lora_state) - lora)
        if extra:
            raise CheckpointError(f"{lora_path}: not a LoRA file of this model: unknown key {extra[0]!r}")
        state = {**state, **lora_state}
    _load_strict(model, state, path, optional=lora)
    if cfg.n_codebooks > codec.config.n_codebooks or cfg.latent_dim != codec.config.codebook_dim:
        raise CheckpointError(f"{path}: the transformer ({cfg.n_codebooks} codebooks of dim "
                              f"{cfg.latent_dim}) does not fit the codec")
    books = torch.stack([codec.quantizer.quantizers[i].codebook.weight.detach()
                         for i in range(cfg.n_codebooks)])
    model.embedding.attach_codec_codebooks(books)
    model.merge_lora()
    return model.eval()
