"""Claim: generation in a separate worker process keeps the audio callback on time; an in-process
worker (threads sharing the GIL) does not. Also trigger → ready latency for 1/2/4-bar windows.

    python benchmarks/bench_engine.py [--seconds S] [--skip-full]

Part 1 runs the live engine on a private `jackd -d dummy` server (256-frame periods, 44.1 kHz)
with the loop vamped every bar, for each backend and bundle, plus a pass-through client as the
environment's baseline (this VM's dummy driver misses deadlines on its own now and then), and
reports the callback duration distribution (fraction of the 5.8 ms block period) and xruns.
Part 2 submits single jobs to a worker process and reports submit → result latency.
"""

from __future__ import annotations

import argparse
import gc
import queue
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from common import full_bundle, print_table, write_results  # noqa: E402
from jack_server import jack_dummy  # noqa: E402
from rtvamp.engine.backend import JobResult, LocalWorker  # noqa: E402
from rtvamp.engine.engine import Engine, EngineConfig  # noqa: E402
from rtvamp.engine.scheduler import Trigger, VampParams  # noqa: E402
from rtvamp.engine.transport import Quantize  # noqa: E402
from rtvamp.io.audio import SoundCardDriver  # noqa: E402
from rtvamp.live import GIL_SWITCH_INTERVAL_S  # noqa: E402
from rtvamp.synth import groove  # noqa: E402
from rtvamp.vamp import Vamper, VampSettings  # noqa: E402

RATE, BLOCK = 44100, 256


class ThreadWorker:
    """The comparison case: the Vamper on a thread of the audio process (same API as LocalWorker)."""

    def __init__(self, bundle: str | None) -> None:
        self.vamper = Vamper(bundle, max_batch=2)
        self.vamper.vamp(groove(bars=1), RATE, VampSettings.make(steps="fast"))  # warm up
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.out: queue.SimpleQueue = queue.SimpleQueue()
        self.next_id = 1
        threading.Thread(target=self._run, daemon=True).start()

    def submit(self, audio, sample_rate, *, preset, coarse_steps, c2f_steps, temperature=1.0, top_p=None,
               seeds=(0,), beat_times_s=None, deadline_s=None, **_mask) -> int:
        job_id, self.next_id = self.next_id, self.next_id + 1
        settings = VampSettings.make(preset, coarse_steps, c2f_steps, temperature, top_p, seeds[0], len(seeds))
        self.jobs.put((job_id, audio, sample_rate, settings, beat_times_s, time.perf_counter()))
        return job_id

    def _run(self) -> None:
        while True:
            job_id, audio, rate, settings, beats, t0 = self.jobs.get()
            result = self.vamper.vamp(audio, rate, settings, beat_times_s=beats)
            self.out.put(JobResult(job_id, "ok", "", result.audio, rate, result.seconds,
                                   time.perf_counter() - t0, None))

    def cancel(self, job_id: int) -> None:
        pass

    def events(self, timeout_s: float = 0.0) -> list:
        try:
            return [self.out.get(timeout=timeout_s) if timeout_s else self.out.get_nowait()]
        except queue.Empty:
            return []

    def close(self) -> None:
        pass


class PassThrough:
    def process(self, in_block, out_block, frame_time):
        np.copyto(out_block, in_block)


def callback_stats(driver: SoundCardDriver) -> dict:
    n = min(driver._blocks, driver._durations.shape[0])
    fractions = driver._durations[:n] / (BLOCK / RATE)
    stats = driver.stats()
    return {"blocks": stats["blocks"], "xruns": stats["xruns"]["output_underflow"],
            "p50": float(np.percentile(fractions, 50)), "p99": float(np.percentile(fractions, 99)),
            "p99.9": float(np.percentile(fractions, 99.9)), "max": float(fractions.max())}


def run_engine(backend, seconds: float) -> dict:
    engine = Engine(backend, EngineConfig())
    engine.scheduler.auto_every_loops = 1
    engine.scheduler.auto_trigger = Trigger(source="loop", params=VampParams(steps="fast", variations=1))
    driver = SoundCardDriver(engine, RATE, BLOCK, 2, "system", "system")
    try:
        with driver:
            engine.scheduler.load_loop(np.repeat(groove(bars=1)[:, None], 2, axis=1), bars=1, quantize=Quantize.BAR)
            time.sleep(seconds)
        stats = callback_stats(driver)
        stats["vamps"] = sum(j.status == "ok" for j in engine.scheduler.jobs.values())
        return stats
    finally:
        engine.scheduler.close()


def part_callbacks(seconds: float, bundles: list[tuple[str, str | None]]) -> list[dict]:
    rows = []
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    with jack_dummy(RATE, BLOCK):
        with SoundCardDriver(PassThrough(), RATE, BLOCK, 2, "system", "system") as d:
            time.sleep(seconds)
        rows.append({"bundle": "-", "worker": "none (pass-through baseline)", **callback_stats(d), "vamps": 0})
        for label, bundle in bundles:
            with LocalWorker(bundle=bundle, max_batch=2, start_timeout_s=600) as worker:
                gc.collect()
                gc.freeze()
                rows.append({"bundle": label, "worker": "process", **run_engine(worker, seconds)})
            thread_worker = ThreadWorker(bundle)
            gc.collect()
            gc.freeze()
            rows.append({"bundle": label, "worker": "thread (in-process)", **run_engine(thread_worker, seconds)})
    return rows


def part_latency(bundles: list[tuple[str, str | None]], repeats: int) -> list[dict]:
    rows = []
    for label, bundle in bundles:
        with LocalWorker(bundle=bundle, max_batch=2, start_timeout_s=600) as worker:
            for bars in (1, 2, 4):
                audio = np.repeat(groove(bars=bars)[:, None], 2, axis=1)
                for steps, (coarse, c2f) in (("fast", (4, 1)), ("balanced", (8, 2))):
                    latencies, seconds = [], {}
                    for _ in range(repeats):
                        job = worker.submit(audio, RATE, preset="medium-variation", coarse_steps=coarse,
                                            c2f_steps=c2f, seeds=(1,))
                        result = None
                        while result is None:
                            for ev in worker.events(0.05):
                                if isinstance(ev, JobResult) and ev.job_id == job:
                                    result = ev
                        latencies.append(result.latency_s)
                        seconds = result.seconds
                    rows.append({"bundle": label, "bars@120": bars, "steps": f"{steps} {coarse}+{c2f}",
                                 "trigger_to_ready_s": float(np.median(latencies)),
                                 **{k: float(seconds.get(k, 0.0)) for k in ("encode", "coarse", "c2f", "decode")}})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=20.0, help="per callback run")
    ap.add_argument("--skip-full", action="store_true")
    args = ap.parse_args()
    bundles = [("tiny", None)] + ([] if args.skip_full else [("full", str(full_bundle()))])
    callbacks = part_callbacks(args.seconds, bundles)
    print_table("audio callback while vamping every bar (fractions of a 256-frame block)", callbacks)
    latency = part_latency(bundles, repeats=3 if args.skip_full else 1)
    print_table("trigger → ready (worker process, seconds)", latency)
    print(write_results("bench_engine", callbacks + latency))


if __name__ == "__main__":
    main()
