"""The LAC codec (VampNet's 44.1 kHz, hop-768 audio tokenizer) as torch modules.

Module and parameter names equal the official `codec.pth` state dict (vampnet.md §1), so a
checkpoint loads strictly. Only inference is modelled: encode (conv encoder + 14-stage residual
VQ with cosine nearest-code search) and decode (sum of the codebooks' `out_proj` terms → decoder).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from .layers import Snake1d, WNConv1d, WNConvTranspose1d


@dataclass(frozen=True)
class CodecConfig:
    """LAC constructor arguments (`metadata.kwargs` of codec.pth)."""

    encoder_dim: int = 64
    encoder_rates: tuple[int, ...] = (2, 4, 8, 8)
    decoder_dim: int = 1536
    decoder_rates: tuple[int, ...] = (8, 8, 4, 2)
    n_codebooks: int = 14
    codebook_size: int = 1024
    codebook_dim: int = 8
    sample_rate: int = 44100
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def hop_length(self) -> int:
        """Samples per token frame (product of the encoder strides)."""
        hop = 1
        for r in self.encoder_rates:
            hop *= r
        return hop

    @property
    def latent_dim(self) -> int:
        """Channels of the encoder output and of the decoder input."""
        return self.encoder_dim * 2 ** len(self.encoder_rates)


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, dilation: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            Snake1d(dim),
            WNConv1d(dim, dim, 7, dilation=dilation, padding=3 * dilation),
            Snake1d(dim),
            WNConv1d(dim, dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, stride: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            EncoderLayer(dim // 2, 1),
            EncoderLayer(dim // 2, 3),
            EncoderLayer(dim // 2, 9),
            Snake1d(dim // 2),
            WNConv1d(dim // 2, dim, 2 * stride, stride=stride, padding=stride // 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Encoder(nn.Module):
    def __init__(self, dim: int, rates: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = [WNConv1d(1, dim, 7, padding=3)]
        for stride in rates:
            dim *= 2
            layers.append(EncoderBlock(dim, stride))
        layers += [Snake1d(dim), WNConv1d(dim, dim, 3, padding=1)]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class ResidualLayer(nn.Module):
    def __init__(self, dim: int, kernel: int, dilation: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            Snake1d(dim),
            WNConv1d(dim, dim, kernel, dilation=dilation, padding=(kernel - 1) * dilation // 2),
            Snake1d(dim),
            WNConv1d(dim, dim, kernel, padding=(kernel - 1) // 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer(x)


class ResidualBlock(nn.Module):
    def __init__(self, dim: int, kernel: int, dilations: tuple[int, ...] = (1, 3, 5)) -> None:
        super().__init__()
        self.block = nn.Sequential(*(ResidualLayer(dim, kernel, d) for d in dilations))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class MRFBlock(nn.Module):
    """Multi-receptive-field block: mean of three residual stacks (kernels 3, 7, 11)."""

    def __init__(self, dim: int, kernels: tuple[int, ...] = (3, 7, 11)) -> None:
        super().__init__()
        self.mrf_blocks = nn.ModuleList(ResidualBlock(dim, k) for k in kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mrf_blocks[0](x)
        for block in self.mrf_blocks[1:]:
            out = out + block(x)
        return out / len(self.mrf_blocks)


class DecoderBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            Snake1d(c_in),
            WNConvTranspose1d(c_in, c_out, 2 * stride, stride=stride, padding=stride // 2),
            MRFBlock(c_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Decoder(nn.Module):
    def __init__(self, latent_dim: int, dim: int, rates: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = [WNConv1d(latent_dim, dim, 7, padding=3)]
        for i, stride in enumerate(rates):
            layers.append(DecoderBlock(dim // 2 ** i, dim // 2 ** (i + 1), stride))
        out_dim = dim // 2 ** len(rates)
        layers += [Snake1d(out_dim), WNConv1d(out_dim, 1, 7, padding=3), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class VectorQuantize(nn.Module):
    def __init__(self, input_dim: int, codebook_size: int, codebook_dim: int) -> None:
        super().__init__()
        self.in_proj = WNConv1d(input_dim, codebook_dim, 1)
        self.out_proj = WNConv1d(codebook_dim, input_dim, 1)
        self.codebook = nn.Embedding(codebook_size, codebook_dim)

    def nearest_codes(self, z_e: torch.Tensor) -> torch.Tensor:
        """Cosine nearest code of every frame of z_e (B, codebook_dim, T) → ids (B, T)."""
        enc = F.normalize(z_e.transpose(1, 2), dim=-1)                # B, T, d
        book = F.normalize(self.codebook.weight, dim=-1)              # K, d
        dist = (enc.pow(2).sum(-1, keepdim=True) - 2 * enc @ book.t()
                + book.pow(2).sum(-1)[None, None, :])
        return (-dist).argmax(dim=-1)

    def project(self, ids: torch.Tensor) -> torch.Tensor:
        """out_proj of the raw (un-normalised) codebook rows of ids (B, T) → (B, latent, T)."""
        return self.out_proj(self.codebook(ids).transpose(1, 2))


class ResidualVectorQuantize(nn.Module):
    def __init__(self, input_dim: int, n_codebooks: int, codebook_size: int, codebook_dim: int) -> None:
        super().__init__()
        self.quantizers = nn.ModuleList(
            VectorQuantize(input_dim, codebook_size, codebook_dim) for _ in range(n_codebooks))

    def encode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents (B, D, T) → (z_q sum (B, D, T), codes (B, n_codebooks, T) int64)."""
        residual = z
        z_q = torch.zeros_like(z)
        codes = []
        for q in self.quantizers:
            ids = q.nearest_codes(q.in_proj(residual))
            z_q_i = q.project(ids)
            residual = residual - z_q_i
            z_q = z_q + z_q_i
            codes.append(ids)
        return z_q, torch.stack(codes, dim=1)

    def from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Sum of out_proj(codebook rows) over the codebooks present in codes (B, K, T)."""
        z_q = self.quantizers[0].project(codes[:, 0])
        for i in range(1, codes.shape[1]):
            z_q = z_q + self.quantizers[i].project(codes[:, i])
        return z_q


class LAC(nn.Module):
    def __init__(self, config: CodecConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config.encoder_dim, config.encoder_rates)
        self.quantizer = ResidualVectorQuantize(
            config.latent_dim, config.n_codebooks, config.codebook_size, config.codebook_dim)
        self.decoder = Decoder(config.latent_dim, config.decoder_dim, config.decoder_rates)

    def encode(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """audio (B, 1, N samples, N a multiple of hop) → (z (B, D, T), codes (B, 14, T))."""
        return self.quantizer.encode(self.encoder(audio))

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """z_q (B, D, T) → audio (B, 1, T·hop samples)."""
        return self.decoder(z_q)
