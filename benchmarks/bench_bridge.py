"""The DAW bridge: block round trip through a running `rtvamp serve` (p50/p99/p99.9), idle and
while the worker generates; the latency the bridge adds (blocks); frames concealed and
played dry under injected loss and reordering.

    python benchmarks/bench_bridge.py [--blocks 3000]

Prints a table and writes benchmarks/results/bench_bridge.json.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time

import numpy as np

from common import print_table, write_results

from rtvamp.bridge import AudioStream, ControlClient, DawTransport, wire
from rtvamp.bridge.wire import FrameHeader

SR = 44100
BLOCK = 256


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(endpoint: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "rtvamp.bridge.cli", "serve", "--bind", endpoint,
                             "--variations", "1"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if not proc.stdout.readline().startswith("serving"):
        raise RuntimeError("rtvamp serve did not start")
    return proc


def groove_blocks(n_blocks: int) -> np.ndarray:
    from rtvamp.synth import groove

    bars = int(np.ceil(n_blocks * BLOCK / (2 * SR))) + 1
    x = np.repeat(groove(bars=bars, bpm=120, seed=1)[:, None], 2, axis=1).astype(np.float32)
    return x[:n_blocks * BLOCK].reshape(n_blocks, BLOCK, 2)


def round_trips(endpoint: str, n_blocks: int, generate: bool) -> dict:
    """Blocks sent back to back, each waited for; with `generate` a vamp of the last bar is
    triggered whenever none is running (the worker process keeps a core busy)."""
    blocks = groove_blocks(n_blocks)
    times, vamps = [], 0
    with ControlClient(endpoint) as ctl, AudioStream(endpoint, block_frames=BLOCK) as stream:
        ctl.set("steps", "fast")
        for k, block in enumerate(blocks):
            if generate and k * BLOCK >= 2 * SR and k % 50 == 0:
                job = ctl.state().job
                if job is None or job.status != "running":
                    ctl.trigger(source="input", bars=1)
                    vamps += 1
            t0 = time.perf_counter()
            stream.process(block, transport=DawTransport.at(k * BLOCK, SR, 120.0))
            times.append(time.perf_counter() - t0)
    ms = np.array(times[50:]) * 1e3
    return {"case": "round trip, " + ("generating" if generate else "idle"), "blocks": len(ms),
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "p99.9_ms": float(np.percentile(ms, 99.9)), "max_ms": float(ms.max()), "vamps": vamps}


def lossy_stream(endpoint: str, n_blocks: int, jitter: int, loss: float, reorder: float, seed: int = 0) -> dict:
    """A DAW-paced stream (one block per 5.8 ms) through a network that drops `loss` and swaps
    `reorder` of the frames with their successor; counts what the client would play dry (no
    reply by its playout time = sent + jitter blocks)."""
    rng = np.random.default_rng(seed)
    period = BLOCK / SR
    with ControlClient(endpoint) as ctl, AudioStream(endpoint, block_frames=BLOCK, jitter_blocks=jitter) as stream:
        before = ctl.state().stats
        w = stream.welcome
        x = np.zeros((BLOCK, 2), np.float32)
        frames = [wire.encode_frame(FrameHeader(w.stream_id, k, k * BLOCK, BLOCK, 2, SR), x) for k in range(n_blocks)]
        order, k = [], 0
        while k < n_blocks:
            if k + 1 < n_blocks and rng.random() < reorder:
                order += [k + 1, k]
                k += 2
            else:
                order.append(k)
                k += 1
        sent_at, arrived = {}, {}
        t0 = time.perf_counter()
        for slot, seq in enumerate(order):
            while time.perf_counter() < t0 + slot * period:
                got = stream.receive(0.0005)
                if got is not None:
                    arrived.setdefault(got[0].sequence, time.perf_counter())
            sent_at[seq] = t0 + seq * period  # when the DAW produced it
            if rng.random() >= loss:
                stream.socket.send(frames[seq])
        end = time.perf_counter() + 0.5
        while time.perf_counter() < end:
            got = stream.receive(0.01)
            if got is not None:
                arrived.setdefault(got[0].sequence, time.perf_counter())
        after = ctl.state().stats
    deadline = jitter * period
    dry = sum(1 for seq in range(n_blocks) if seq not in arrived or arrived[seq] - sent_at[seq] > deadline)
    delta = {key: after[key] - before[key] for key in ("concealed", "reordered", "late", "duplicate")}
    return {"case": f"loss {loss:.0%}, reorder {reorder:.0%}, jitter {jitter}", "blocks": n_blocks,
            "latency_blocks": jitter, "latency_ms": round(1e3 * jitter * period, 2), **delta, "played_dry": dry,
            "played_dry_pct": round(100 * dry / n_blocks, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=3000)
    args = parser.parse_args()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = start_server(endpoint)
    try:
        trips = [round_trips(endpoint, args.blocks, generate=False), round_trips(endpoint, args.blocks, generate=True)]
        losses = [lossy_stream(endpoint, 1000, jitter, loss, reorder)
                  for jitter in (1, 2) for loss, reorder in ((0.0, 0.0), (0.02, 0.05))]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print_table(f"bridge block round trip ({BLOCK} frames, {SR} Hz, loopback)", trips)
    print_table("latency added and frames concealed / played dry (DAW-paced)", losses)
    write_results("bench_bridge", trips + losses, {"block_frames": BLOCK, "sample_rate": SR})


if __name__ == "__main__":
    main()
