"""Per-job overhead of each generation backend, and pool throughput with 1 vs 2 replicas.

Claim: the transport of a backend costs a small fraction of a job's time. For each backend
(local process over ipc, `rtvamp worker` over loopback tcp with CURVE, the Ray Serve pool
through a DeploymentHandle and through its HTTP ingress) the same job runs `--jobs` times on
the tiny bundle: 2 bars at 120 BPM (4 s stereo at 44.1 kHz), 2 candidates, fast steps (4 + 1).
overhead = submit → result wall time minus the worker's own wall time (all its stages and its
queue); fraction = overhead / latency. Then jobs/s of a pool with 1 and with 2 replicas on
this machine's CPUs (8 one-bar jobs in flight at once), and of one local worker process.
Also the full-size model's costs on this CPU (a coarse forward, codec encode and decode), turned
into per-job times for a CPU and, as ESTIMATES from assumed GPU throughput, for a T4 and an H100
(docs/scaling.md; needs the cached full-size bundle of benchmarks/common.py).

Usage: python benchmarks/bench_backends.py [--jobs N] [--skip-ray]
(the Ray rows need the `cluster` extra; without Ray they are left out).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import CACHE, print_table, write_results  # noqa: E402
from rtvamp.engine.backend import JobResult, LocalWorker, RemoteWorker  # noqa: E402
from rtvamp.engine.keys import CLIENT, init_keys, load_keys  # noqa: E402
from rtvamp.synth import groove  # noqa: E402

RATE = 44100
JOB = dict(preset="medium-variation", coarse_steps=4, c2f_steps=1, seeds=[1, 2])
THROUGHPUT_JOBS = 8


def window(bars: int) -> np.ndarray:
    """`bars` bars of the synthesized groove at 120 BPM, stereo float32."""
    return np.repeat(groove(bars=bars, bpm=120, seed=1)[:, None], 2, axis=1).astype(np.float32)


def results(backend, job_ids: list[int], timeout_s: float = 600.0) -> list[JobResult]:
    """The JobResults of `job_ids` in submission order."""
    done: dict[int, JobResult] = {}
    deadline = time.monotonic() + timeout_s
    while len(done) < len(job_ids):
        if time.monotonic() > deadline:
            raise TimeoutError(f"jobs {sorted(set(job_ids) - set(done))} timed out")
        for event in backend.events(0.05):
            if isinstance(event, JobResult):
                if event.status != "ok":
                    raise RuntimeError(f"job {event.job_id} {event.status}: {event.error}")
                done[event.job_id] = event
    return [done[j] for j in job_ids]


def overhead_row(name: str, backend, jobs: int) -> dict:
    """Run the standard job `jobs` times, one after the other, after one warm-up job."""
    audio = window(2)
    results(backend, [backend.submit(audio, RATE, **JOB)])
    measured = [results(backend, [backend.submit(audio, RATE, **JOB)])[0] for _ in range(jobs)]
    latency = statistics.median(r.latency_s for r in measured)
    worker = statistics.median(sum(r.seconds.values()) for r in measured)
    overhead = statistics.median(r.latency_s - sum(r.seconds.values()) for r in measured)
    return {"backend": name, "jobs": jobs, "latency_s": latency, "worker_s": worker, "overhead_ms": 1000 * overhead,
            "overhead_fraction": overhead / latency}


def throughput_row(name: str, backend) -> dict:
    """jobs/s with THROUGHPUT_JOBS one-bar, one-candidate jobs in flight at once."""
    audio = window(1)
    options = dict(JOB, seeds=[1])
    results(backend, [backend.submit(audio, RATE, **options)])
    start = time.perf_counter()
    done = results(backend, [backend.submit(audio, RATE, **options) for _ in range(THROUGHPUT_JOBS)])
    wall = time.perf_counter() - start
    return {"backend": name, "jobs": THROUGHPUT_JOBS, "wall_s": wall, "jobs_per_s": THROUGHPUT_JOBS / wall,
            "workers_used": len({r.worker.pid for r in done})}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def remote_worker(keys: Path) -> tuple[subprocess.Popen, str]:
    """`rtvamp worker` on loopback with CURVE; returns once it serves."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    log = keys / "worker.log"
    with open(log, "wb") as err:
        process = subprocess.Popen([sys.executable, "-m", "rtvamp.engine.worker", "--bind", endpoint,
                                    "--curve-keys", str(keys), "--nice", "0"], stderr=err, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while b"serving bundle" not in log.read_bytes():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(log.read_text())
        time.sleep(0.05)
    return process, endpoint


def ray_rows(jobs: int) -> tuple[list[dict], list[dict]]:
    """Overhead through the handle and HTTP (1 replica); throughput with 1 and 2 replicas."""
    import ray
    from ray import serve

    from rtvamp.cluster import pool
    from rtvamp.cluster.backend import RayBackend

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    base = dataclasses.replace(pool.load_config(), http_port=free_port())
    try:
        one = base.with_replicas(1)
        pool.up(one, "auto")
        with RayBackend("ray") as handle, RayBackend(one.url) as http:
            overhead = [overhead_row("ray serve, handle (1 replica)", handle, jobs),
                        overhead_row("ray serve, HTTP (1 replica)", http, jobs)]
            throughput = [throughput_row("ray serve, 1 replica (all cores)", handle)]
        two = dataclasses.replace(base.with_replicas(2), threads=1,
                                  resources={**base.resources, "num_cpus": max(1, os.cpu_count() // 2)})
        pool.up(two, "auto")
        with RayBackend("ray") as handle:
            throughput.append(throughput_row("ray serve, 2 replicas (1 thread each)", handle))
    finally:
        serve.shutdown()
        ray.shutdown()
    return overhead, throughput


ASSUMED_GPU_TFLOPS = {"T4": 4.0, "H100": 20.0}
"""ESTIMATES, not measurements: fp32 throughput assumed for onnxruntime's CUDA provider (T4: ≈ 50 %
of its 8.1 TFLOP/s fp32 peak; H100: ≈ 30 % of its 67 TFLOP/s fp32 peak, no tensor cores counted)"""

STEP_FIXED_S = 0.004
"""per sampling step, costs a GPU does not shrink (assumed): numba sampler 1–4 ms
(bench_sampler.json), logits copy to the host ≈ 0.5 ms, launch and Python overhead ≈ 1 ms"""


def full_size_costs() -> dict | None:
    """The full-size bundle on this CPU: one coarse forward (575 frames; its FLOP count gives the
    achieved FLOP rate), and codec encode + decode of 4 s (230 frames). None when not cached."""
    bundle_dir = CACHE / "full"
    if not (bundle_dir / "manifest.json").is_file():
        return None
    from rtvamp.bundle import load_bundle
    from rtvamp.codec import Codec
    from rtvamp.transformer import Transformer

    bundle = load_bundle(bundle_dir, verify_hashes=False)
    model = Transformer(bundle, "coarse", 1, 575, precision="fp32")
    codes = np.random.default_rng(0).integers(0, 1024, (1, 4, 575))
    coarse_s = statistics.median(timed(lambda: model.logits(codes)) for _ in range(3))
    codec = Codec(bundle)
    audio = (0.1 * np.random.default_rng(0).standard_normal((1, 1, 230 * 768))).astype(np.float32)
    encode_s = statistics.median(timed(lambda: codec.encode(audio)) for _ in range(2))
    tokens = codec.encode(audio)
    decode_s = statistics.median(timed(lambda: codec.decode(tokens)) for _ in range(2))
    params = {name: (bundle_dir / f"{name}.onnx").stat().st_size / 4 for name in ("coarse", "c2f")}
    gflop = transformer_flops(params["coarse"], 20, 575) / 1e9
    return {"coarse_forward_575_s": coarse_s, "coarse_forward_gflop": gflop, "cpu_gflop_per_s": gflop / coarse_s,
            "encode_4s_s": encode_s, "decode_4s_s": decode_s, "params": params}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def transformer_flops(params: float, layers: int, frames: int, dim: int = 1280) -> float:
    """FLOPs of one forward of batch 1: weights (2 per parameter per frame) + attention."""
    return 2 * params * frames + layers * 4 * frames * frames * dim


def job_estimates(costs: dict) -> list[dict]:
    """Seconds of a 2-bar (4 s, 230 frames) full-size job at each step preset and candidate
    count: transformer FLOPs and the measured codec time at the CPU's measured FLOP rate (cpu)
    or at an ASSUMED GPU rate (ESTIMATES), plus STEP_FIXED_S per sampling step."""
    rows = []
    frames, chunk = 230, 173
    chunks = -(-frames // chunk)
    for steps, (coarse_steps, c2f_steps) in (("fast", (4, 1)), ("balanced", (8, 2))):
        for candidates in (1, 2):
            flops = candidates * (coarse_steps * transformer_flops(costs["params"]["coarse"], 20, frames)
                                  + c2f_steps * chunks * transformer_flops(costs["params"]["c2f"], 16, chunk))
            codec_cpu_s = costs["encode_4s_s"] + candidates * costs["decode_4s_s"]
            fixed = (coarse_steps + c2f_steps * chunks) * STEP_FIXED_S
            row = {"steps": steps, "candidates": candidates,
                   "cpu_s (from measured rate)": flops / 1e9 / costs["cpu_gflop_per_s"] + codec_cpu_s + fixed}
            for gpu, tflops in ASSUMED_GPU_TFLOPS.items():
                rate = tflops * 1e3
                row[f"{gpu}_s (ESTIMATE)"] = flops / 1e9 / rate + codec_cpu_s * costs["cpu_gflop_per_s"] / rate + fixed
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8, help="measured jobs per backend")
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args()

    load_before = os.getloadavg()
    overhead, throughput = [], []
    with LocalWorker(max_batch=2, start_timeout_s=600) as local:
        overhead.append(overhead_row("local process (ipc)", local, args.jobs))
        throughput.append(throughput_row("local process (1 worker)", local))
    with tempfile.TemporaryDirectory() as folder:
        keys = Path(folder)
        init_keys(keys)
        process, endpoint = remote_worker(keys)
        try:
            curve = load_keys(keys, CLIENT)
            with RemoteWorker(endpoint, curve.server_public, curve.own) as remote:
                overhead.append(overhead_row("remote worker (tcp loopback, CURVE)", remote, args.jobs))
        finally:
            process.kill()
            process.wait()
    if not args.skip_ray:
        if importlib.util.find_spec("ray") is None:
            print("ray is not installed: the pool rows are left out (pip install 'rtvamp[cluster]')", file=sys.stderr)
        else:
            more_overhead, more_throughput = ray_rows(args.jobs)
            overhead += more_overhead
            throughput += more_throughput
    costs = full_size_costs()
    estimates = job_estimates(costs) if costs else []
    print_table("per-job overhead (tiny bundle, 2 bars @ 120 BPM, 2 candidates, 4 + 1 steps)", overhead)
    print_table(f"throughput ({THROUGHPUT_JOBS} one-bar jobs in flight)", throughput)
    if costs:
        print_table("full-size model on this CPU (measured)", [{k: v for k, v in costs.items() if k != "params"}])
        print_table("full-size 2-bar job: CPU from measured costs, GPUs ESTIMATED (assumed TFLOP/s)", estimates)
    print(write_results("bench_backends", overhead + throughput,
                        {"full_size_costs": costs, "job_estimates": estimates,
                         "assumed_gpu_tflops": ASSUMED_GPU_TFLOPS, "step_fixed_s": STEP_FIXED_S,
                         "job": {**JOB, "bars": 2, "bpm": 120},
                         "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()}}))


if __name__ == "__main__":
    main()
