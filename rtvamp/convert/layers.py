"""Shared torch building blocks whose parameter names match the official checkpoints.

Weight norm is stored the legacy way (`weight_g`, `weight_v`): the effective weight is
g · v / ‖v‖ with the norm over every dimension but 0 — for a ConvTranspose1d weight
(in, out, k) that is one norm per *input* channel. `fold_weight_norm` replaces the pair by a
plain `weight` before export, so the ONNX graphs hold the folded weights.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def weight_norm_weight(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """g · v / ‖v‖, the norm taken over all dims except 0 (torch's legacy `weight_norm(dim=0)`)."""
    norm = v.pow(2).sum(dim=tuple(range(1, v.dim())), keepdim=True).sqrt()
    return v * (g / norm)


class _WeightNormed(nn.Module):
    """Holds `weight_g`, `weight_v`, `bias` like the official modules; `fold()` makes `weight`."""

    def __init__(self, weight_shape: tuple[int, ...], bias_size: int) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(weight_shape))
        self.weight_g = nn.Parameter(torch.empty((weight_shape[0],) + (1,) * (len(weight_shape) - 1)))
        self.bias = nn.Parameter(torch.empty(bias_size))
        self.folded: torch.Tensor | None = None

    def weight(self) -> torch.Tensor:
        if self.folded is not None:
            return self.folded
        return weight_norm_weight(self.weight_g, self.weight_v)

    def fold(self) -> None:
        """Compute the effective weight once (export: constant weights, no norm in the graph)."""
        with torch.no_grad():
            self.folded = weight_norm_weight(self.weight_g, self.weight_v).detach().clone()


class WNConv1d(_WeightNormed):
    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, padding: int = 0) -> None:
        super().__init__((c_out, c_in, kernel_size), c_out)
        self.stride, self.dilation, self.padding = stride, dilation, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x, self.weight(), self.bias, self.stride, self.padding, self.dilation)


class WNConvTranspose1d(_WeightNormed):
    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int, padding: int) -> None:
        super().__init__((c_in, c_out, kernel_size), c_out)
        self.stride, self.padding = stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose1d(x, self.weight(), self.bias, self.stride, self.padding)


class Snake1d(nn.Module):
    """y = x + 1/(α + 1e-9) · sin(α·x)², α per channel (shape (1, C, 1))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (self.alpha + 1e-9).reciprocal() * torch.sin(self.alpha * x).pow(2)


def fold_weight_norm(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, _WeightNormed):
            m.fold()
