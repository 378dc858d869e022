"""Claim: per-forward latency of the coarse / C2F transformers (fp32 vs int8) and codec
encode/decode real-time factor, for the embedded tiny bundle and a full-size random bundle.

    python benchmarks/bench_models.py [--quick] [--skip-full]

Real-time factor (RTF) = compute seconds / audio seconds (< 1 is faster than real time).
ONNX Runtime uses its default thread count (both cores here).
"""

from __future__ import annotations

import argparse

import numpy as np

from common import full_bundle, median_seconds, print_table, tiny_bundle, write_results
from rtvamp.bundle import load_bundle
from rtvamp.codec import Codec
from rtvamp.transformer import Transformer


def transformer_rows(label: str, bundle_dir, precision: str, frames: dict[str, list[int]], repeats: int) -> list[dict]:
    bundle = load_bundle(bundle_dir, verify_hashes=False)
    rows = []
    rng = np.random.default_rng(0)
    for name, lengths in frames.items():
        model = Transformer(bundle, name, 1, max(lengths), precision=precision, require_eligible=False)
        for t in lengths:
            codes = rng.integers(0, 1024, size=(1, model.n_codebooks, t))
            codes[:, model.n_conditioning:][rng.random((1, model.n_predict, t)) < 0.6] = 1024
            sec = median_seconds(lambda: model.logits(codes), repeats)
            rows.append({"bundle": label, "graph": name, "precision": precision, "frames": t,
                         "ms_per_forward": 1000 * sec})
    return rows


def codec_rows(label: str, bundle_dir, seconds: float, repeats: int) -> list[dict]:
    bundle = load_bundle(bundle_dir, verify_hashes=False)
    codec = Codec(bundle)
    sr = bundle.manifest.sample_rate
    audio = (0.1 * np.random.default_rng(0).standard_normal((1, 1, int(seconds * sr)))).astype(np.float32)
    codes = codec.encode(audio)
    enc = median_seconds(lambda: codec.encode(audio), repeats)
    dec = median_seconds(lambda: codec.decode(codes), repeats)
    return [{"bundle": label, "graph": "codec_encoder", "precision": "fp32", "frames": codes.shape[-1],
             "ms_per_forward": 1000 * enc, "rtf": enc / seconds},
            {"bundle": label, "graph": "codec_decoder", "precision": "fp32", "frames": codes.shape[-1],
             "ms_per_forward": 1000 * dec, "rtf": dec / seconds}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-full", action="store_true", help="tiny bundle only")
    args = ap.parse_args()
    repeats = 2 if args.quick else 5
    frames = {"coarse": [173, 575], "c2f": [173]}
    bundles = [("tiny", tiny_bundle(), "fp32")]
    if not args.skip_full:
        bundles += [("full", full_bundle(), "fp32"), ("full", full_bundle(), "int8")]
    rows = []
    for label, path, precision in bundles:
        rows += transformer_rows(label, path, precision, frames, repeats if label == "tiny" else max(2, repeats - 2))
    for label, path, precision in bundles:
        if precision == "fp32":
            rows += codec_rows(label, path, 4.0, repeats if label == "tiny" else 2)
    fp32 = {(r["graph"], r["frames"]): r["ms_per_forward"] for r in rows if r["bundle"] == "full" and r["precision"] == "fp32"}
    for r in rows:
        if r["bundle"] == "full" and r["precision"] == "int8":
            r["speedup_vs_fp32"] = fp32[(r["graph"], r["frames"])] / r["ms_per_forward"]
    columns = ("bundle", "graph", "precision", "frames", "ms_per_forward", "rtf", "speedup_vs_fp32")
    rows = [{k: r.get(k, float("nan")) for k in columns} for r in rows]
    print_table("model forward latency", rows)
    print(write_results("bench_models", rows))


if __name__ == "__main__":
    main()
