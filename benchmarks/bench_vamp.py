"""Claims: (1) the vamp runtime's own overhead — wall time not spent inside onnxruntime runs — is
small (target ≤ 3 %); (2) per-stage times and real-time factor of whole vamps.

    python benchmarks/bench_vamp.py [--skip-full] [--quick]

Overhead is measured by timing every onnxruntime call (encoder, decoder, each transformer
forward) inside a vamp and comparing with the vamp's wall time. Per-stage rows: encode, coarse
seconds per step, C2F seconds per step, decode, total and RTF (total / window seconds) for 2, 4
and 8 s windows. The tiny bundle is measured at 4, 8, 12 and 36 coarse steps; the full-size
random bundle at 4 and 12 steps (8 and 36 are derived from its measured per-step cost and marked
so) to keep the run under ~15 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from common import full_bundle, print_table, tiny_bundle, write_results
from rtvamp.synth import groove
from rtvamp.vamp import Vamper, VampSettings

RATE = 44100


class Timed:
    """Wraps an onnxruntime session and accumulates the seconds spent in its runs."""

    def __init__(self, session, clock: dict) -> None:
        self._session, self._clock = session, clock

    def run(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self._session.run(*args, **kwargs)
        finally:
            self._clock["ort"] += time.perf_counter() - t0

    def run_with_iobinding(self, binding):
        t0 = time.perf_counter()
        try:
            return self._session.run_with_iobinding(binding)
        finally:
            self._clock["ort"] += time.perf_counter() - t0

    def __getattr__(self, name):
        return getattr(self._session, name)


def instrument(vamper: Vamper) -> dict:
    clock = {"ort": 0.0}
    vamper.codec._encoder = Timed(vamper.codec._encoder, clock)
    vamper.codec._decoder = Timed(vamper.codec._decoder, clock)
    for model in (vamper.coarse, vamper.c2f):
        model._runner.session = Timed(model._runner.session, clock)
    return clock


def measure(label: str, vamper: Vamper, clock: dict, seconds: float, steps: int) -> dict:
    audio = groove(bars=max(1, round(seconds / 2)), bpm=120)[: int(seconds * RATE)]
    settings = VampSettings.make(steps=steps, c2f_steps=2, variations=1, seed=1)
    clock["ort"] = 0.0
    t0 = time.perf_counter()
    result = vamper.vamp(audio, RATE, settings)
    wall = time.perf_counter() - t0
    sec = result.seconds
    frames = result.codes.shape[-1]
    coarse_chunks = -(-frames // vamper.manifest.coarse_chunk_frames)
    c2f_chunks = -(-frames // vamper.manifest.c2f_chunk_frames)
    return {"bundle": label, "window_s": seconds, "coarse_steps": steps, "measured": "yes",
            "encode_s": sec["encode"], "coarse_s_per_step": sec["coarse"] / (steps * coarse_chunks),
            "c2f_s_per_step": sec["c2f"] / (2 * c2f_chunks), "decode_s": sec["decode"], "total_s": wall,
            "rtf": wall / seconds, "overhead": 1.0 - clock["ort"] / wall}


def derived(row: dict, steps: int, frames_per_chunk: int) -> dict:
    """Total for another step count from a measured row's per-step cost (marked 'derived')."""
    chunks = -(-int(np.ceil(row["window_s"] * RATE / 768)) // frames_per_chunk)
    total = row["total_s"] + (steps - row["coarse_steps"]) * row["coarse_s_per_step"] * chunks
    return {**row, "coarse_steps": steps, "measured": "derived", "total_s": total,
            "rtf": total / row["window_s"], "overhead": float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--skip-full", action="store_true")
    ap.add_argument("--quick", action="store_true", help="2 s windows only")
    args = ap.parse_args()
    windows = [2.0] if args.quick else [2.0, 4.0, 8.0]
    rows = []
    plans = [("tiny", tiny_bundle(), [4, 8, 12, 36])]
    if not args.skip_full:
        plans.append(("full", full_bundle(), [4, 12]))
    for label, path, step_counts in plans:
        vamper = Vamper(path, max_batch=1)
        print(f"{label}: transformers in {vamper.precision} (precision auto)")
        clock = instrument(vamper)
        vamper.vamp(groove(bars=1), RATE, VampSettings.make(steps="fast"))  # warm up
        for seconds in windows:
            measured = {steps: measure(label, vamper, clock, seconds, steps) for steps in step_counts}
            rows += measured.values()
            if label == "full":
                rows += [derived(measured[12], s, vamper.manifest.coarse_chunk_frames) for s in (8, 36)]
    print_table("vamp per-stage times (seconds) and runtime overhead outside onnxruntime", rows)
    overhead = [r["overhead"] for r in rows if r["measured"] == "yes"]
    print(f"runtime overhead outside onnxruntime: median {np.median(overhead):.1%}, max {max(overhead):.1%} "
          f"(target ≤ 3 %)")
    print(write_results("bench_vamp", rows))


if __name__ == "__main__":
    main()
