"""Shared benchmark helpers: timing, result files, and the full-size random-weight bundles.

The full-size bundles (20×1280 coarse, 16×1280 c2f, full LAC) are built on the fly by the
converter from seeded random checkpoints in the official format, cached outside the repo
(RTVAMP_BENCH_CACHE, default ~/.cache/rtvamp-bench) and never committed.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CACHE = Path(os.environ.get("RTVAMP_BENCH_CACHE", Path.home() / ".cache" / "rtvamp-bench"))


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def write_results(name: str, rows: list[dict], extra: dict | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "command": "python " + " ".join([f"benchmarks/{Path(sys.argv[0]).name}"] + sys.argv[1:]),
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
               "rows": rows, **(extra or {})}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def print_table(title: str, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for key in rows[0]:
        table.add_column(key, justify="right" if isinstance(rows[0][key], (int, float)) else "left")
    for row in rows:
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()))
    Console(width=200).print(table)


def tiny_bundle() -> Path:
    from rtvamp.bundle import default_bundle_path

    return default_bundle_path()


def full_bundle(precision: str = "fp32") -> Path:
    """The full-size random-weight bundle (built once, then cached)."""
    fp32 = CACHE / "full-fp32"
    if not (fp32 / "manifest.json").is_file():
        from rtvamp.convert.export import Sources, convert
        from rtvamp.convert.random_checkpoints import FULL_C2F, FULL_CODEC, FULL_COARSE, write_random_checkpoints

        print(f"building the full-size random bundle in {fp32} (several minutes, once)", file=sys.stderr)
        ckpt = CACHE / "full-checkpoints"
        paths = write_random_checkpoints(ckpt, FULL_CODEC, FULL_COARSE, FULL_C2F, seed=0)
        convert(Sources(paths["codec"], paths["coarse"], paths["c2f"]), fp32, name="full-random",
                progress=lambda m: print("  " + m, file=sys.stderr))
        shutil.rmtree(ckpt)
    if precision == "fp32":
        return fp32
    return _int8_sibling(fp32, CACHE / "full-int8")


def _int8_sibling(fp32: Path, out: Path) -> Path:
    """An int8 copy of a bundle: transformers quantised dynamically, codec files shared."""
    if (out / "manifest.json").is_file():
        return out
    from rtvamp.bundle import MANIFEST, load_bundle, sha256_of
    from rtvamp.convert.export import quantize_int8

    src = load_bundle(fp32, verify_hashes=False).manifest
    out.mkdir(parents=True, exist_ok=True)
    files = dict(src.files)
    for name in ("codec_encoder", "codec_decoder"):
        shutil.copy(fp32 / files[name]["path"], out / files[name]["path"])
    for name in ("coarse", "c2f"):
        quantize_int8(fp32 / f"{name}.onnx", out / f"{name}.onnx")
        files[name] = {"path": f"{name}.onnx", "sha256": sha256_of(out / f"{name}.onnx"), "precision": "int8"}
    (out / MANIFEST).write_text(replace(src, files=files, name=src.name + "-int8").to_json())
    return out
