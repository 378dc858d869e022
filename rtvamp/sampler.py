"""Iterative masked sampler: upstream `VampNet.generate` (docs/vampnet.md §3.1) on numba kernels.

Per step i of S (r = float32((i + 1)/S)):
1. logits = logits_fn(codes) for the current masked codes (MASK id where not yet generated);
2. at every masked position (t, c): filters on the raw logits (optional working typical filter,
   top-k, top-p — in that order), probs = softmax(logits / temperature), token = inverse-CDF
   sample (when i/S ≤ sample_cutoff) or argmax (greedy), p_sel = probs[token];
3. confidence = ln(p_sel) + mask_temperature·(1 − r)·g with Gumbel noise g; fixed positions
   (prompt or already committed) have confidence +inf and keep their token;
4. n = ⌊γ(r)·N0⌋ in float32 (γ = cos(r·π/2) clamped to [1e-10, 1]), clamped to
   [1, masked − 1] before the last step and 0 on the last; the n least confident positions are
   masked again, the others take their sampled token.

Randomness: batch item b owns `np.random.Generator(np.random.PCG64(seeds[b]))`. Uniform-drawing
order, identical in `rtvamp.sampler_numpy`: at every step, for b = 0 … B−1, item b draws 2·L
float64 uniforms in [0, 1) (L = T·Cp positions) with one `random` call: u[0:L] are the sampling
uniforms of positions p = t·Cp + c, u[L:2L] the Gumbel uniforms of the same positions,
g = −ln(−ln(max(u, 1e-20))) (upstream `uniform_(1e-20, 1)`). All 2·L are drawn at every step,
whether the step samples or is greedy and whether Gumbel noise is replayed.

N0 (the initial number of masked positions) is counted per batch item by default; with
`count_mask_over_batch=True` it is the count over the whole batch, as upstream does (quirk Q2:
with B identical masks every item then commits a single token per step while γ(r) ≥ 1/B).
Upstream's typical filter is a no-op (quirk Q1); `typical_mass` enables a working one.

Deviations from upstream, all outside what the official pipeline exercises: a mask value in a
conditioning codebook is ignored (the codebook is always kept); equal logits at the top-p or
typical cut-off are all kept (torch's order among ties is unspecified).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from . import kernels

LogitsFn = Callable[[np.ndarray], np.ndarray]
"""codes int64 [B, C, T] (MASK id where masked) → logits float32 [B, Cp, T, V]."""


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}, got {value!r}")


def _check_finite(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of one `generate` call (upstream main defaults).

    steps: forward passes (≥ 1). temperature: token temperature (≤ 0 → plain softmax).
    mask_temperature: scale of the Gumbel confidence noise at r = 0 (≥ 0), annealed as (1 − r).
    top_p: nucleus mass in (0, 1] on the raw logits, None = off. top_k: keep the k largest
    logits, None = off. typical_mass: mass in (0, 1] of a working typical filter, None = off (as
    upstream, where it is a no-op); typical_min_tokens: tokens it always keeps (≥ 1).
    sample_cutoff: step i samples while i/steps ≤ sample_cutoff, later steps take the argmax
    (−1 = always argmax, as in the reference fixtures). count_mask_over_batch: N0 summed over the
    batch (upstream quirk Q2) instead of per candidate (default).
    """

    steps: int = 12
    temperature: float = 1.0
    mask_temperature: float = 10.5
    top_p: float | None = None
    top_k: int | None = None
    typical_mass: float | None = None
    typical_min_tokens: int = 1
    sample_cutoff: float = 1.0
    count_mask_over_batch: bool = False

    def __post_init__(self) -> None:
        _check_int("steps", self.steps, 1)
        _check_int("typical_min_tokens", self.typical_min_tokens, 1)
        if self.top_k is not None:
            _check_int("top_k", self.top_k, 1)
        for name in ("temperature", "mask_temperature", "sample_cutoff"):
            _check_finite(name, getattr(self, name))
        if self.mask_temperature < 0:
            raise ValueError(f"mask_temperature must be ≥ 0, got {self.mask_temperature!r}")
        for name in ("top_p", "typical_mass"):
            value = getattr(self, name)
            if value is not None:
                _check_finite(name, value)
                if not 0 < value <= 1:
                    raise ValueError(f"{name} must be in (0, 1] or None, got {value!r}")
        if not isinstance(self.count_mask_over_batch, bool):
            raise ValueError(f"count_mask_over_batch must be a bool, got {self.count_mask_over_batch!r}")
        # Plain int/float fields, so that the kernels compile one specialisation.
        for name in ("steps", "typical_min_tokens", "top_k"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, int(getattr(self, name)))
        for name in ("temperature", "mask_temperature", "sample_cutoff", "top_p", "typical_mass"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float(getattr(self, name)))

    def samples_at(self, step: int) -> bool:
        """True if step `step` (0-based) samples, False if it takes the argmax."""
        return step / self.steps <= self.sample_cutoff


def upstream_params(kwargs: Mapping[str, object], count_mask_over_batch: bool = True) -> SamplingParams:
    """SamplingParams for upstream `generate` kwargs (as in the fixtures' cases.json).

    Reads `_sampling_steps`/`sampling_steps`, `temperature`/`sampling_temperature`,
    `mask_temperature`, `top_p` (0 or None = off), `sample_cutoff`; typical filtering is ignored
    (upstream no-op, Q1). count_mask_over_batch=True is upstream's batch-summed N0 (Q2).
    """
    steps = kwargs.get("_sampling_steps", kwargs.get("sampling_steps", 12))
    temperature = kwargs.get("temperature", kwargs.get("sampling_temperature", 1.0))
    top_p = kwargs.get("top_p")
    return SamplingParams(
        steps=int(steps), temperature=float(temperature),
        mask_temperature=float(kwargs.get("mask_temperature", 10.5)),
        top_p=float(top_p) if top_p else None,
        sample_cutoff=float(kwargs.get("sample_cutoff", 1.0)),
        count_mask_over_batch=count_mask_over_batch)


def replay_noise(arrays: Mapping[str, np.ndarray], prefix: str = "noise_") -> list[np.ndarray]:
    """The recorded Gumbel noise of a fixture (`noise_000`, `noise_001`, …) in step order.

    Use as `generate(..., noise=replay_noise(np.load(path)))`; each array is float32 [B, T·Cp].
    """
    names = sorted(name for name in arrays if name.startswith(prefix))
    return [np.ascontiguousarray(arrays[name], dtype=np.float32) for name in names]


class MaskedSampler:
    """Upstream `VampNet.generate` on numba kernels with every buffer allocated once.

    After the first call for a given input dtype (numba compilation, or loading numba's cache —
    see `warmup`), a `generate` call allocates no NumPy buffers: per call only the generators and
    a few views, per step only transient Python objects (numba's argument dispatch, shape tuples;
    about 3 KB, freed at once).
    """

    def __init__(self, n_codebooks: int, n_conditioning_codebooks: int, vocab_size: int, mask_id: int,
                 max_batch: int, max_frames: int) -> None:
        """Buffers for up to `max_batch` candidates × `max_frames` frames (tokens)."""
        _check_int("n_codebooks", n_codebooks, 1)
        _check_int("n_conditioning_codebooks", n_conditioning_codebooks, 0)
        if n_conditioning_codebooks >= n_codebooks:
            raise ValueError(f"n_conditioning_codebooks ({n_conditioning_codebooks}) must be < "
                             f"n_codebooks ({n_codebooks})")
        _check_int("vocab_size", vocab_size, 1)
        _check_int("mask_id", mask_id, vocab_size)
        _check_int("max_batch", max_batch, 1)
        _check_int("max_frames", max_frames, 1)
        self.n_codebooks, self.n_conditioning_codebooks = n_codebooks, n_conditioning_codebooks
        self.n_predict = n_codebooks - n_conditioning_codebooks
        self.vocab_size, self.mask_id = vocab_size, mask_id
        self.max_batch, self.max_frames = max_batch, max_frames
        positions = max_batch * self.n_predict * max_frames
        self._codes = np.zeros(max_batch * n_codebooks * max_frames, dtype=np.int64)
        self._n0 = np.zeros(max_batch, dtype=np.int64)
        self._uniforms = np.zeros(2 * positions, dtype=np.float64)
        self._gumbel = np.zeros(positions, dtype=np.float32)
        self._sampled = np.zeros(positions, dtype=np.int64)
        self._conf = np.zeros(positions, dtype=np.float32)
        self._sort = np.zeros(self.n_predict * max_frames, dtype=np.float32)
        self._row = np.zeros(vocab_size, dtype=np.float32)
        self._weights = np.zeros(vocab_size, dtype=np.float32)
        self._block_sums = np.zeros(-(-vocab_size // kernels.BLOCK), dtype=np.float32)
        self._scratch = np.zeros(vocab_size, dtype=np.float32)
        self._d = np.zeros(vocab_size, dtype=np.float32)
        self._keys = np.zeros(vocab_size, dtype=np.int64)

    @staticmethod
    def steps_that_fit(budget_s: float, step_seconds: float, max_steps: int) -> int:
        """Steps (forward passes) of `step_seconds` each that fit in `budget_s` seconds, ≤ max_steps.

        0 means not even one step fits (the caller should keep what is playing).
        """
        _check_finite("budget_s", budget_s)
        _check_finite("step_seconds", step_seconds)
        if step_seconds <= 0:
            raise ValueError(f"step_seconds must be > 0, got {step_seconds!r}")
        _check_int("max_steps", max_steps, 1)
        return int(min(max_steps, max(0, math.floor(budget_s / step_seconds))))

    def warmup(self, params: SamplingParams | None = None) -> None:
        """Compile (or load from numba's cache) the kernels with a one-frame dummy model."""
        params = params or SamplingParams(steps=2)
        logits = np.zeros((1, self.n_predict, 1, self.vocab_size), dtype=np.float32)
        codes = np.zeros((1, self.n_codebooks, 1), dtype=np.int64)
        self.generate(lambda _: logits, codes, np.ones_like(codes), params, seeds=[0])

    def _check_inputs(self, codes: np.ndarray, mask: np.ndarray) -> tuple[int, int]:
        if not isinstance(codes, np.ndarray) or codes.ndim != 3 or codes.dtype.kind not in "iu":
            raise ValueError("codes must be an integer array [B, C, T]")
        if not isinstance(mask, np.ndarray) or mask.shape != codes.shape or mask.dtype.kind not in "biu":
            raise ValueError(f"mask must be a bool or integer array of the codes' shape {codes.shape}")
        n_batch, n_codebooks, n_frames = codes.shape
        if n_codebooks != self.n_codebooks:
            raise ValueError(f"codes have {n_codebooks} codebooks, the sampler {self.n_codebooks}")
        if not 1 <= n_batch <= self.max_batch:
            raise ValueError(f"batch {n_batch} outside 1…{self.max_batch}")
        if not 1 <= n_frames <= self.max_frames:
            raise ValueError(f"{n_frames} frames outside 1…{self.max_frames}")
        return n_batch, n_frames

    def _noise_arrays(self, noise: Sequence[np.ndarray], steps: int, n_batch: int,
                      n_positions: int) -> list[np.ndarray]:
        if len(noise) < steps:
            raise ValueError(f"noise has {len(noise)} arrays for {steps} steps")
        arrays = [np.ascontiguousarray(g, dtype=np.float32) for g in noise[:steps]]
        for g in arrays:
            if g.shape != (n_batch, n_positions):
                raise ValueError(f"noise arrays must be [B, T·Cp] = {(n_batch, n_positions)}, got {g.shape}")
        return arrays

    def _generators(self, seeds: Sequence[int] | None, n_batch: int) -> list[np.random.Generator]:
        if seeds is None:
            return [np.random.Generator(np.random.PCG64()) for _ in range(n_batch)]
        if len(seeds) != n_batch:
            raise ValueError(f"{len(seeds)} seeds for a batch of {n_batch}")
        return [np.random.Generator(np.random.PCG64(seed)) for seed in seeds]

    def _check_logits(self, logits: np.ndarray, shape: tuple[int, int, int, int]) -> None:
        if not isinstance(logits, np.ndarray) or logits.dtype != np.float32 or logits.shape != shape:
            raise ValueError(f"logits_fn must return float32 {shape}, got "
                             f"{getattr(logits, 'dtype', type(logits))} {getattr(logits, 'shape', '')}")

    def generate(self, logits_fn: LogitsFn, codes: np.ndarray, mask: np.ndarray, params: SamplingParams,
                 noise: Sequence[np.ndarray] | None = None, seeds: Sequence[int] | None = None,
                 finish_by: float | None = None, step_seconds: float | None = None,
                 on_step: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Generate the masked tokens of codes int [B, C, T] (C codebooks, T frames).

        mask [B, C, T] (bool or int): non-zero = generate; conditioning codebooks are always kept.
        noise: optional replay of upstream's Gumbel noise, one float32 [B, T·Cp] array per step
        ((t, c) order), used instead of drawn noise. seeds: one int per batch item (None = fresh
        entropy). finish_by: a `time.perf_counter()` deadline (seconds): a step after which the
        next one would end past it becomes the final step (everything still masked is
        committed); the cost of a step is `step_seconds` (measured earlier, seconds) for the
        first step and the measured cost of the previous step after that (without step_seconds
        the first step always runs). on_step(i, steps) is called after step i.

        Returns int64 [B, C, T] without MASK ids: a view of an internal buffer, valid until the
        next call (copy it to keep it).
        """
        n_batch, n_frames = self._check_inputs(codes, mask)
        steps, cp, n_cond = params.steps, self.n_predict, self.n_conditioning_codebooks
        n_positions = n_frames * cp
        if finish_by is not None:
            _check_finite("finish_by", finish_by)
        if step_seconds is not None:
            _check_finite("step_seconds", step_seconds)
            if step_seconds <= 0:
                raise ValueError(f"step_seconds must be > 0, got {step_seconds!r}")
        noise_arrays = None if noise is None else self._noise_arrays(noise, steps, n_batch, n_positions)
        generators = self._generators(seeds, n_batch)

        work = self._codes[:n_batch * self.n_codebooks * n_frames].reshape(n_batch, self.n_codebooks, n_frames)
        n0 = self._n0[:n_batch]
        status = kernels.prepare_codes(codes, mask, n_cond, self.vocab_size, self.mask_id, work, n0)
        if status == 1:
            raise ValueError(f"codes must lie in [0, {self.vocab_size}) or be the MASK id {self.mask_id}")
        if status == 2:
            raise ValueError(f"conditioning codebooks 0…{n_cond - 1} must not contain the MASK id")
        if params.count_mask_over_batch:
            n0[:] = n0.sum()

        uniforms = self._uniforms[:2 * n_batch * n_positions].reshape(n_batch, 2 * n_positions)
        uniform_rows = list(uniforms)
        gumbel_uniforms = uniforms[:, n_positions:]
        drawn_gumbel = self._gumbel[:n_batch * n_positions].reshape(n_batch, n_positions)
        sampled = self._sampled[:n_batch * n_positions].reshape(n_batch, n_positions)
        conf = self._conf[:n_batch * n_positions].reshape(n_batch, n_positions)
        logits_shape = (n_batch, cp, n_frames, self.vocab_size)
        top_k = params.top_k or 0
        top_p = params.top_p or 0.0
        typical_mass = params.typical_mass or 0.0

        step_cost = step_seconds
        for i in range(steps):
            step_start = time.perf_counter()
            final = i == steps - 1 or (
                finish_by is not None and step_cost is not None and step_start + 2.0 * step_cost > finish_by)
            logits = logits_fn(work)
            self._check_logits(logits, logits_shape)
            for generator, row in zip(generators, uniform_rows):
                generator.random(out=row)
            if noise_arrays is None:
                kernels.gumbel_from_uniforms(gumbel_uniforms, drawn_gumbel)
                gumbel = drawn_gumbel
            else:
                gumbel = noise_arrays[i]
            kernels.masked_step(
                logits, work, n_cond, self.mask_id, uniforms, gumbel, n0, i, steps, final,
                params.samples_at(i), params.temperature, params.mask_temperature, top_k, top_p,
                typical_mass, params.typical_min_tokens, sampled, conf, self._row, self._weights,
                self._block_sums, self._scratch, self._d, self._keys, self._sort)
            if on_step is not None:
                on_step(i, steps)
            if final:
                break
            step_cost = time.perf_counter() - step_start  # the latest measured cost plans the next
        return work
