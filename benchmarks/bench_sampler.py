"""Claim: one sampling + remask step of the numba kernels is ≥ 10× faster than the NumPy reference.

Both paths run the same algorithm (`rtvamp.sampler.MaskedSampler.generate` on the numba kernels,
`rtvamp.sampler_numpy.generate_numpy` in vectorised NumPy) on the same precomputed logits: the
"model" is a `logits_fn` returning one preallocated float32 array of random logits ~ N(0, 3²), so
the measured time is the per-step work without the model forward (drawing the uniforms, Gumbel
noise, softmax/sampling at every masked position, confidences, sort, remask).

A step's time is taken from the moment `logits_fn` returns to the moment the next `logits_fn` is
entered (or `generate` returns after the last step). Each run is 12 steps from a fully masked
start; reported are step 0 (all positions masked: the most expensive step) and the mean over the
12 steps, the median over repeats, both paths alternating in the same process.

Shapes: coarse (C=4, Cp=4, T=344) and c2f (C=14 with 4 conditioning codebooks: Cp=10, T=173),
V=1024, batch 1 and 2; default params (sampling, temperature 1, mask_temperature 10.5) and greedy
(sample_cutoff=−1). Results: a table on stdout and benchmarks/results/bench_sampler.json (with
the load average before and after: the 2-core machine is shared, numbers are noisy).

The two paths differ in float recipe, as documented in `rtvamp.kernels`: the kernels' softmax is
float32 (vectorised polynomial exponential), the reference's float64 (`np.exp` on float64 is
scalar libm here, ~4× slower than its float32 SIMD loop); the kernels also skip positions that are
no longer masked while the reference, like upstream, processes every position at every step.
"same tokens" checks that both runs end with identical codes.

    python benchmarks/bench_sampler.py           # full run (≈ 1–2 min on 2 cores)
    python benchmarks/bench_sampler.py --quick   # fewer repeats, batch 1 only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numba
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rtvamp.sampler import MaskedSampler, SamplingParams  # noqa: E402
from rtvamp.sampler_numpy import generate_numpy  # noqa: E402

VOCAB = 1024
MASK_ID = 1024
STEPS = 12
CLAIM = 10.0
SHAPES = {"coarse": (4, 0, 344), "c2f": (14, 4, 173)}  # C, conditioning codebooks, T
PARAMS = {"default": SamplingParams(steps=STEPS),
          "greedy": SamplingParams(steps=STEPS, sample_cutoff=-1.0)}


class StepClock:
    """logits_fn returning fixed logits and recording when each step's work starts and ends."""

    def __init__(self, logits: np.ndarray) -> None:
        self.logits = logits
        self.entered: list[float] = []
        self.returned: list[float] = []

    def __call__(self, codes: np.ndarray) -> np.ndarray:
        self.entered.append(time.perf_counter())
        self.returned.append(time.perf_counter())
        return self.logits

    def step_times(self, end: float) -> list[float]:
        """Seconds of each step: logits_fn return → next logits_fn entry (or `end`)."""
        ends = self.entered[1:] + [end]
        return [e - s for s, e in zip(self.returned, ends)]


def run_numba(sampler: MaskedSampler, logits: np.ndarray, codes: np.ndarray, mask: np.ndarray,
              params: SamplingParams, seeds: list[int]) -> tuple[list[float], np.ndarray]:
    clock = StepClock(logits)
    out = sampler.generate(clock, codes, mask, params, seeds=seeds)
    end = time.perf_counter()
    return clock.step_times(end), out.copy()


def run_numpy(logits: np.ndarray, codes: np.ndarray, mask: np.ndarray, params: SamplingParams,
              seeds: list[int], n_cond: int) -> tuple[list[float], np.ndarray]:
    clock = StepClock(logits)
    out = generate_numpy(clock, codes, mask, params, seeds=seeds, n_conditioning_codebooks=n_cond,
                         mask_id=MASK_ID)
    end = time.perf_counter()
    return clock.step_times(end), out


def bench_row(shape: str, batch: int, mode: str, repeats: int) -> dict:
    n_codebooks, n_cond, n_frames = SHAPES[shape]
    cp = n_codebooks - n_cond
    params = PARAMS[mode]
    rng = np.random.default_rng(1234)
    logits = (rng.standard_normal((batch, cp, n_frames, VOCAB), dtype=np.float32) * np.float32(3.0))
    codes = rng.integers(0, VOCAB, (batch, n_codebooks, n_frames))
    mask = np.ones_like(codes)  # fully masked (conditioning codebooks are kept regardless)
    seeds = list(range(100, 100 + batch))
    sampler = MaskedSampler(n_codebooks, n_cond, VOCAB, MASK_ID, max_batch=batch, max_frames=n_frames)
    sampler.generate(lambda _: logits, codes, mask, params, seeds=seeds)  # compile / load the cache

    first = {"numba": [], "numpy": []}
    mean = {"numba": [], "numpy": []}
    identical = True
    for _ in range(repeats):
        times_fast, out_fast = run_numba(sampler, logits, codes, mask, params, seeds)
        times_ref, out_ref = run_numpy(logits, codes, mask, params, seeds, n_cond)
        identical &= bool(np.array_equal(out_fast, out_ref))
        for name, times in (("numba", times_fast), ("numpy", times_ref)):
            first[name].append(times[0])
            mean[name].append(statistics.fmean(times))
    med = {f"{kind}_{name}_ms": 1e3 * statistics.median(values[name])
           for kind, values in (("first", first), ("mean", mean)) for name in ("numba", "numpy")}
    return {
        "shape": shape, "C": n_codebooks, "Cp": cp, "T": n_frames, "V": VOCAB, "batch": batch,
        "mode": mode, "repeats": repeats, **med,
        "first_ratio": med["first_numpy_ms"] / med["first_numba_ms"],
        "mean_ratio": med["mean_numpy_ms"] / med["mean_numba_ms"],
        "tokens_identical": identical,
    }


def print_table(rows: list[dict]) -> None:
    headers = ["shape", "B", "mode", "step0 numpy ms", "step0 numba ms", "step0 ×",
               "12-step mean numpy ms", "12-step mean numba ms", "mean ×", "same tokens"]
    cells = [[r["shape"] + f" (C={r['C']}, Cp={r['Cp']}, T={r['T']})", str(r["batch"]), r["mode"],
              f"{r['first_numpy_ms']:.2f}", f"{r['first_numba_ms']:.3f}", f"{r['first_ratio']:.1f}",
              f"{r['mean_numpy_ms']:.2f}", f"{r['mean_numba_ms']:.3f}", f"{r['mean_ratio']:.1f}",
              "yes" if r["tokens_identical"] else "NO"] for r in rows]
    title = f"One sampling + remask step, NumPy reference vs numba kernels (median of {rows[0]['repeats']})"
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
        for c in cells:
            print("  ".join(v.ljust(w) for v, w in zip(c, widths)))
        return
    table = Table(title=title)
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i < 3 else "right")
    for c in cells:
        table.add_row(*c)
    Console(width=200).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats, batch 1 only")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per row (default 7, quick 3)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_sampler.json")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 7)
    batches = (1,) if args.quick else (1, 2)

    load_before = os.getloadavg()
    started = time.perf_counter()
    rows = [bench_row(shape, batch, mode, repeats)
            for shape in SHAPES for batch in batches for mode in PARAMS]
    elapsed = time.perf_counter() - started
    print_table(rows)
    met = all(r["first_ratio"] >= CLAIM and r["mean_ratio"] >= CLAIM for r in rows)
    print(f"claim ≥ {CLAIM:.0f}× in every row (step 0 and 12-step mean): {'MET' if met else 'NOT MET'}"
          f"  ({elapsed:.0f} s)")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "claim": f"numba sampling+remask step ≥ {CLAIM:.0f}× faster than the NumPy reference",
        "claim_met": met, "quick": args.quick, "steps": STEPS, "logits": "N(0, 3²) float32, fixed",
        "rows": rows, "seconds": elapsed,
        "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "python": platform.python_version(),
                    "numpy": np.__version__, "numba": numba.__version__,
                    "numba_threads": numba.config.NUMBA_NUM_THREADS},
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
