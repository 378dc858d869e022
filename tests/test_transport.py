"""Transport: exact grid positions, quantised boundaries, tempo changes, tap tempo, loop tempo."""

from __future__ import annotations

from fractions import Fraction

import pytest

from rtvamp.engine.transport import Quantize, Transport


def test_grid_is_exact_and_does_not_drift():
    t = Transport(44100, bpm=113)
    per_beat = Fraction(60 * 44100, 113)
    for k in (1, 7, 1000, 100_003):
        assert t.beat_sample(k) == -(-k * per_beat.numerator // per_beat.denominator)
    # 1000 bars later the grid is still within one sample of the exact position
    assert abs(t.bar_sample(1000) - 1000 * 4 * per_beat) < 1


@pytest.mark.parametrize("bpm", [90, 113, 120, 174])
def test_next_boundary(bpm):
    t = Transport(44100, bpm=bpm)
    bar1, bar2 = t.bar_sample(1), t.bar_sample(2)
    assert t.next_boundary(1, Quantize.BAR) == bar1
    assert t.next_boundary(bar1, Quantize.BAR) == bar1
    assert t.next_boundary(bar1 + 1, Quantize.BAR) == bar2
    assert t.next_boundary(bar1 + 1, Quantize.BEAT) == t.beat_sample(5)
    assert t.next_boundary(12345, Quantize.OFF) == 12345
    assert t.next_boundary(bar1 + 1, Quantize.LOOP, loop_start_bar=1, loop_bars=2) == t.bar_sample(3)
    assert t.next_boundary(t.bar_sample(3) + 1, Quantize.LOOP, loop_start_bar=1, loop_bars=2) == t.bar_sample(5)


def test_last_bars_window():
    t = Transport(44100, bpm=120)
    assert t.last_bars(4 * 88200 + 5, 2) == (2 * 88200, 4 * 88200)
    assert t.last_bars(4 * 88200, 1) == (3 * 88200, 4 * 88200)
    assert t.last_bars(4 * 88200 - 1, 1) == (2 * 88200, 3 * 88200)


def test_tempo_change_keeps_the_past():
    t = Transport(44100, bpm=120)
    at = t.bar_sample(4)
    t.set_tempo(60, at)
    assert t.bar_sample(2) == 2 * 88200          # before the change: unchanged
    assert t.bar_sample(5) == at + 4 * 44100     # after: a bar is 4 s at 60 BPM
    assert t.position(at + 2 * 44100) == (4, 2.0)


def test_tap_tempo_lands_taps_on_beats():
    t = Transport(44100, bpm=120)
    interval = round(44100 * 60 / 97)
    taps = [100_000 + k * interval for k in range(4)]
    assert t.tap(taps[0]) is None
    for s in taps[1:]:
        bpm = t.tap(s)
    assert bpm == pytest.approx(97, abs=0.01)
    assert t.beat_at(taps[-1]).denominator == 1
    assert t.tap(taps[-1] + 10 * 44100) is None  # a long pause starts a new sequence


def test_tempo_from_first_loop():
    t = Transport(44100, bpm=120)
    bpm = t.tempo_from_loop(start_sample=5000, length_samples=200_000, bars=2)
    assert bpm == pytest.approx(60 * 44100 * 8 / 200_000)
    assert t.bar_sample(0) == 5000 and t.bar_sample(2) == 205_000


def test_external_sync_and_bad_tempo():
    t = Transport(48000, bpm=120)
    t.sync(96_000, 8, 140.0)
    assert t.beat_sample(8) == 96_000
    assert t.bpm == pytest.approx(140)
    with pytest.raises(ValueError, match="outside"):
        t.set_tempo(5, 0)
