"""Masked sampler: numba kernels vs the NumPy reference, upstream invariants, schedule, deadline,
allocation-free steps, errors. Fixture parity with the real model lives with the model tests; the
helpers `replay_noise` / `upstream_params` used there are checked here."""

from __future__ import annotations

import json
import tracemalloc
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from rtvamp import kernels, sampler, sampler_numpy
from rtvamp.sampler import MaskedSampler, SamplingParams, replay_noise, upstream_params
from rtvamp.sampler_numpy import generate_numpy

from conftest import run_isolated

GENERATE_FIXTURES = Path(__file__).parent / "fixtures" / "vampnet-reference" / "generate"
CASES = Path(__file__).parent / "fixtures" / "vampnet-reference" / "cases.json"


class CodeLogits:
    """Fake model: logits[b, c, t] = base[c, t] + table[code at (c, t − 1)] (per item, no batch mixing)."""

    def __init__(self, seed: int, n_cond: int, n_predict: int, n_frames: int, vocab: int, scale: float = 2.0):
        rng = np.random.default_rng(seed)
        self.n_cond = n_cond
        self.base = (rng.standard_normal((1, n_predict, n_frames, vocab)) * scale).astype(np.float32)
        self.table = rng.standard_normal((vocab + 1, vocab)).astype(np.float32)
        self.inputs: list[np.ndarray] = []

    def __call__(self, codes: np.ndarray) -> np.ndarray:
        self.inputs.append(codes.copy())
        previous = np.roll(codes[:, self.n_cond:], 1, axis=2)
        return (self.base[:, :, :codes.shape[2]] + self.table[previous]).astype(np.float32)


def make_problem(seed: int, batch: int, n_codebooks: int, n_cond: int, n_frames: int, vocab: int,
                 density: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, vocab, (batch, n_codebooks, n_frames))
    mask = (rng.random((batch, n_codebooks, n_frames)) < density).astype(np.int64)
    return codes, mask


def masked_counts(inputs: list[np.ndarray], n_cond: int, mask_id: int) -> np.ndarray:
    """[calls, B]: masked positions in the predicted codebooks that each model call saw."""
    return np.array([(codes[:, n_cond:] == mask_id).sum(axis=(1, 2)) for codes in inputs])


def run_both(params: SamplingParams, batch: int, n_codebooks: int, n_cond: int, n_frames: int, vocab: int,
             seeds: list[int], noise: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    codes, mask = make_problem(7, batch, n_codebooks, n_cond, n_frames, vocab)
    model = CodeLogits(3, n_cond, n_codebooks - n_cond, n_frames, vocab)
    fast = MaskedSampler(n_codebooks, n_cond, vocab, vocab, max_batch=4, max_frames=64)
    out = fast.generate(model, codes, mask, params, noise=noise, seeds=seeds).copy()
    ref = generate_numpy(model, codes, mask, params, noise=noise, seeds=seeds,
                         n_conditioning_codebooks=n_cond, mask_id=vocab)
    return out, ref


VARIANTS = {
    "default": SamplingParams(steps=6),
    "greedy": SamplingParams(steps=5, sample_cutoff=-1.0),
    "cutoff-half": SamplingParams(steps=8, sample_cutoff=0.5),
    "temperature": SamplingParams(steps=4, temperature=0.6, mask_temperature=3.0),
    "plain-softmax": SamplingParams(steps=4, temperature=0.0),
    "top-p": SamplingParams(steps=6, top_p=0.8),
    "top-k": SamplingParams(steps=6, top_k=7),
    "top-k-top-p": SamplingParams(steps=5, top_k=20, top_p=0.6, temperature=1.3),
    "typical": SamplingParams(steps=5, typical_mass=0.3, typical_min_tokens=3),
    "everything": SamplingParams(steps=7, typical_mass=0.9, top_k=40, top_p=0.95, temperature=0.8,
                                 sample_cutoff=0.6),
    "batch-summed": SamplingParams(steps=6, count_mask_over_batch=True),
    "one-step": SamplingParams(steps=1),
}
SHAPES = [(1, 4, 0, 9, 32), (2, 6, 2, 17, 64), (3, 14, 4, 5, 1024), (2, 1, 0, 1, 16)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}C{}ncc{}T{}V{}".format(*s))
@pytest.mark.parametrize("name", list(VARIANTS))
def test_numba_matches_numpy_reference(name: str, shape: tuple[int, int, int, int, int]) -> None:
    """Exact tokens. The kernels' softmax is float32 (`kernels.exp32_diff`), the reference's float64,
    so p_sel differs by ≲ 3e-7 relative (see `test_choose_token_kernel_matches_reference`): a token
    could only differ where a decision lies within that noise, which none does with these seeds."""
    batch = shape[0]
    out, ref = run_both(VARIANTS[name], *shape, seeds=list(range(11, 11 + batch)))
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("n_codebooks, n_cond", [(4, 0), (14, 4)], ids=["coarse", "c2f"])
@pytest.mark.parametrize("name", ["default", "greedy"])
def test_numba_matches_numpy_on_realistic_logits(name: str, n_codebooks: int, n_cond: int) -> None:
    """Full vocabulary, logits ~ N(0, 3²) as the benchmark uses, 12 steps, batch 2: exact tokens."""
    batch, n_frames, vocab = 2, 24, 1024
    params = replace(VARIANTS[name], steps=12)
    codes, _ = make_problem(5, batch, n_codebooks, n_cond, n_frames, vocab)
    mask = np.ones_like(codes)
    model = CodeLogits(6, n_cond, n_codebooks - n_cond, n_frames, vocab, scale=3.0)
    out = MaskedSampler(n_codebooks, n_cond, vocab, vocab, batch, n_frames).generate(
        model, codes, mask, params, seeds=[4, 5]).copy()
    ref = generate_numpy(model, codes, mask, params, seeds=[4, 5], n_conditioning_codebooks=n_cond, mask_id=vocab)
    np.testing.assert_array_equal(out, ref)


def test_noise_replay_matches_reference_and_ignores_seeds() -> None:
    batch, n_codebooks, n_cond, n_frames, vocab = 2, 6, 2, 12, 64
    params = SamplingParams(steps=4, sample_cutoff=-1.0)
    rng = np.random.default_rng(5)
    noise = [rng.gumbel(size=(batch, n_frames * (n_codebooks - n_cond))).astype(np.float32) for _ in range(4)]
    out_a, ref = run_both(params, batch, n_codebooks, n_cond, n_frames, vocab, seeds=[1, 2], noise=noise)
    out_b, _ = run_both(params, batch, n_codebooks, n_cond, n_frames, vocab, seeds=[8, 9], noise=noise)
    np.testing.assert_array_equal(out_a, ref)
    np.testing.assert_array_equal(out_a, out_b)


def test_greedy_single_step_commits_the_argmax() -> None:
    codes, mask = make_problem(1, 2, 4, 0, 10, 32)
    model = CodeLogits(2, 0, 4, 10, 32)
    out = MaskedSampler(4, 0, 32, 32, 2, 10).generate(
        model, codes, mask, SamplingParams(steps=1, sample_cutoff=-1.0, mask_temperature=0.0), seeds=[0, 0])
    expected = np.where(mask == 1, model(model.inputs[0]).argmax(-1), codes)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("name", ["default", "top-k-top-p", "typical", "batch-summed"])
def test_invariants(name: str) -> None:
    batch, n_codebooks, n_cond, n_frames, vocab = 3, 8, 3, 20, 64
    codes, mask = make_problem(4, batch, n_codebooks, n_cond, n_frames, vocab)
    mask[:, :n_cond] = 1  # ignored: conditioning codebooks are always kept
    model = CodeLogits(9, n_cond, n_codebooks - n_cond, n_frames, vocab)
    out = MaskedSampler(n_codebooks, n_cond, vocab, vocab, 3, 20).generate(
        model, codes, mask, VARIANTS[name], seeds=[1, 2, 3])
    assert out.dtype == np.int64 and out.shape == codes.shape
    assert not (out == vocab).any()
    assert ((0 <= out) & (out < vocab)).all()
    np.testing.assert_array_equal(out[:, :n_cond], codes[:, :n_cond])
    keep = mask == 0
    np.testing.assert_array_equal(out[keep], codes[keep])
    for seen in model.inputs:
        np.testing.assert_array_equal(seen[:, :n_cond], codes[:, :n_cond])
        np.testing.assert_array_equal(seen[keep], codes[keep])


def test_mask_id_in_codes_is_generated() -> None:
    codes, mask = make_problem(2, 1, 4, 0, 6, 32, density=0.0)
    codes[0, 1, 2] = 32
    out = MaskedSampler(4, 0, 32, 32, 1, 6).generate(CodeLogits(1, 0, 4, 6, 32), codes, mask,
                                                      SamplingParams(steps=2), seeds=[0])
    assert out[0, 1, 2] != 32
    keep = codes != 32
    np.testing.assert_array_equal(out[keep], codes[keep])


def expected_trajectory(n0: np.ndarray, first: np.ndarray, steps: int) -> np.ndarray:
    """Masked counts per model call implied by the float32 schedule, clamped to [1, masked − 1]."""
    counts = [first]
    for i in range(steps - 1):
        counts.append(np.array([sampler_numpy.remask_count(i, steps, int(n), int(m), False)
                                for n, m in zip(n0, counts[-1])]))
    return np.array(counts)


@pytest.mark.parametrize("steps", [1, 3, 12, 36])
def test_remask_count_follows_float32_schedule(steps: int) -> None:
    batch, n_codebooks, n_frames, vocab = 2, 4, 30, 32
    codes, mask = make_problem(6, batch, n_codebooks, 0, n_frames, vocab)
    model = CodeLogits(4, 0, n_codebooks, n_frames, vocab)
    steps_seen: list[tuple[int, int]] = []
    out = MaskedSampler(n_codebooks, 0, vocab, vocab, batch, n_frames).generate(
        model, codes, mask, SamplingParams(steps=steps), seeds=[3, 4],
        on_step=lambda i, s: steps_seen.append((i, s)))
    counts = masked_counts(model.inputs, 0, vocab)
    n0 = mask.sum(axis=(1, 2))
    np.testing.assert_array_equal(counts, expected_trajectory(n0, n0, steps))
    assert steps_seen == [(i, steps) for i in range(steps)]
    assert not (out == vocab).any()


def test_batch_summed_n0_is_upstream_quirk_q2() -> None:
    """Q2: with two identical masks, N0 = 2N, so one token per step is committed while γ ≥ 1/2."""
    steps, n_codebooks, n_frames, vocab = 12, 4, 25, 32
    codes, mask = make_problem(8, 1, n_codebooks, 0, n_frames, vocab)
    codes, mask = np.repeat(codes, 2, axis=0), np.repeat(mask, 2, axis=0)
    n = int(mask[0].sum())
    trajectories = {}
    for summed in (False, True):
        model = CodeLogits(4, 0, n_codebooks, n_frames, vocab)
        MaskedSampler(n_codebooks, 0, vocab, vocab, 2, n_frames).generate(
            model, codes, mask, SamplingParams(steps=steps, count_mask_over_batch=summed), seeds=[1, 2])
        trajectories[summed] = masked_counts(model.inputs, 0, vocab)[:, 0]
    first = np.array([n])
    np.testing.assert_array_equal(trajectories[False], expected_trajectory(first, first, steps)[:, 0])
    np.testing.assert_array_equal(trajectories[True], expected_trajectory(2 * first, first, steps)[:, 0])
    # γ(r) > 1/2 for r < 2/3: one token per step; at r = 2/3 (float32 γ = 0.49999997) the clamp
    # masked − 1 still wins; from r = 3/4 on the cosine schedule takes over.
    np.testing.assert_array_equal(trajectories[True][:9], n - np.arange(9))
    assert trajectories[True][9] < n - 9
    assert (trajectories[True] != trajectories[False]).any()


def test_schedule_is_float32_q6() -> None:
    r = np.float32(8 / 12)
    half_angle = (r * np.float32(np.pi)) / np.float32(2.0)
    assert np.float32(np.cos(np.float64(half_angle))) == np.float32(0.49999997)
    assert np.float32(np.cos(np.float64(half_angle))) < np.float32(0.5)
    # generate/coarse_2: N0 = 174 masked tokens, 12 steps, step i = 7 (r = 2/3).
    assert kernels.schedule_count(7, 12, 174) == sampler_numpy.schedule_count(7, 12, 174) == 86
    assert int(np.floor(np.cos(8 / 12 * np.pi / 2) * 174)) == 87  # what float64 would give
    assert kernels.schedule_count(11, 12, 174) == 0  # γ(1) clamps to 1e-10


def test_schedule_kernels_match_numpy() -> None:
    for steps in range(1, 70):
        for step in range(steps):
            for n0 in (1, 2, 7, 100, 174, 575 * 4, 2 * 575 * 4, 173 * 10):
                assert kernels.schedule_count(step, steps, n0) == sampler_numpy.schedule_count(step, steps, n0)
                assert kernels.remask_count(step, steps, n0, n0 // 2, step == steps - 1) == \
                    sampler_numpy.remask_count(step, steps, n0, n0 // 2, step == steps - 1)
            assert kernels.noise_scale(step, steps, 10.5) == \
                np.float32(10.5) * (np.float32(1.0) - sampler_numpy.schedule_ratio(step, steps))


def test_seeded_generation_is_reproducible_and_seeds_matter() -> None:
    codes, mask = make_problem(3, 2, 4, 0, 40, 64)
    fast = MaskedSampler(4, 0, 64, 64, 2, 40)
    model = CodeLogits(5, 0, 4, 40, 64)
    params = SamplingParams(steps=8)
    first = fast.generate(model, codes, mask, params, seeds=[10, 20]).copy()
    again = fast.generate(model, codes, mask, params, seeds=[10, 20]).copy()
    other = fast.generate(model, codes, mask, params, seeds=[11, 21]).copy()
    np.testing.assert_array_equal(first, again)
    assert (first[0] != other[0]).any() and (first[1] != other[1]).any()
    # Each candidate depends only on its own seed (per-candidate N0, per-item model).
    alone = fast.generate(model, codes[1:], mask[1:], params, seeds=[20]).copy()
    np.testing.assert_array_equal(alone[0], first[1])


class FakeClock:
    """perf_counter() replacement advanced by the fake model: each step costs `step` seconds."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 100.0, step

    def perf_counter(self) -> float:
        return self.now


@pytest.mark.parametrize("budget_steps, expected_steps", [(0.5, 1), (1.5, 1), (2.0, 2), (3.5, 3), (50.0, 12)])
def test_deadline_finishes_early_without_masks(monkeypatch: pytest.MonkeyPatch, budget_steps: float,
                                               expected_steps: int) -> None:
    clock = FakeClock(step=0.25)
    monkeypatch.setattr(sampler, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    codes, mask = make_problem(2, 2, 4, 0, 30, 32)
    model = CodeLogits(1, 0, 4, 30, 32)

    def slow_model(x: np.ndarray) -> np.ndarray:
        clock.now += clock.step
        return model(x)

    calls: list[int] = []
    out = MaskedSampler(4, 0, 32, 32, 2, 30).generate(
        slow_model, codes, mask, SamplingParams(steps=12), seeds=[1, 2],
        finish_by=clock.now + budget_steps * clock.step, step_seconds=clock.step,
        on_step=lambda i, s: calls.append(i))
    assert calls == list(range(expected_steps))
    assert not (out == 32).any()
    np.testing.assert_array_equal(out[mask == 0], codes[mask == 0])


def test_steps_that_fit() -> None:
    assert MaskedSampler.steps_that_fit(1.0, 0.1, 36) == 10
    assert MaskedSampler.steps_that_fit(10.0, 0.1, 36) == 36
    assert MaskedSampler.steps_that_fit(0.05, 0.1, 36) == 0
    assert MaskedSampler.steps_that_fit(-1.0, 0.1, 36) == 0
    with pytest.raises(ValueError):
        MaskedSampler.steps_that_fit(1.0, 0.0, 36)
    with pytest.raises(ValueError):
        MaskedSampler.steps_that_fit(1.0, 0.1, 0)


def test_generate_allocates_nothing_per_step_after_warmup() -> None:
    """Runs `allocation_check` in a fresh interpreter: tracemalloc sees every thread, and other
    tests leave threads (ZeroMQ, Ray, MIDI) behind that allocate meanwhile."""
    result = run_isolated(f"""
        import json, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import test_sampler
        test_sampler.allocation_check()
        print(json.dumps({{"ok": True}}))
    """)
    assert result["ok"]


def allocation_check() -> None:
    batch, n_codebooks, n_cond, n_frames, vocab, steps = 2, 4, 1, 4096, 16, 6
    codes, mask = make_problem(1, batch, n_codebooks, n_cond, n_frames, vocab)
    logits = np.random.default_rng(0).standard_normal((batch, n_codebooks - n_cond, n_frames, vocab)).astype(np.float32)
    fast = MaskedSampler(n_codebooks, n_cond, vocab, vocab, batch, n_frames)
    params = SamplingParams(steps=steps, top_p=0.9)
    fast.generate(lambda _: logits, codes, mask, params, seeds=[1, 2])  # warm-up (compilation)
    step_peaks = np.zeros(steps)
    last = [0]

    def on_step(i: int, _: int) -> None:
        current, peak = tracemalloc.get_traced_memory()
        step_peaks[i] = peak - last[0]
        tracemalloc.reset_peak()
        last[0] = current

    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        last[0] = before
        snapshot = tracemalloc.take_snapshot()
        out = fast.generate(lambda _: logits, codes, mask, params, seeds=[1, 2], on_step=on_step)
        # net allocation by rtvamp's own lines (other tests' leftover threads may allocate too)
        ours = [tracemalloc.Filter(True, "*rtvamp*")]
        growth = tracemalloc.take_snapshot().filter_traces(ours).compare_to(snapshot.filter_traces(ours), "filename")
        after = before + sum(stat.size_diff for stat in growth)
    finally:
        tracemalloc.stop()
    # Transient Python objects only (numba's argument dispatch ≈ 1 KB per kernel call, the
    # generators' calls, shape tuples): far below the smallest [B, C, T] temporary (a bool array
    # of codes.size bytes = 32 KiB) or a float32 [B, T·Cp] one (96 KiB).
    assert step_peaks[1:].max() < 4096, step_peaks
    assert step_peaks[0] < codes.size / 2, step_peaks
    assert after - before < 1024
    assert np.shares_memory(out, fast._codes)  # the result is a view, no copy
    assert not (out == vocab).any()


def test_fixture_replay_helpers() -> None:
    cases = {c["file"]: c for c in json.loads(CASES.read_text())["cases"] if c["kind"] == "generate"}
    assert cases
    for name, case in cases.items():
        data = np.load(GENERATE_FIXTURES.parent / name)
        params = upstream_params(case["kwargs"])
        noise = replay_noise(data)
        codes, mask, expected = data["start_tokens"], data["mask"], data["out"]
        batch, n_codebooks, n_frames = codes.shape
        n_cond = 4 if case["model"] == "c2f" else 0
        assert params.steps == case["noise_calls"] == len(noise)
        assert params.sample_cutoff == -1.0 and params.count_mask_over_batch
        assert [g.shape for g in noise] == [(batch, n_frames * (n_codebooks - n_cond))] * params.steps
        # Plumbing only (the real model is needed for token parity): a fake model, the recorded noise.
        model = CodeLogits(0, n_cond, n_codebooks - n_cond, n_frames, 1024)
        out = MaskedSampler(n_codebooks, n_cond, 1024, 1024, batch, n_frames).generate(
            model, codes, mask, params, noise=noise)
        np.testing.assert_array_equal(out[mask == 0], expected[mask == 0])
        assert not (out == 1024).any()


# --- filters and token choice, kernel vs reference, row by row ---------------------------------


def random_rows(seed: int, n: int, vocab: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = rng.choice([0.1, 1.0, 3.0, 8.0], size=(n, 1))
    rows = (rng.standard_normal((n, vocab)) * scale).astype(np.float32)
    rows[::7, :5] = rows[::7, 5:6]  # ties
    return rows


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999, 0.99999994])
def test_top_p_kernel_matches_reference(top_p: float) -> None:
    rows = random_rows(1, 200, 1024)
    ref = sampler_numpy.top_p_filter(rows, top_p)
    scratch = np.empty(1024, np.float32)
    for row, expected in zip(rows, ref):
        x = row.copy()
        kernels._top_p_filter(x, top_p, scratch)
        np.testing.assert_array_equal(x, expected)


def test_top_p_semantics() -> None:
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    row = np.log(probs).astype(np.float32)[None]
    assert np.isfinite(sampler_numpy.top_p_filter(row, 0.7)).sum() == 2  # 0.5, 0.8 > 0.7: keep 2
    assert np.isfinite(sampler_numpy.top_p_filter(row, 0.85)).sum() == 3
    assert np.isfinite(sampler_numpy.top_p_filter(row, 0.3)).sum() == 1  # the top token always stays
    x = row[0].copy()
    kernels._top_p_filter(x, 0.85, np.empty(4, np.float32))
    assert np.isfinite(x).sum() == 3


@pytest.mark.parametrize("k", [1, 5, 100, 2000])
def test_top_k_kernel_matches_reference(k: int) -> None:
    rows = random_rows(2, 100, 1024)
    ref = sampler_numpy.top_k_filter(rows, k)
    scratch = np.empty(1024, np.float32)
    for row, expected in zip(rows, ref):
        x = row.copy()
        kernels._top_k_filter(x, k, scratch)
        np.testing.assert_array_equal(x, expected)
    assert (np.isfinite(ref).sum(-1) >= min(k, 1024)).all()


@pytest.mark.parametrize("mass, min_tokens", [(0.2, 1), (0.5, 64), (0.95, 1), (1.0, 1)])
def test_typical_kernel_matches_reference(mass: float, min_tokens: int) -> None:
    rows = random_rows(3, 100, 1024)
    ref = sampler_numpy.typical_filter(rows, mass, min_tokens)
    d, keys = np.empty(1024, np.float32), np.empty(1024, np.int64)
    for row, expected in zip(rows, ref):
        x = row.copy()
        kernels._typical_filter(x, mass, min_tokens, d, keys)
        np.testing.assert_array_equal(x, expected)
    assert (np.isfinite(ref).sum(-1) >= min_tokens).all()
    if mass < 1.0:
        assert (np.isfinite(ref).sum(-1) < 1024).any()


def reference_cdf_margin(rows: np.ndarray, temperature: float, u: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Distance of u from the reference's CDF steps around each sampled token (in probability)."""
    scaled = rows / np.float32(temperature) if temperature > 0 else rows
    w = np.exp(scaled.astype(np.float64) - scaled.max(-1, keepdims=True).astype(np.float64))
    cdf = np.cumsum(w, -1) / w.sum(-1, keepdims=True)
    below = np.where(tokens > 0, cdf[np.arange(len(rows)), np.maximum(tokens - 1, 0)], 0.0)
    return np.minimum(np.abs(u - below), np.abs(cdf[np.arange(len(rows)), tokens] - u))


@pytest.mark.parametrize("temperature", [1.0, 0.5, 0.0])
def test_choose_token_kernel_matches_reference(temperature: float) -> None:
    """The kernel's float32 softmax (`kernels.exp32_diff`, block sums) against the reference's float64 one.

    Greedy tokens are the argmax of the logits themselves: always identical. A sampled token may
    only differ where u lies within 1e-5 of a step of the reference's CDF (none does with these
    seeds); p_sel agrees within 1e-6 relative (float32 rounding of p_sel included).
    """
    rows = random_rows(4, 300, 1024)
    rows[::11, 100:300] = -np.inf  # filtered tokens
    u = np.random.default_rng(0).random(len(rows))
    weights, block_sums = np.empty(1024, np.float32), np.empty(1024 // kernels.BLOCK, np.float32)
    for sample in (True, False):
        tokens, p_sel = sampler_numpy.choose_tokens(rows, temperature, sample, u)
        margins = reference_cdf_margin(rows, temperature, u, tokens)
        for row, ui, token, p, margin in zip(rows, u, tokens, p_sel, margins):
            got_token, got_p = kernels._choose_token(row, temperature, sample, ui, weights, block_sums)
            if got_token != token:
                assert sample and margin < 1e-5, (token, got_token, margin)
                continue
            assert got_p == np.float32(got_p)  # a float32 value
            np.testing.assert_allclose(got_p, p, rtol=1e-6)
            assert np.isfinite(row[got_token])


def test_choose_token_kernel_edge_rows() -> None:
    """Odd vocabulary sizes (partial blocks), one live token, all-equal rows, u at 0 and ~1."""
    weights, block_sums = np.empty(300, np.float32), np.empty(5, np.float32)
    rng = np.random.default_rng(3)
    for vocab in (1, 2, 63, 64, 65, 200, 300):
        row = (rng.standard_normal(vocab) * 4).astype(np.float32)
        for ui in (0.0, 0.3, np.nextafter(1.0, 0.0)):
            for temperature in (1.0, 0.7, 0.0):
                for sample in (True, False):
                    expected = sampler_numpy.choose_tokens(row[None], temperature, sample, np.array([ui]))
                    token, p = kernels._choose_token(row, temperature, sample, ui, weights[:vocab], block_sums)
                    assert token == expected[0][0]
                    np.testing.assert_allclose(p, expected[1][0], rtol=1e-6)
        one = np.full(vocab, -np.inf, np.float32)
        one[vocab // 2] = 3.0
        for ui in (0.0, 0.5, np.nextafter(1.0, 0.0)):
            assert kernels._choose_token(one, 1.0, True, ui, weights[:vocab], block_sums) == (vocab // 2, 1.0)
        flat = np.full(vocab, 0.25, np.float32)
        assert kernels._choose_token(flat, 1.0, False, 0.5, weights[:vocab], block_sums)[0] == 0
        assert kernels._choose_token(flat, 1.0, True, np.nextafter(1.0, 0.0), weights[:vocab],
                                     block_sums)[0] == vocab - 1


def test_exp32_accuracy() -> None:
    x = np.linspace(-87.3, 0.0, 200001, dtype=np.float32)
    x = np.concatenate([x, -np.abs(np.random.default_rng(5).standard_normal(20000).astype(np.float32)) * 1e-3])
    got = np.array([kernels.exp32(v) for v in x], np.float32)
    rel = np.abs(got.astype(np.float64) - np.exp(x.astype(np.float64))) / np.exp(x.astype(np.float64))
    assert rel.max() < 1.5e-7
    assert kernels.exp32(np.float32(0.0)) == 1.0
    assert kernels.exp32(np.float32(-np.inf)) == 0.0
    assert kernels.exp32(np.float32(-88.0)) == 0.0
    assert kernels.exp32(np.float32(-87.0)) > 0.0
    # e^(a − b) for float32 a ≤ b whose difference is not a float32: exact within 1.5e-7 all the same
    rng = np.random.default_rng(6)
    b = (rng.standard_normal(100000) * 10).astype(np.float32)
    a = np.maximum(b - np.abs(rng.standard_normal(100000)) * 20, b - 87).astype(np.float32)
    exact = np.exp(a.astype(np.float64) - b.astype(np.float64))
    assert (a.astype(np.float64) - b != (a - b).astype(np.float64)).mean() > 0.5  # inexact differences
    got = np.array([kernels.exp32_diff(ai, bi) for ai, bi in zip(a, b)], np.float32)
    assert (np.abs(got - exact) / exact).max() < 1.5e-7


def test_max_and_argmax_kernels() -> None:
    rows = random_rows(6, 200, 1000)
    rows[::5, 990:] = 40.0  # maximum in the partial last block, tied
    rows[::3, :200] = -np.inf
    block_keys = np.empty(-(-1000 // kernels.BLOCK), np.int32)
    for row in rows:
        assert kernels._max_f32(row) == row.max()
        assert kernels._argmax_f32(row, block_keys) == (row.argmax(), row.max())
    for values in ([-1.0, -0.0, 0.0, -0.0], [-1.0, -0.0, -2.0, -0.0], [-np.inf, -np.inf, -3.0],
                   [np.inf, 1.0, np.inf]):
        row = np.array(values, np.float32)
        token, value = kernels._argmax_f32(row, block_keys)
        assert token == row.argmax() and value == row.max() and kernels._max_f32(row) == row.max()


def test_inverse_cdf_sampling_follows_softmax() -> None:
    logits = np.array([0.0, 1.0, 2.0, -1.0, -np.inf], np.float32)
    u = np.random.default_rng(1).random(40000)
    tokens, _ = sampler_numpy.choose_tokens(np.repeat(logits[None], len(u), 0), 0.5, True, u)
    expected = np.exp(logits / 0.5) / np.exp(logits / 0.5).sum()
    np.testing.assert_allclose(np.bincount(tokens, minlength=5) / len(u), expected, atol=0.01)
    assert not (tokens == 4).any()


def test_gumbel_kernel_matches_reference() -> None:
    u = np.random.default_rng(2).random((3, 500))
    u[0, :3] = [0.0, 1e-30, np.nextafter(1.0, 0.0)]
    out = np.empty((3, 500), np.float32)
    kernels.gumbel_from_uniforms(u, out)
    np.testing.assert_array_equal(out, sampler_numpy.gumbel_from_uniforms(u))
    assert np.isfinite(out).all()


# --- errors --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_sampler() -> MaskedSampler:
    return MaskedSampler(4, 1, 32, 32, max_batch=2, max_frames=10)


def constant_logits(codes: np.ndarray) -> np.ndarray:
    return np.zeros((codes.shape[0], 3, codes.shape[2], 32), np.float32)


@pytest.mark.parametrize("codes_shape, mask_shape, message", [
    ((4, 10), (4, 10), "codes must be"),
    ((1, 4, 10), (1, 4, 9), "mask must be"),
    ((1, 5, 10), (1, 5, 10), "codebooks"),
    ((3, 4, 10), (3, 4, 10), "batch 3"),
    ((1, 4, 11), (1, 4, 11), "11 frames"),
    ((1, 4, 0), (1, 4, 0), "0 frames"),
])
def test_shape_errors(small_sampler: MaskedSampler, codes_shape: tuple[int, ...], mask_shape: tuple[int, ...],
                      message: str) -> None:
    with pytest.raises(ValueError, match=message):
        small_sampler.generate(constant_logits, np.zeros(codes_shape, np.int64), np.ones(mask_shape, np.int64),
                               SamplingParams(steps=2))


def test_value_errors(small_sampler: MaskedSampler) -> None:
    codes, mask = np.zeros((1, 4, 10), np.int64), np.ones((1, 4, 10), np.int64)
    params = SamplingParams(steps=2)
    generate = small_sampler.generate
    with pytest.raises(ValueError, match="codes must lie"):
        generate(constant_logits, np.full_like(codes, 40), mask, params)
    with pytest.raises(ValueError, match="codes must lie"):
        generate(constant_logits, np.full_like(codes, -1), mask, params)
    masked_conditioning = codes.copy()
    masked_conditioning[0, 0, 3] = 32
    with pytest.raises(ValueError, match="conditioning codebooks"):
        generate(constant_logits, masked_conditioning, mask, params)
    with pytest.raises(ValueError, match="logits_fn must return"):
        generate(lambda c: np.zeros((1, 4, 10, 32), np.float32), codes, mask, params)
    with pytest.raises(ValueError, match="logits_fn must return"):
        generate(lambda c: np.zeros((1, 3, 10, 32), np.float64), codes, mask, params)
    with pytest.raises(ValueError, match="noise has 1 arrays"):
        generate(constant_logits, codes, mask, params, noise=[np.zeros((1, 30), np.float32)])
    with pytest.raises(ValueError, match="noise arrays"):
        generate(constant_logits, codes, mask, params, noise=[np.zeros((1, 40), np.float32)] * 2)
    with pytest.raises(ValueError, match="seeds"):
        generate(constant_logits, codes, mask, params, seeds=[1, 2])
    with pytest.raises(ValueError, match="step_seconds"):
        generate(constant_logits, codes, mask, params, finish_by=1e9, step_seconds=-1.0)
    with pytest.raises(ValueError, match="mask must be"):
        generate(constant_logits, codes, mask.astype(np.float32), params)


@pytest.mark.parametrize("kwargs", [
    {"steps": 0}, {"steps": 2.5}, {"steps": True}, {"temperature": float("nan")},
    {"mask_temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": 0},
    {"typical_mass": 0.0}, {"typical_min_tokens": 0}, {"sample_cutoff": float("inf")},
    {"count_mask_over_batch": 1},
])
def test_params_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("args", [(0, 0, 32, 32, 1, 1), (4, 4, 32, 32, 1, 1), (4, 0, 32, 31, 1, 1),
                                  (4, 0, 32, 32, 0, 1), (4, 0, 32, 32, 1, 0)])
def test_sampler_construction_errors(args: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        MaskedSampler(*args)


def test_warmup_runs() -> None:
    MaskedSampler(14, 4, 1024, 1024, 1, 2).warmup()
