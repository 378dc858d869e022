"""The VampNet transformer (coarse and coarse-to-fine) as torch modules.

Parameter names equal the official `coarse.pth` / `c2f.pth` state dicts (vampnet.md §2). The
forward takes **token ids** (MASK id = vocab_size) and does the embedding lookup itself — codec
codebook rows plus the learned MASK rows — so the exported graph cannot be fed a wrong MASK
vector. It returns logits [B, C_predict, T, vocab] (codebook order), not upstream's interleaved
[B, vocab, T·C_predict].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .layers import WNConv1d

LORA_TARGETS = ("self_attn.w_qs", "self_attn.w_vs", "self_attn.fc", "feed_forward.w_1", "feed_forward.w_2")
"""Linear layers that are loralib.Linear(r=8, lora_alpha=1) upstream (vampnet.md §2.4)."""

LORA_SCALING = 1.0 / 8.0
"""loralib scaling lora_alpha / r = 1 / 8: the effective weight is W + B·A / 8."""

REL_BUCKETS = 32
REL_MAX_DISTANCE = 128
"""T5 relative position bias: 32 buckets (16 per direction), one bucket for ≥ 128 frames."""


@dataclass(frozen=True)
class TransformerConfig:
    """VampNet constructor arguments that shape inference (`metadata.kwargs`)."""

    n_heads: int = 20
    n_layers: int = 16
    n_codebooks: int = 4
    n_conditioning_codebooks: int = 0
    latent_dim: int = 8
    embedding_dim: int = 1280
    vocab_size: int = 1024

    @property
    def n_predict_codebooks(self) -> int:
        return self.n_codebooks - self.n_conditioning_codebooks

    @property
    def mask_id(self) -> int:
        return self.vocab_size


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class LoRALinear(nn.Module):
    """A bias-free Linear that may carry LoRA factors (`lora_A` (r, in), `lora_B` (out, r))."""

    def __init__(self, d_in: int, d_out: int, rank: int = 8) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in))
        self.lora_A = nn.Parameter(torch.zeros(rank, d_in))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank))

    def merge_lora(self) -> None:
        """W ← W + B·A / 8 (what loralib's `.eval()` does upstream), then drop the factors."""
        with torch.no_grad():
            self.weight += (self.lora_B @ self.lora_A) * LORA_SCALING
            self.lora_A.zero_()
            self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def relative_position_buckets(n_frames: int | torch.SymInt, device: torch.device) -> torch.Tensor:
    """Bucket index [T_query, T_key] of the bidirectional T5 bias (key − query distance)."""
    pos = torch.arange(n_frames, device=device)
    rel = pos[None, :] - pos[:, None]
    half = REL_BUCKETS // 2
    bucket = (rel > 0).long() * half
    n = rel.abs()
    max_exact = half // 2
    large = max_exact + (
        torch.log(n.float() / max_exact) / math.log(REL_MAX_DISTANCE / max_exact) * (half - max_exact)
    ).long()
    large = torch.clamp(large, max=half - 1)
    return bucket + torch.where(n < max_exact, n, large)


class MultiHeadRelativeAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, has_bias_table: bool) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.w_qs = LoRALinear(dim, dim)
        self.w_ks = nn.Linear(dim, dim, bias=False)
        self.w_vs = LoRALinear(dim, dim)
        self.fc = LoRALinear(dim, dim)
        if has_bias_table:
            self.relative_attention_bias = nn.Embedding(REL_BUCKETS, n_heads)

    def position_bias(self, n_frames: int | torch.SymInt, device: torch.device) -> torch.Tensor:
        """(1, heads, T, T) bias; only layer 0 owns the table and the stack shares the result."""
        buckets = relative_position_buckets(n_frames, device)
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.n_heads
        q = self.w_qs(x).view(b, t, h, d // h).transpose(1, 2)
        k = self.w_ks(x).view(b, t, h, d // h).transpose(1, 2)
        v = self.w_vs(x).view(b, t, h, d // h).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // h) + bias
        out = torch.softmax(scores, dim=-1) @ v
        return self.fc(out.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    """w_1 (d → 4d) → gated GELU (first half · GELU_tanh(second half)) → w_2 (2d → d)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w_1 = LoRALinear(dim, 4 * dim)
        self.w_2 = LoRALinear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.w_1(x).chunk(2, dim=-1)
        return self.w_2(a * F.gelu(gate, approximate="tanh"))


class TransformerLayer(nn.Module):
    def __init__(self, dim: int, n_heads: int, has_bias_table: bool) -> None:
        super().__init__()
        self.norm_1 = RMSNorm(dim)
        self.self_attn = MultiHeadRelativeAttention(dim, n_heads, has_bias_table)
        self.norm_3 = RMSNorm(dim)
        self.feed_forward = FeedForward(dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm_1(x), bias)
        return x + self.feed_forward(self.norm_3(x))


class TransformerStack(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(dim, n_heads, i == 0) for i in range(n_layers))
        self.norm = RMSNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.layers[0].self_attn.position_bias(x.shape[1], x.device)
        for layer in self.layers:
            x = layer(x, bias)
        return self.norm(x)


class _Special(nn.Module):
    def __init__(self, n_codebooks: int, latent_dim: int) -> None:
        super().__init__()
        self.MASK = nn.Parameter(torch.zeros(n_codebooks, latent_dim))


class CodebookEmbedding(nn.Module):
    """ids (B, C, T) → (B, T, dim): per-codebook lookup in [codec codebook rows; MASK row],
    concatenated over codebooks (8 channels each, codebook order), then a 1×1 projection."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.special = _Special(cfg.n_codebooks, cfg.latent_dim)
        self.out_proj = nn.Conv1d(cfg.latent_dim * cfg.n_codebooks, cfg.embedding_dim, 1)
        # (C·(vocab+1), latent) table filled from the codec by `attach_codec_codebooks`
        self.register_buffer(
            "codec_rows", torch.zeros(cfg.n_codebooks, cfg.vocab_size, cfg.latent_dim), persistent=False)
        self.vocab_size = cfg.vocab_size

    def attach_codec_codebooks(self, codebooks: torch.Tensor) -> None:
        """codebooks (C, vocab, latent): the codec's raw `quantizer.quantizers[i].codebook.weight`."""
        if codebooks.shape != self.codec_rows.shape:
            raise ValueError(f"codec codebooks {tuple(codebooks.shape)} do not fit the transformer "
                             f"embedding {tuple(self.codec_rows.shape)}")
        self.codec_rows.copy_(codebooks)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n_cb = self.special.MASK.shape[0]
        table = torch.cat([self.codec_rows, self.special.MASK[:, None, :]], dim=1)  # C, V+1, d
        offsets = torch.arange(n_cb, device=ids.device)[None, :, None] * (self.vocab_size + 1)
        vectors = F.embedding(ids + offsets, table.reshape(-1, table.shape[-1]))   # B, C, T, d
        b, c, t, d = vectors.shape
        x = vectors.permute(0, 2, 1, 3).reshape(b, t, c * d)
        return F.linear(x, self.out_proj.weight[:, :, 0], self.out_proj.bias)


class VampNetTransformer(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embedding = CodebookEmbedding(cfg)
        self.transformer = TransformerStack(cfg.embedding_dim, cfg.n_heads, cfg.n_layers)
        self.classifier = nn.Module()
        self.classifier.layers = nn.ModuleList(
            [WNConv1d(cfg.embedding_dim, cfg.vocab_size * cfg.n_predict_codebooks, 1)])

    def merge_lora(self) -> None:
        for m in self.modules():
            if isinstance(m, LoRALinear):
                m.merge_lora()

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, C, T) int64 with MASK = vocab_size → logits (B, C_predict, T, vocab) float32."""
        x = self.transformer(self.embedding(codes))                       # B, T, dim
        head = self.classifier.layers[0]
        out = F.linear(x, head.weight()[:, :, 0], head.bias)              # B, T, vocab·Cp
        b, t, _ = out.shape
        cp = self.cfg.n_predict_codebooks
        # output channel ch ↦ (vocab ch // Cp, codebook ch % Cp)
        return out.view(b, t, self.cfg.vocab_size, cp).permute(0, 3, 1, 2)
