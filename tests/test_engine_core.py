"""The audio core on its own: sample-exact record/swap, crossfades, gains, no allocation."""

from __future__ import annotations


import numpy as np
import pytest

from rtvamp.engine.core import AudioCore, CoreConfig
from rtvamp.engine.history import LoopHistory

from conftest import run_isolated

SR, N = 44100, 256


def run(core: AudioCore, x: np.ndarray, start: int = 0, block: int = N) -> np.ndarray:
    out = np.zeros_like(x)
    for i in range(0, x.shape[0], block):
        core.process(x[i:i + block], out[i:i + block], start + i)
    return out


def noise(n: int, seed: int = 0) -> np.ndarray:
    return (0.3 * np.random.default_rng(seed).standard_normal((n, 2))).astype(np.float32)


def test_recorded_loop_plays_back_from_the_stop_sample():
    core = AudioCore()
    x = noise(SR * 5)
    core.post("record", 1001)
    core.post("stop_record", 1001 + 70_000, 1001 + 70_000)
    out = run(core, x, block=300)
    kinds = [e[0] for e in core.events]
    assert kinds == ["recorded"]
    _, start, stop, loop = core.events[0]
    assert (start, stop, loop.shape[0]) == (1001, 71_001, 70_000)
    np.testing.assert_array_equal(loop, x[1001:71_001])
    fade = int(0.02 * SR)
    np.testing.assert_array_equal(out[71_001 + fade:141_001], x[1001 + fade:71_001])   # first pass
    np.testing.assert_array_equal(out[141_001:141_001 + 5000], x[1001:6001])          # wraps in phase


def test_swap_lands_on_its_exact_sample_with_an_equal_power_crossfade():
    core = AudioCore(CoreConfig(crossfade_ms=10))
    a = np.ones((SR, 2), np.float32)
    b = -np.ones((SR, 2), np.float32)
    core.post("swap", 0, a, 0)
    core.post("gains", 0.0, 1.0)
    x = np.zeros((SR, 2), np.float32)
    first = run(core, x[:5000])
    core.post("swap", 12_345, b, 12_345)
    out = np.concatenate([first, run(core, x[5000:30_000], start=5000)])
    assert ("swapped", 12_345) in core.events
    fade = int(0.01 * SR)
    assert np.all(out[6000:12_345] == 1.0)                 # old loop until the swap sample
    assert np.all(out[12_345 + fade:30_000] == -1.0)       # new loop after the fade
    seg = out[12_345:12_345 + fade, 0]
    x_ = (np.arange(fade) + 0.5) / fade
    np.testing.assert_allclose(seg, -np.sin(np.pi / 2 * x_) + np.cos(np.pi / 2 * x_), atol=1e-6)
    assert np.abs(np.diff(out[:, 0])).max() < 2 * np.pi / 2 / fade + 1e-3  # no click


def test_mute_and_stop_glide_instead_of_clicking():
    core = AudioCore(CoreConfig(crossfade_ms=20))
    core.post("swap", 0, np.ones((4096, 2), np.float32), 0)
    x = np.zeros((SR, 2), np.float32)
    core.post("gains", 0.0, 1.0)
    first = run(core, x[:10_000])
    core.post("mute", True)
    second = run(core, x[10_000:], start=10_000)
    out = np.concatenate([first, second])
    assert np.abs(np.diff(out[:, 0])).max() < 0.01
    assert np.all(out[-1000:] == 0.0)


def test_overdub_adds_input_into_the_loop():
    core = AudioCore()
    loop = np.zeros((10_000, 2), np.float32)
    core.post("swap", 0, loop, 0)
    x = np.zeros((40_000, 2), np.float32)
    run(core, x[:20_000])
    core.post("overdub", True)
    x[20_000:30_000] = 0.25
    run(core, x[20_000:30_000], start=20_000)
    core.post("overdub", False)
    out = run(core, x[30_000:], start=30_000)
    assert np.all(loop == 0.25)
    assert np.all(out == 0.25)


def test_input_monitoring_and_dry_wet():
    core = AudioCore()
    x = noise(20_000)
    core.post("gains", 0.5, 1.0)
    out = run(core, x)
    fade = int(0.02 * SR)
    np.testing.assert_allclose(out[fade:], 0.5 * x[fade:], rtol=1e-6)
    core.post("monitor", False)
    out = run(core, x, start=20_000)
    assert np.all(out[fade:] == 0.0)


def test_recording_stops_when_the_loop_buffer_is_full():
    core = AudioCore(CoreConfig(max_loop_seconds=1.0))
    core.post("record", 0)
    run(core, noise(2 * SR))
    _, start, stop, loop = core.events[0]
    assert (start, stop, loop.shape[0]) == (0, SR, SR)


def test_process_allocates_no_buffers():
    result = run_isolated("""
        import json, tracemalloc
        import numpy as np
        from rtvamp.engine.core import AudioCore
        core = AudioCore()
        rng = np.random.default_rng(0)
        core.post("swap", 0, (0.3 * rng.standard_normal((50_000, 2))).astype(np.float32), 0)
        core.post("gains", 0.3, 1.0)
        core.post("overdub", True)
        x, out = np.zeros((256, 2), np.float32), np.zeros((256, 2), np.float32)
        for i in range(50):
            core.process(x, out, i * 256)
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        for i in range(50, 2000):
            core.process(x, out, i * 256)
        current, peak = tracemalloc.get_traced_memory()
        print(json.dumps({"net": current - base, "peak": peak - base}))
    """)
    assert result["net"] < 1024, "process() leaks memory"
    assert result["peak"] < 8 * 1024, "process() allocated a buffer"  # a block alone is 2 KiB


def test_history_undo_redo_candidates_recall():
    h = LoopHistory()
    a = h.add(np.zeros((4, 2), np.float32), "recorded")
    cands = h.add_candidates([np.full((4, 2), k, np.float32) for k in range(3)], trigger=1, parent=a.id,
                             seeds=[10, 11, 12], preset="p", bars=2)
    assert h.current is cands[0]
    assert h.step_candidate(1) is cands[1] and h.step_candidate(1) is cands[2] and h.step_candidate(1) is cands[0]
    assert h.step_candidate(-1) is cands[2]
    assert h.undo() is a and h.undo() is None
    assert h.redo() is cands[2] and h.redo() is None
    assert h.recall(a.id) is a and h.undo() is cands[2]
    with pytest.raises(KeyError):
        h.recall(999)


def test_crossfade_length_changes_at_the_next_swap():
    from rtvamp.engine.core import fade_curves

    core = AudioCore(CoreConfig(crossfade_ms=10))
    core.post("gains", 0.0, 1.0)
    core.post("swap", 0, np.ones((SR, 2), np.float32), 0)
    x = np.zeros((SR, 2), np.float32)
    run(core, x[:10_000])
    core.post("crossfade", *fade_curves(40, SR))
    core.post("swap", 20_000, -np.ones((SR, 2), np.float32), 20_000)
    out = run(core, x[10_000:40_000], start=10_000)
    fade = int(0.04 * SR)
    assert out[20_000 - 10_000 + fade // 2, 0] == pytest.approx(0.0, abs=0.01)   # mid-fade of a 40 ms fade
    assert np.all(out[20_000 - 10_000 + fade:, 0] == -1.0)
    with pytest.raises(ValueError, match="5–50 ms"):
        fade_curves(200, SR)
