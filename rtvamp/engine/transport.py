"""The engine's sense of time: a sample clock and an exact tempo grid (beats, bars, loops).

Grid positions are exact fractions of a sample (44100·60/bpm samples per beat rarely is an
integer, and 44100/768 token frames per second never divides a bar); a grid line's *sample* is
the first whole sample at or after its exact position (ceil), so boundaries never drift.

The tempo map is a list of segments (start sample, beat there, bpm), so tempo changes from tap
tempo, MIDI clock or a DAW keep every past position valid. External sync sources call `sync`.
Only the control side (scheduler, UI, MIDI, bridge threads) uses this class; the audio callback
works with the integer sample positions it is handed.
"""

from __future__ import annotations

import enum
import math
import threading
from collections import deque
from dataclasses import dataclass
from fractions import Fraction


class Quantize(str, enum.Enum):
    OFF = "off"
    BEAT = "beat"
    BAR = "bar"
    LOOP = "loop"


@dataclass(frozen=True)
class _Segment:
    start_sample: Fraction
    start_beat: Fraction
    bpm: Fraction


def _frac(x: float | int | Fraction) -> Fraction:
    return x if isinstance(x, Fraction) else Fraction(x).limit_denominator(1_000_000)


TAP_RESET_S = 2.0
"""A pause longer than this starts a new tap sequence."""


class Transport:
    def __init__(self, sample_rate: int, bpm: float = 120.0, beats_per_bar: int = 4) -> None:
        if sample_rate <= 0 or beats_per_bar <= 0:
            raise ValueError("sample_rate and beats_per_bar must be positive")
        self.sample_rate = sample_rate
        self.beats_per_bar = beats_per_bar
        self._lock = threading.Lock()
        self._segments = [_Segment(Fraction(0), Fraction(0), self._check_bpm(bpm))]
        self._taps: deque[int] = deque(maxlen=8)

    @staticmethod
    def _check_bpm(bpm: float | Fraction) -> Fraction:
        if not 20 <= float(bpm) <= 400:
            raise ValueError(f"tempo {float(bpm):g} BPM is outside 20–400")
        return _frac(bpm)

    # -- reading the grid -------------------------------------------------------------------

    @property
    def bpm(self) -> float:
        return float(self._segments[-1].bpm)

    def samples_per_beat(self) -> Fraction:
        return Fraction(60 * self.sample_rate) / self._segments[-1].bpm

    def samples_per_bar(self) -> Fraction:
        return self.samples_per_beat() * self.beats_per_bar

    def _segment_at_sample(self, sample: Fraction) -> _Segment:
        for seg in reversed(self._segments):
            if sample >= seg.start_sample:
                return seg
        return self._segments[0]

    def _segment_at_beat(self, beat: Fraction) -> _Segment:
        for seg in reversed(self._segments):
            if beat >= seg.start_beat:
                return seg
        return self._segments[0]

    def beat_at(self, sample: int | Fraction) -> Fraction:
        """Exact beat position (beats since beat 0) at a sample."""
        sample = Fraction(sample)
        with self._lock:
            seg = self._segment_at_sample(sample)
        return seg.start_beat + (sample - seg.start_sample) * seg.bpm / (60 * self.sample_rate)

    def exact_sample_of_beat(self, beat: int | Fraction) -> Fraction:
        beat = Fraction(beat)
        with self._lock:
            seg = self._segment_at_beat(beat)
        return seg.start_sample + (beat - seg.start_beat) * 60 * self.sample_rate / seg.bpm

    def beat_sample(self, beat: int | Fraction) -> int:
        """First whole sample at or after beat `beat`."""
        return math.ceil(self.exact_sample_of_beat(beat))

    def bar_sample(self, bar: int) -> int:
        return self.beat_sample(bar * self.beats_per_bar)

    def position(self, sample: int) -> tuple[int, float]:
        """(bar index, beat within the bar as a float) at a sample, for display."""
        beat = self.beat_at(sample)
        bar = math.floor(beat / self.beats_per_bar)
        return bar, float(beat - bar * self.beats_per_bar)

    def next_boundary(self, sample: int, quantize: Quantize, loop_start_bar: int = 0,
                      loop_bars: int = 1) -> int:
        """The first grid sample ≥ `sample` (OFF: `sample` itself). LOOP boundaries are every
        `loop_bars` bars counted from bar `loop_start_bar`."""
        if quantize is Quantize.OFF:
            return sample
        beat = self.beat_at(sample)
        if quantize is Quantize.BEAT:
            step, offset = 1, 0
        elif quantize is Quantize.BAR:
            step, offset = self.beats_per_bar, 0
        else:
            step, offset = self.beats_per_bar * loop_bars, loop_start_bar * self.beats_per_bar
        k = math.floor((beat - offset) / step)
        while True:  # a grid line's sample is the ceil of its exact position: check from floor
            candidate = self.beat_sample(offset + k * step)
            if candidate >= sample:
                return candidate
            k += 1

    def last_bars(self, sample: int, bars: int) -> tuple[int, int]:
        """[start, stop) samples of the last `bars` whole bars that ended at or before `sample`."""
        if bars <= 0:
            raise ValueError("bars must be positive")
        end_bar = math.floor(self.beat_at(sample) / self.beats_per_bar)
        if self.bar_sample(end_bar) > sample:
            end_bar -= 1
        return self.bar_sample(end_bar - bars), self.bar_sample(end_bar)

    # -- changing the grid ------------------------------------------------------------------

    def set_tempo(self, bpm: float, at_sample: int) -> None:
        """New tempo from `at_sample` on; positions before it keep their beats."""
        bpm_f = self._check_bpm(bpm)
        beat = self.beat_at(at_sample)
        with self._lock:
            self._segments = [s for s in self._segments if s.start_sample < at_sample]
            self._segments.append(_Segment(Fraction(at_sample), beat, bpm_f))

    def sync(self, sample: int | Fraction, beat: int | Fraction, bpm: float) -> None:
        """External sync (MIDI clock, DAW transport): beat `beat` falls at `sample`, tempo `bpm`."""
        bpm_f = self._check_bpm(bpm)
        with self._lock:
            self._segments = [s for s in self._segments if s.start_sample < sample]
            self._segments.append(_Segment(Fraction(sample), Fraction(beat), bpm_f))

    def reset_grid(self, bar_zero_sample: int, bpm: float) -> None:
        """A new grid: bar 0 starts at `bar_zero_sample` with tempo `bpm` (first loop recorded)."""
        with self._lock:
            self._segments = [_Segment(Fraction(bar_zero_sample), Fraction(0), self._check_bpm(bpm))]

    def tempo_from_loop(self, start_sample: int, length_samples: int, bars: int) -> float:
        """Set the grid so that [start, start + length) is exactly `bars` bars; returns the bpm."""
        bpm = Fraction(60 * self.sample_rate * bars * self.beats_per_bar, length_samples)
        self.reset_grid(start_sample, bpm)
        return float(bpm)

    def tap(self, sample: int) -> float | None:
        """Tap tempo: each tap lands on a beat; from the second tap on the tempo is the mean
        interval of the recent taps. Returns the new bpm, or None after a first tap."""
        if self._taps and sample - self._taps[-1] > TAP_RESET_S * self.sample_rate:
            self._taps.clear()
        self._taps.append(sample)
        if len(self._taps) < 2:
            return None
        interval = Fraction(self._taps[-1] - self._taps[0], len(self._taps) - 1)
        bpm = Fraction(60 * self.sample_rate) / interval
        beat = round(self.beat_at(sample))
        self.sync(sample, beat, float(bpm))
        return float(bpm)
