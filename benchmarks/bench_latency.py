"""Trigger → sound latency (issue #10): how long after a trigger the first output sample, and the
whole window, are ready — before (encode on the trigger path, one whole decode: upstream's
pipeline) and after (codes from the continuously encoded stream, streamed decode).

    python benchmarks/bench_latency.py                      # tiny and full-size bundles
    python benchmarks/bench_latency.py --bundles tiny --bars 1 2

Each configuration runs both pipelines through the worker's own `run_job` (in this process, no
IPC), back to back on the same machine, so their ratio is the reliable number on a noisy one.
"before": first sample = whole window = the job's wall time. "after": the worker's stream was
fed the audio before the trigger (as the live engine does, every 0.5 s); first sample = the
first streamed piece, whole = the last one. The two mixed modes (stream codes with a whole
decode, trigger-path encode with a streamed decode) are derived from the same runs' stage
times: encode from the one, decode from the other. Also reported: continuous encoding's cost
per second of audio, and where the time goes (encode, coarse, c2f, decode).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from common import full_bundle, print_table, tiny_bundle, write_results

from rtvamp.bundle import load_bundle
from rtvamp.engine.backend import make_job
from rtvamp.engine.protocol import Feed
from rtvamp.engine.worker import Identity, run_job
from rtvamp.synth import groove
from rtvamp.transformer import Transformer
from rtvamp.vamp import Vamper

BPM = 120.0
SECONDS_PER_BAR = 4 * 60 / BPM


def fed_identity(vamper: Vamper, audio: np.ndarray, origin: int) -> Identity:
    """A worker identity whose code stream holds `audio` (fed in 0.5 s pieces, like the engine)."""
    identity = Identity(vamper)
    rate, step = vamper.manifest.sample_rate, vamper.manifest.sample_rate // 2
    for k in range(0, len(audio), step):
        piece = audio[k:k + step]
        identity.feed(b"bench", Feed(start_sample=origin + k, n_samples=len(piece), sample_rate=rate), piece)
    return identity


def one(identity: Identity, window: np.ndarray, rate: int, steps: int, stream: bool, window_start: int | None,
        seed: int) -> dict:
    job = make_job(seed, window, rate, preset="medium-variation", coarse_steps=steps, c2f_steps=2, seeds=[seed],
                   window_start=window_start, stream=stream)
    t0 = time.perf_counter()
    pieces: list[float] = []
    result, _ = run_job(identity, job, window, t0, lambda *_: None, lambda: False,
                        identity.streams.get(b"bench"), lambda chunk, piece: pieces.append(time.perf_counter() - t0))
    whole = time.perf_counter() - t0
    assert result.status == "ok", result.error
    return {"first": pieces[0] if pieces else whole, "whole": pieces[-1] if pieces else whole, **result.seconds}


def run(bundles: list[str], bars_list: list[int], steps_list: list[int], precisions: list[str]) -> list[dict]:
    rows = []
    for name in bundles:
        path = tiny_bundle() if name == "tiny" else full_bundle()
        bundle = load_bundle(path)
        for precision in precisions:
            vamper = Vamper(bundle, max_batch=1, precision="fp32")
            if precision == "int8":  # timed even where not eligible (random weights agree on < 99 %)
                m = bundle.manifest
                vamper.coarse = Transformer(bundle, "coarse", 1, m.coarse_chunk_frames, 0, "int8", require_eligible=False)
                vamper.c2f = Transformer(bundle, "c2f", 1, m.c2f_chunk_frames, 0, "int8", require_eligible=False)
                vamper.precision = "int8"
            rate = bundle.manifest.sample_rate
            live = groove(bars=max(bars_list) + 3, bpm=BPM, sample_rate=rate, seed=1)
            origin = 10 * rate
            identity = fed_identity(vamper, live, origin)
            stream = identity.streams[b"bench"]
            one(identity, live[:rate, None], rate, 2, False, None, 0)          # warm-up (sessions, kernels)
            for bars in bars_list:
                n = int(round(bars * SECONDS_PER_BAR * rate))
                start = len(live) - n - rate // 4                              # the last bars, ¼ s ago
                window = np.repeat(live[start:start + n, None], 2, axis=1)
                for steps in steps_list:
                    before = one(identity, window, rate, steps, False, None, 1)
                    after = one(identity, window, rate, steps, True, origin + start, 1)
                    assert after["stream_codes"] == 1.0
                    gen_b = before["coarse"] + before["c2f"]
                    enc_b = before["preprocess"] + before["encode"]
                    enc_a = after["encode"]
                    dec_first_a = after["first"] - (after["queued"] + enc_a + after["coarse"] + after["c2f"])
                    rows.append({
                        "bundle": name, "precision": vamper.precision, "bars": bars, "window_s": n / rate,
                        "steps": f"{steps}+2",
                        "before_first_s": before["first"],
                        "stream_codes_first_s": enc_a + gen_b + before["decode"],
                        "stream_decode_first_s": enc_b + gen_b + dec_first_a,
                        "after_first_s": after["first"],
                        "before_whole_s": before["whole"], "after_whole_s": after["whole"],
                        "first_ratio": before["first"] / after["first"],
                        "encode_window_s": enc_b, "encode_stream_s": enc_a,
                        "coarse_s": after["coarse"], "c2f_s": after["c2f"], "decode_whole_s": before["decode"],
                        "decode_first_piece_s": dec_first_a,
                    })
                    print(f"{name} {vamper.precision} {bars} bar(s) {steps}+2: first sample "
                          f"{before['first']:.2f} → {after['first']:.2f} s, whole {before['whole']:.2f} → "
                          f"{after['whole']:.2f} s", flush=True)
            print(f"{name} {vamper.precision}: continuous encoding {stream.seconds_per_second:.3f} s per s of audio")
            for row in rows:
                if row["bundle"] == name and row["precision"] == vamper.precision:
                    row["encode_stream_s_per_s"] = stream.seconds_per_second
    return rows


COMPACT = ("bundle", "precision", "bars", "steps", "before_first_s", "stream_codes_first_s", "stream_decode_first_s",
           "after_first_s", "first_ratio", "before_whole_s", "after_whole_s")
STAGES = ("bundle", "precision", "bars", "steps", "encode_window_s", "encode_stream_s", "coarse_s", "c2f_s",
          "decode_whole_s", "decode_first_piece_s", "encode_stream_s_per_s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundles", nargs="+", default=["tiny", "full"], choices=["tiny", "full"])
    parser.add_argument("--bars", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--steps", nargs="+", type=int, default=[8, 12])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int8"], choices=["fp32", "int8"])
    args = parser.parse_args()
    rows = run(args.bundles, args.bars, args.steps, args.precisions)
    print_table("trigger → first sample / whole window ready (seconds)", [{k: r[k] for k in COMPACT} for r in rows])
    print_table("where the time goes (seconds)", [{k: r[k] for k in STAGES} for r in rows])
    target = [r for r in rows if r["bundle"] == "full" and r["bars"] == 2 and r["steps"] == "8+2"]
    extra = {"target": "full-size, 2 bars (4 s) at 8+2 steps: first sample ≤ 2 s after the trigger",
             "target_rows": [{k: r[k] for k in ("precision", "before_first_s", "after_first_s")} for r in target]}
    print(write_results("bench_latency", rows, extra))


if __name__ == "__main__":
    main()
