"""Readable, vectorised NumPy reference of the masked sampler (`rtvamp.sampler`).

Same algorithm and same uniform-drawing order as `MaskedSampler.generate`: at every step, for
b = 0 … B−1, generator b draws 2·L float64 uniforms, u[0:L] for sampling and u[L:2L] for the
Gumbel noise of positions p = t·Cp + c. The softmax here is float64 while the kernels use a
vectorised float32 one, so p_sel agrees to about 3e-7 relative and the two make the same token
decisions unless a decision lies within that noise (the tests check both). Unlike the kernels it
processes every position (as upstream does) and allocates freely; it is meant for tests and
benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .kernels import GUMBEL_U_MIN
from .sampler import LogitsFn, SamplingParams


def schedule_ratio(step: int, steps: int) -> np.float32:
    """r = float32((step + 1) / steps)."""
    return np.float32((step + 1) / steps)


def schedule_count(step: int, steps: int, n0: int) -> int:
    """⌊γ(r)·N0⌋ with γ(r) = cos(r·π/2) ∈ [1e-10, 1], all in float32 (quirk Q6)."""
    half_angle = (schedule_ratio(step, steps) * np.float32(np.pi)) / np.float32(2.0)
    gamma = np.clip(np.float32(np.cos(np.float64(half_angle))), np.float32(1e-10), np.float32(1.0))
    return int(np.floor(gamma * np.float32(n0)))


def remask_count(step: int, steps: int, n0: int, n_masked: int, final: bool) -> int:
    """Positions masked again after a step: 0 when final, else clamp(⌊γ·N0⌋, 1, n_masked − 1)."""
    if final:
        return 0
    return max(1, min(n_masked - 1, schedule_count(step, steps, n0)))


def _seq_sum(a: np.ndarray) -> np.ndarray:
    """Sum over the last axis in sequential order (keepdims), as the kernels' loops add."""
    return np.cumsum(a, axis=-1)[..., -1:]


def _log_softmax64(x: np.ndarray) -> np.ndarray:
    """float64 log-softmax of float32 logits over the last axis."""
    m = x.max(axis=-1, keepdims=True).astype(np.float64)
    shifted = x.astype(np.float64) - m
    return shifted - np.log(_seq_sum(np.exp(shifted)))


def typical_filter(x: np.ndarray, mass: float, min_tokens: int) -> np.ndarray:
    """Working locally typical filter of logits [N, V]: keep the tokens closest to the entropy."""
    log_p = _log_softmax64(x)
    p = np.exp(log_p)
    entropy = -_seq_sum(np.where(np.isneginf(log_p), 0.0, log_p * p))
    d = np.abs(-log_p - entropy).astype(np.float32)
    order = np.argsort(d, axis=-1, kind="stable")
    cum = np.cumsum(np.take_along_axis(p.astype(np.float32), order, -1), -1, dtype=np.float64)
    last = np.minimum((cum.astype(np.float32) < np.float32(mass)).sum(-1), x.shape[-1] - 1)
    d_sorted = np.take_along_axis(d, order, -1)
    d_cut = np.take_along_axis(d_sorted, last[:, None], -1)
    remove_sorted = (d_sorted > d_cut) & (np.arange(x.shape[-1]) >= min_tokens)
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, -1)
    return np.where(remove, np.float32(-np.inf), x)


def top_k_filter(x: np.ndarray, k: int) -> np.ndarray:
    """Logits [N, V] below the k-th largest of their row become −inf."""
    if k >= x.shape[-1]:
        return x
    kth = np.sort(x, axis=-1)[:, x.shape[-1] - k, None]
    return np.where(x < kth, np.float32(-np.inf), x)


def top_p_filter(x: np.ndarray, top_p: float) -> np.ndarray:
    """Nucleus filter of logits [N, V] at temperature 1, keeping the first token crossing top_p."""
    m = x.max(axis=-1, keepdims=True).astype(np.float64)
    z = _seq_sum(np.exp(x.astype(np.float64) - m))
    s = np.sort(x, axis=-1)[:, ::-1]
    p = (np.exp(s.astype(np.float64) - m) / z).astype(np.float32)
    over = np.cumsum(p, -1, dtype=np.float64).astype(np.float32) > np.float32(top_p)
    cut = np.take_along_axis(s, over.argmax(-1)[:, None], -1)
    cut = np.where(over.any(-1, keepdims=True), cut, np.float32(-np.inf))
    return np.where(x < cut, np.float32(-np.inf), x)


def filter_logits(x: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Typical (when enabled), top-k, top-p on logits [N, V], in upstream order."""
    if params.typical_mass is not None:
        x = typical_filter(x, params.typical_mass, params.typical_min_tokens)
    if params.top_k is not None:
        x = top_k_filter(x, params.top_k)
    if params.top_p is not None and params.top_p < 1.0:
        x = top_p_filter(x, params.top_p)
    return x


def choose_tokens(x: np.ndarray, temperature: float, sample: bool,
                  u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, float32 p_sel) for logits [N, V]: inverse-CDF sample of u [N], or argmax."""
    scaled = x / np.float32(temperature) if temperature > 0 else x
    m = scaled.max(axis=-1, keepdims=True).astype(np.float64)
    w = np.exp(scaled.astype(np.float64) - m)
    cw = np.cumsum(w, axis=-1)
    z = cw[:, -1]
    if sample:
        over = cw > (u * z)[:, None]
        last_positive = x.shape[-1] - 1 - np.argmax(w[:, ::-1] > 0, axis=-1)
        tokens = np.where(over.any(-1), over.argmax(-1), last_positive)
    else:
        tokens = x.argmax(axis=-1)
    p_sel = (np.take_along_axis(w, tokens[:, None], -1)[:, 0] / z).astype(np.float32)
    return tokens, p_sel


def gumbel_from_uniforms(u: np.ndarray) -> np.ndarray:
    """float32 Gumbel noise −ln(−ln(max(u, 1e-20)))."""
    return (-np.log(-np.log(np.maximum(u, GUMBEL_U_MIN)))).astype(np.float32)


def generate_numpy(logits_fn: LogitsFn, codes: np.ndarray, mask: np.ndarray, params: SamplingParams,
                   noise: Sequence[np.ndarray] | None = None, seeds: Sequence[int] | None = None, *,
                   n_conditioning_codebooks: int = 0, mask_id: int = 1024) -> np.ndarray:
    """Reference of `MaskedSampler.generate` (without deadline): codes/mask [B, C, T] → int64 [B, C, T]."""
    n_batch, n_codebooks, n_frames = codes.shape
    ncc, steps = n_conditioning_codebooks, params.steps
    cp = n_codebooks - ncc
    n_positions = n_frames * cp
    z = codes.astype(np.int64, copy=True)
    generate = (mask != 0) | (z == mask_id)
    generate[:, :ncc] = False
    z[generate] = mask_id
    n0 = generate.sum(axis=(1, 2))
    if params.count_mask_over_batch:
        n0[:] = n0.sum()
    generators = [np.random.Generator(np.random.PCG64(None if seeds is None else seeds[b]))
                  for b in range(n_batch)]

    for i in range(steps):
        final = i == steps - 1
        logits = logits_fn(z.copy())
        vocab = logits.shape[-1]
        x = logits.transpose(0, 2, 1, 3).reshape(n_batch * n_positions, vocab)  # (b, t, c) rows
        current = z[:, ncc:].transpose(0, 2, 1).reshape(n_batch, n_positions)
        u = np.stack([g.random(2 * n_positions) for g in generators])
        gumbel = gumbel_from_uniforms(u[:, n_positions:]) if noise is None else noise[i]

        x = filter_logits(x, params)
        tokens, p_sel = choose_tokens(x, params.temperature, params.samples_at(i), u[:, :n_positions].ravel())
        with np.errstate(divide="ignore"):
            log_p = np.log(p_sel.astype(np.float64)).astype(np.float32)
        tau = np.float32(params.mask_temperature) * (np.float32(1.0) - schedule_ratio(i, steps))
        conf = log_p.reshape(n_batch, n_positions) + tau * gumbel.astype(np.float32)

        masked = current == mask_id
        conf = np.where(masked, conf, np.float32(np.inf))
        sampled = np.where(masked, tokens.reshape(n_batch, n_positions), current)
        n_keep = [remask_count(i, steps, int(n0[b]), int(masked[b].sum()), final) for b in range(n_batch)]
        ordered = np.concatenate([np.sort(conf, axis=-1), np.full((n_batch, 1), np.inf, np.float32)], -1)
        cut = ordered[np.arange(n_batch), np.minimum(n_keep, n_positions)]
        new = np.where(conf < cut[:, None], mask_id, sampled)
        z[:, ncc:] = new.reshape(n_batch, n_frames, cp).transpose(0, 2, 1)
    return z
