"""The file driver: feeds an input signal through `Engine.process` block by block, offline.

With `wait_for_jobs=True` (the default) the render waits, before each block, for any vamp whose
target boundary falls inside that block, so a render is sample-exact and deterministic whatever
the machine's speed: the same input, actions and seeds give the same output, bit for bit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from ..engine.engine import Engine

Action = tuple[int, Callable[[Engine], object]]
"""(engine sample, what to do) — run before the block that contains that sample."""


def render(engine: Engine, audio_in: np.ndarray, block_frames: int = 256, actions: Sequence[Action] = (),
           wait_for_jobs: bool = True, job_timeout_s: float = 300.0) -> np.ndarray:
    """Process audio_in float32 [n, channels] → output float32 [n, channels]."""
    if audio_in.ndim != 2 or audio_in.shape[1] != engine.channels:
        raise ValueError(f"input must be [n, {engine.channels}], got {audio_in.shape}")
    n = audio_in.shape[0]
    out = np.zeros_like(audio_in, dtype=np.float32)
    source = np.ascontiguousarray(audio_in, dtype=np.float32)
    pending = sorted(actions, key=lambda a: a[0])
    scheduler = engine.scheduler
    scheduler.realtime = not wait_for_jobs
    for start in range(0, n, block_frames):
        stop = min(start + block_frames, n)
        scheduler.poll()
        while pending and pending[0][0] < stop:
            pending.pop(0)[1](engine)
        if wait_for_jobs:
            _wait_for_due_jobs(engine, stop + scheduler.safety, job_timeout_s)
        engine.process(source[start:stop], out[start:stop], start)
    scheduler.poll()
    return out


def _wait_for_due_jobs(engine: Engine, horizon: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while engine.scheduler.job_pending_before(horizon) is not None:
        if time.monotonic() > deadline:
            raise TimeoutError("a vamp job did not finish in time for the offline render")
        engine.scheduler.poll(timeout_s=0.05)
