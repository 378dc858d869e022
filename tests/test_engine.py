"""The whole engine with a real worker process, driven sample-exactly by the file driver."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from rtvamp.engine.backend import LocalWorker
from rtvamp.engine.core import CoreConfig
from rtvamp.engine.engine import Engine, EngineConfig
from rtvamp.engine.scheduler import Trigger, VampParams
from rtvamp.engine.transport import Quantize
from rtvamp.io.file_driver import render
from rtvamp.synth import groove
from conftest import SharedBackend

SR = 44100
BAR = 2 * SR  # 120 BPM, 4/4
FAST = VampParams(steps="fast", variations=2)


@pytest.fixture(scope="module")
def worker():
    with LocalWorker(max_batch=2) as w:
        yield w


def due(block_start: int, sample: int) -> bool:
    """True for the 256-frame block that holds `sample`."""
    return block_start <= sample < block_start + 256


def stereo(x: np.ndarray) -> np.ndarray:
    return np.repeat(x[:, None], 2, axis=1)


def make_engine(worker, deadline_mode: bool = False, **kw) -> Engine:
    return Engine(SharedBackend(worker), EngineConfig(core=CoreConfig(crossfade_ms=10), deadline_mode=deadline_mode, **kw),
                  threaded=False)


def performance(engine: Engine, bars: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Play a groove; record bar 1 as the loop (record/stop quantised to the next bar line);
    at bar 3 vamp the last 2 bars of input."""
    x = stereo(groove(bars=bars, bpm=120, seed=3))
    actions = [(0, lambda e: e.scheduler.record(Quantize.BAR)),
               (BAR + 100, lambda e: e.scheduler.stop_record(Quantize.BAR)),
               (3 * BAR + 500, lambda e: e.scheduler.trigger(Trigger("input", bars=2, params=FAST)))]
    return x, render(engine, x, block_frames=256, actions=actions)


def test_vamp_lands_exactly_on_the_bar_and_is_deterministic(worker):
    engine = make_engine(worker)
    x, out = performance(engine)
    sched = engine.scheduler
    job = sched.jobs[1]
    assert job.status == "ok" and job.window == (BAR, 3 * BAR)
    assert job.swap_at == job.target == 4 * BAR
    # streamed decode; an offline render encodes the window on the trigger path (a render must
    # not depend on how far the worker's continuous encoder got: deterministic, bit for bit)
    assert job.takes is not None and "first_sample" in job.seconds and job.seconds["stream_codes"] == 0.0
    assert ("swapped", 4 * BAR, {}) in sched.events_log
    take = sched.history.current
    assert take.source == "vamp" and take.n_samples == 2 * BAR
    fade = int(0.01 * SR)
    np.testing.assert_array_equal(out[4 * BAR + fade:6 * BAR], take.audio[fade:])   # phase 0 at the bar line
    np.testing.assert_array_equal(out[6 * BAR:8 * BAR], take.audio)                   # and loops
    rec = sched.history.takes[1]
    assert rec.n_samples == BAR
    np.testing.assert_array_equal(out[2 * BAR + fade:3 * BAR], rec.audio[fade:])       # the recorded loop before
    np.testing.assert_array_equal(out[3 * BAR:4 * BAR], rec.audio)
    # a second render with the same actions and seeds is identical, bit for bit
    _, again = performance(make_engine(worker))
    np.testing.assert_array_equal(out, again)


def test_candidates_undo_redo_swap_on_boundaries(worker):
    engine = make_engine(worker)
    x = stereo(groove(bars=10, bpm=120, seed=1))
    s = engine.scheduler
    actions = [(0, lambda e: s.record(Quantize.BAR)),
               (BAR + 5, lambda e: s.stop_record(Quantize.BAR)),
               (2 * BAR + 300, lambda e: s.trigger(Trigger("loop", bars=1, params=FAST))),
               (5 * BAR + 5, lambda e: s.next_candidate()),
               (7 * BAR + 5, lambda e: s.undo())]
    out = render(engine, x, actions=actions)
    swaps = [e[1] for e in s.events_log if e[0] == "swapped"]
    assert swaps == [3 * BAR, 6 * BAR, 8 * BAR]
    cands = s.history.siblings(s.history.takes[2])
    assert [t.candidate for t in cands] == [0, 1]
    assert not np.array_equal(cands[0].audio, cands[1].audio)
    fade = int(0.01 * SR)
    np.testing.assert_array_equal(out[6 * BAR + fade:7 * BAR], cands[1].audio[fade:])
    np.testing.assert_array_equal(out[8 * BAR + fade:9 * BAR], s.history.takes[1].audio[fade:])


def test_tempo_comes_from_the_first_free_loop(worker):
    engine = make_engine(worker)
    x = stereo(groove(bars=4, bpm=100, seed=2))
    length = int(round(2 * 4 * 60 / 100 * SR))
    s = engine.scheduler
    render(engine, x, actions=[(1000, lambda e: s.record(Quantize.OFF)),
                               (1000 + length, lambda e: s.stop_record(Quantize.OFF))])
    start = next(e[2]["start"] for e in s.events_log if e[0] == "recorded")
    assert start == 768 + s.safety  # decided at the start of the block holding sample 1000
    assert engine.transport.bpm == pytest.approx(100, abs=0.15)  # ± one 256-frame block of timing
    assert engine.transport.bar_sample(0) == start


def test_newer_trigger_cancels_the_older_job(worker):
    engine = make_engine(worker)
    x = stereo(groove(bars=8, bpm=120))
    s = engine.scheduler
    render(engine, x, actions=[(0, lambda e: s.record(Quantize.BAR)),
                               (BAR + 10, lambda e: s.stop_record(Quantize.BAR)),
                               (3 * BAR + 10, lambda e: s.trigger(Trigger("input", bars=2, params=VampParams(steps="quality")))),
                               (3 * BAR + 20, lambda e: s.trigger(Trigger("input", bars=1, params=FAST)))])
    assert s.jobs[1].status == "cancelled" and s.jobs[2].status == "ok"
    assert s.history.current.trigger == 2


def test_late_vamp_keeps_the_loop_playing_and_swaps_at_a_later_boundary(worker):
    """Real-time pacing: the driver does not wait; a job needing longer than a beat lands later."""
    engine = make_engine(worker, bpm=240)  # quarter-second beats: the job cannot make the first one
    x = stereo(groove(bars=24, bpm=240, seed=4))
    s = engine.scheduler
    bar = SR
    out = np.zeros_like(x)
    s.record(Quantize.BAR)
    for start in range(0, x.shape[0], 256):
        if due(start, bar + 1024):
            s.stop_record(Quantize.BAR)
        if due(start, 2 * bar + 1024):
            s.trigger(Trigger("input", bars=1, quantize=Quantize.BEAT, params=VampParams(steps=64, variations=2)))
        s.poll()
        engine.process(x[start:start + 256], out[start:start + 256], start)
        time.sleep(256 / SR)  # pace like a sound card
    job = s.jobs[1]
    assert job.status == "ok"
    assert job.swap_at > job.target and (job.swap_at - job.target) % (bar // 4) == 0
    loop_part = out[2 * bar:job.swap_at]
    window = SR // 20
    rms = np.sqrt(np.mean(loop_part[: loop_part.shape[0] // window * window].reshape(-1, window, 2) ** 2, axis=(1, 2)))
    assert rms.min() > 1e-3, "the loop must keep playing while the vamp is late"


def test_worker_killed_mid_job_audio_continues_and_worker_restarts():
    with LocalWorker(max_batch=2) as w:
        engine = Engine(w, EngineConfig(), threaded=False)
        x = stereo(groove(bars=6, bpm=120))
        s = engine.scheduler
        out = np.zeros_like(x)
        s.record(Quantize.BAR)
        for start in range(0, x.shape[0], 256):
            if due(start, BAR + 1024):
                s.stop_record(Quantize.BAR)
            if due(start, 2 * BAR + 1024):
                s.trigger(Trigger("input", bars=1, params=VampParams(steps="upstream")))
            if due(start, 2 * BAR + 1024 + 256 * 40):
                os.kill(w.process.pid, signal.SIGKILL)
            s.poll(timeout_s=0.002)
            engine.process(x[start:start + 256], out[start:start + 256], start)
        deadline = time.monotonic() + 60
        while s.jobs[1].status == "running" and time.monotonic() < deadline:
            s.poll(timeout_s=0.05)
        assert s.jobs[1].status == "failed" and "lost" in s.jobs[1].error
        assert any("worker lost" in m for m in s.messages)
        assert np.abs(out[3 * BAR:]).max() > 0.01, "the loop keeps playing"
        job = s.trigger(Trigger("loop", bars=1, params=FAST))
        while job.status == "running" and time.monotonic() < deadline + 60:
            s.poll(timeout_s=0.05)
        assert job.status == "ok" and w.restarts == 1
