"""Shared fixtures: the reference checkpoints converted once per test session."""

from __future__ import annotations

from pathlib import Path

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

REFERENCE = Path(__file__).parent / "fixtures" / "vampnet-reference"
CHECKPOINTS = REFERENCE / "checkpoints"


def load_npz(relative: str) -> dict[str, np.ndarray]:
    with np.load(REFERENCE / relative) as data:
        return dict(data)


def upstream_logits_to_bundle_layout(logits: np.ndarray, n_predict: int) -> np.ndarray:
    """[B, V, T·Cp] (time-major, codebook-minor) → [B, Cp, T, V]."""
    b, v, tc = logits.shape
    return logits.reshape(b, v, tc // n_predict, n_predict).transpose(0, 3, 2, 1)


@pytest.fixture(scope="session")
def ref_bundle_dir(tmp_path_factory) -> Path:
    """The reference checkpoints (official format) converted by `rtvamp models convert`."""
    pytest.importorskip("torch", reason="the converter needs the `convert` extra")
    from rtvamp.cli import main

    out = tmp_path_factory.mktemp("ref_bundle")
    rc = main(["models", "convert", "--codec", str(CHECKPOINTS / "codec.pth"), "--coarse",
               str(CHECKPOINTS / "coarse.pth"), "--c2f", str(CHECKPOINTS / "c2f.pth"), "--out", str(out)])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def ref_bundle(ref_bundle_dir):
    from rtvamp.bundle import load_bundle

    return load_bundle(ref_bundle_dir)


def run_isolated(code: str, timeout_s: float = 300) -> dict:
    """Run `code` in a fresh interpreter and return the JSON it prints last. Allocation tests use
    this: tracemalloc sees every thread, and other tests leave threads (ZeroMQ, Ray, MIDI) behind."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout_s)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


class SharedBackend:
    """A backend that several engines of one test module use in turn: an engine's close leaves
    it running (the module's fixture closes it)."""

    def __init__(self, backend) -> None:
        self._backend = backend

    def __getattr__(self, name: str):
        return getattr(self._backend, name)

    def close(self) -> None:
        pass
