"""Shared benchmark helpers: timing, result files, and the full-size random-weight bundle.

The full-size bundle (20×1280 coarse, 16×1280 c2f, full LAC) is built on the fly by the
converter from seeded random checkpoints in the official format, with fp32 transformers and
their int8 variants, cached outside the repo (RTVAMP_BENCH_CACHE, default
~/.cache/rtvamp-bench/full) and never committed.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import sys
import time
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


def full_bundle() -> Path:
    """The full-size random-weight bundle (built once, then cached): fp32 transformers plus their
    int8 variants with measured agreement; pick one with `precision=` on Transformer/Vamper."""
    from rtvamp.bundle import int8_name, load_bundle

    path = CACHE / "full"
    if not (path / "manifest.json").is_file():
        from rtvamp.convert.export import Sources, convert
        from rtvamp.convert.random_checkpoints import FULL_C2F, FULL_CODEC, FULL_COARSE, write_random_checkpoints

        print(f"building the full-size random bundle in {path} (several minutes, once)", file=sys.stderr)
        ckpt = CACHE / "full-checkpoints"
        paths = write_random_checkpoints(ckpt, FULL_CODEC, FULL_COARSE, FULL_C2F, seed=0)
        report = convert(Sources(paths["codec"], paths["coarse"], paths["c2f"]), path, name="full-random",
                         progress=lambda m: print("  " + m, file=sys.stderr))
        shutil.rmtree(ckpt)
        print(f"  int8 top-1 agreement with fp32: {report.int8_top1_agreement}", file=sys.stderr)
        for legacy in ("full-fp32", "full-int8"):  # the former one-precision-per-folder cache
            shutil.rmtree(CACHE / legacy, ignore_errors=True)
    elif int8_name("coarse") not in load_bundle(path, verify_hashes=False).manifest.files:
        from rtvamp.convert.export import add_int8_variants

        print(f"adding int8 variants to {path}", file=sys.stderr)
        add_int8_variants(path)
    return path

