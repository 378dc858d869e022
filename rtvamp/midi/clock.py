"""Time: MIDI timestamps onto the engine's sample clock; MIDI clock in (tempo and transport from
a master) and out (rtvamp as the master).

Three clocks meet here:
- MIDI time m, seconds: the running sum of rtmidi's delta times (stamped by the MIDI API's thread
  when the message arrived, e.g. at the JACK process cycle that carried it);
- perf time p, seconds: `time.perf_counter()` (read as each message is taken from rtmidi's queue,
  and at each poll);
- engine samples s: `AudioCore.now` (the first sample of the next block the engine processes).

`TimeMap` keeps two offsets, each updated from observed pairs and smoothed:
- p = m + a. A message is taken from the queue after it was stamped, so every message bounds a
  from above: a ← min(a + 1e-4·Δm, p_taken − m), a lower envelope (allowed to rise 100 ppm in
  case the clocks drift) that settles within a fraction of the poll interval once a few messages
  were taken right after they arrived (clock ticks: within a beat).
- s = sample_rate·p + b. Each poll gives a pair (p, core.now); core.now advances a whole block
  at a time, so b is an exponential average (time constant 0.25 s) of core.now − sample_rate·p,
  reset when a pair is more than 0.1 s away from it (first pair, a restarted stream, an offline
  render that runs faster than real time). A mapped sample is good to about ±½ block.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from fractions import Fraction
from time import perf_counter

import numpy as np

from ..engine.transport import Transport
from .ports import MidiOutput

PPQN = 24
"""MIDI clock ticks per quarter note (beat)"""
CLOCK, START, CONTINUE, STOP, SONG_POSITION = 0xF8, 0xFA, 0xFB, 0xFC, 0xF2


class TimeMap:
    """MIDI time ↔ perf_counter time ↔ engine samples (see the module docstring)."""

    DRIFT = 1e-4
    """s/s the MIDI→perf offset may rise per second of MIDI time"""
    TAU_S = 0.25
    """time constant of the perf→sample average, seconds"""
    RESET_S = 0.1
    """a perf→sample pair this far (seconds) from the estimate restarts it"""

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self._a: float | None = None  # perf − midi, seconds
        self._m_last = 0.0
        self._b: float | None = None  # samples − sample_rate·perf
        self._p_last = 0.0

    @property
    def ready(self) -> bool:
        """True once the engine clock has been observed."""
        return self._b is not None

    def observe_midi(self, perf_s: float, midi_s: float) -> None:
        """A message stamped `midi_s` (MIDI time) was taken from the queue at `perf_s`."""
        bound = perf_s - midi_s
        if self._a is None or bound < self._a + self.DRIFT * (midi_s - self._m_last):
            self._a = bound
        else:
            self._a += self.DRIFT * (midi_s - self._m_last)
        self._m_last = midi_s

    def observe_engine(self, perf_s: float, sample: int) -> None:
        """At `perf_s` the engine had reached `sample` (core.now)."""
        offset = sample - self.sample_rate * perf_s
        if self._b is None or abs(offset - self._b) > self.RESET_S * self.sample_rate:
            self._b = offset
        else:
            self._b += (1.0 - math.exp(-(perf_s - self._p_last) / self.TAU_S)) * (offset - self._b)
        self._p_last = perf_s

    def perf_of_midi(self, midi_s: float) -> float:
        return midi_s + (self._a or 0.0)

    def sample_of_perf(self, perf_s: float) -> float:
        return self.sample_rate * perf_s + (self._b or 0.0)

    def perf_of_sample(self, sample: float) -> float:
        return (sample - (self._b or 0.0)) / self.sample_rate

    def sample_of_midi(self, midi_s: float) -> float:
        return self.sample_of_perf(self.perf_of_midi(midi_s))


LATE_TOLERANCE_S = 5e-4
"""`fit_line` keeps points up to this much (seconds) above the line however regular the rest"""


def fit_line(x: np.ndarray, t: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Least-squares line t ≈ slope·x + intercept that ignores late points: MIDI is only ever
    delivered late (a stalled cycle bunches ticks), so points more than 3 robust deviations
    (1.4826·MAD) above the line are dropped and the line refitted, twice.
    Returns (slope, intercept, mask of the points kept)."""
    keep = np.ones(len(x), bool)
    for _ in range(2):
        slope, intercept = np.polyfit(x[keep], t[keep], 1)
        residuals = t - (slope * x + intercept)
        centre = float(np.median(residuals[keep]))
        spread = 1.4826 * float(np.median(np.abs(residuals[keep] - centre)))
        keep = residuals <= centre + max(3 * spread, LATE_TOLERANCE_S)
    slope, intercept = np.polyfit(x[keep], t[keep], 1)
    return float(slope), float(intercept), keep


class ClockIn:
    """MIDI clock from a master → the engine's transport.

    Tempo: a line through the MIDI times of the last `window` ticks (2 bars at 24 per beat),
    fitted by `fit_line` (least squares ignoring late ticks) and published once it spans
    `min_ticks` ticks (a beat). A tempo change is suspected when the newest `change_ticks` ticks
    all land off the older ticks' line, beyond their residual envelope + 0.5 ms, on one side and
    moving away (late-delivered ticks move back towards it): the window restarts just before
    them, and once it spans `min_ticks` the change is confirmed unless a quarter of the new ticks
    sit on the old line after all (a burst of late ticks: the old window is restored). So a
    change is followed within about 1.5 beats and refined as the window fills; a change smaller
    than the timestamps' jitter (JACK: one period, 5.8 ms at 256 frames, i.e. about 1 BPM at
    174 BPM) is followed by the sliding window instead. Simulated with that jitter: within
    ±0.3 BPM 2 beats after a jump to 174 BPM, ±0.05 BPM after 2 bars.

    Position: Start puts beat 0 at the Start message's sample; the song position (beats) counts
    ticks from there; Stop keeps it, Continue resumes from it, Song Position Pointer (16ths) sets
    it. While running, `Transport.sync(sample, beat, bpm)` is called every 6 ticks when the
    fitted tempo or phase moved (> 0.005 BPM or > 1 ms); while stopped or never started the
    tempo alone follows (`Transport.set_tempo`). No tick for max(dropout_s, 3 intervals) is a
    dropout: the transport keeps its last tempo and phase (internal again) until ticks return.
    """

    MARGIN_S = 5e-4
    """how far (seconds) beyond the window's own residual envelope a tick must land to count"""

    def __init__(self, transport: Transport, time_map: TimeMap, window: int = 8 * PPQN, change_ticks: int = 4,
                 min_ticks: int = PPQN, dropout_s: float = 0.25) -> None:
        self.transport = transport
        self.time_map = time_map
        self.window = window
        self.change_ticks = change_ticks
        self.min_ticks = min_ticks
        self.dropout_s = dropout_s
        self.bpm: float | None = None
        """the fitted master tempo (None until `min_ticks` ticks arrived)"""
        self.following = False
        """ticks are arriving (False after a dropout)"""
        self.running = False
        """between Start/Continue and Stop"""
        self.position = Fraction(0)
        """song position in beats: at the next tick (running) or where Continue resumes (stopped)"""
        self._ticks: deque[tuple[int, float]] = deque(maxlen=window)  # (tick count, MIDI time s)
        self._count = 0
        self._line = (0.0, 0.0)  # fitted (seconds per tick, MIDI time of tick count 0)
        self._suspect: tuple | None = None  # a suspected tempo change: (old line, envelope, dropped ticks)
        self._anchor = (0, Fraction(0))  # (tick count, beat) of the tick that starts a run
        self._last_tick_perf = 0.0

    def message(self, status: int, data: list[int], midi_s: float, perf_s: float, sample: int) -> str | None:
        """Feed one system real-time / song-position message (`sample`: its engine sample).
        Returns a notice for the performer, or None."""
        if status == CLOCK:
            return self._tick(midi_s, perf_s)
        bpm = self.bpm or self.transport.bpm
        if status == START:
            self.running, self.position = True, Fraction(0)
            self._anchor = (self._count, Fraction(0))
            self.transport.sync(sample, 0, bpm)
        elif status == CONTINUE:
            self.running = True
            self._anchor = (self._count, self.position)
            self.transport.sync(sample, self.position, bpm)
        elif status == STOP:
            self.running = False
        elif status == SONG_POSITION and len(data) == 2:
            self.position = Fraction(data[0] | data[1] << 7, 4)
            self._anchor = (self._count, self.position)
            self.transport.sync(sample, self.position, bpm)
        return None

    def _tick(self, midi_s: float, perf_s: float) -> str | None:
        notice = None
        if not self.following:
            self.following, notice = True, "MIDI clock: following the master's tempo"
            self._ticks.clear()
            self._suspect = None
        self._last_tick_perf = perf_s
        self._ticks.append((self._count, midi_s))
        self._count += 1
        if self.running:
            self.position = self._anchor[1] + Fraction(self._count - self._anchor[0], PPQN)
        self._fit()
        if self._count % 6 == 0:
            self._follow()
        return notice

    def _ticks_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return (np.array([c for c, _ in self._ticks], np.float64), np.array([t for _, t in self._ticks], np.float64))

    def _fit(self) -> None:
        counts, times = self._ticks_arrays()
        k = self.change_ticks
        if self._suspect is not None and len(counts) >= self.min_ticks:
            slope, intercept, above, below, dropped = self._suspect
            self._suspect = None
            residuals = times - (slope * counts + intercept)
            if np.mean((residuals <= above) & (residuals >= below)) >= 0.25:
                # ticks since are back on the old line (lateness only ever adds, so on-time ticks
                # prove the old tempo): that was a burst of late ticks
                self._ticks = deque(dropped + list(self._ticks), maxlen=self.window)
                counts, times = self._ticks_arrays()
        elif self._suspect is None and len(counts) >= self.min_ticks + k:
            slope, intercept, inliers = fit_line(counts[:-k], times[:-k])
            residuals = times - (slope * counts + intercept)
            old = residuals[:-k][inliers]
            new = residuals[-k:]
            above, below = float(old.max()) + self.MARGIN_S, float(old.min()) - self.MARGIN_S
            # a tempo change: the newest ticks all off the line on one side, and not coming back
            # (late-delivered ticks come back to the line as the backlog clears)
            slower = bool(np.all(new > above)) and new[-1] >= new[0]
            faster = bool(np.all(new < below)) and new[-1] <= new[0]
            if slower or faster:  # suspected: restart the window, confirm when it spans min_ticks
                dropped = [self._ticks.popleft() for _ in range(len(self._ticks) - k - 1)]
                self._suspect = (slope, intercept, above, below, dropped)
                return
        if len(counts) < self.min_ticks:
            return
        slope, intercept, _ = fit_line(counts, times)
        bpm = 60.0 / (PPQN * slope) if slope > 0 else 0.0
        if 20.0 <= bpm <= 400.0:
            self.bpm = bpm
            self._line = (slope, intercept)

    def _follow(self) -> None:
        if self.bpm is None:
            return
        slope, intercept = self._line
        count = self._count - 1
        sample = round(self.time_map.sample_of_midi(intercept + slope * count))
        tempo_moved = abs(self.bpm - self.transport.bpm) > 0.005
        if not self.running:
            if tempo_moved:
                self.transport.set_tempo(self.bpm, sample)
            return
        beat = self._anchor[1] + Fraction(count - self._anchor[0], PPQN)
        phase_s = float(self.transport.beat_at(sample) - beat) * 60.0 / self.bpm
        if tempo_moved or abs(phase_s) > 1e-3:
            self.transport.sync(sample, beat, self.bpm)

    def check(self, perf_s: float) -> str | None:
        """Dropout detection (control thread); returns a notice when the clock is lost."""
        if not self.following:
            return None
        interval = 60.0 / (PPQN * (self.bpm or self.transport.bpm))
        if perf_s - self._last_tick_perf <= max(self.dropout_s, 3 * interval):
            return None
        self.following = self.running = False
        return f"MIDI clock lost: internal tempo {self.transport.bpm:.2f} BPM"


class ClockOut:
    """rtvamp as the clock master: 24 ticks per beat of the transport grid (mapped to
    perf_counter time through the TimeMap, so the ticks follow the audio's sample clock), sent
    from a thread that sleeps until each tick is due; Start just before a bar line, Stop."""


    def __init__(self, output: MidiOutput, transport: Transport, time_map: TimeMap) -> None:
        self.output = output
        self.transport = transport
        self.time_map = time_map
        self._start_pending = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rtvamp-midi-clock-out", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=2)

    def play(self, playing: bool) -> None:
        """Send Start before the next bar line (True) or Stop now (False)."""
        if playing:
            self._start_pending = True
        else:
            self._start_pending = False
            self.output.send([STOP])

    def _next_tick(self) -> int:
        beat = self.transport.beat_at(round(self.time_map.sample_of_perf(perf_counter())))
        return math.floor(beat * PPQN) + 1

    def _run(self) -> None:
        from ..engine.scheduler import raise_thread_priority  # (here: the scheduler loads numba)

        raise_thread_priority()  # a tick on time whatever the machine's load (where allowed)
        while not self.time_map.ready and not self._stop.is_set():
            self._stop.wait(0.01)
        tick = self._next_tick()
        ticks_per_bar = PPQN * self.transport.beats_per_bar
        while not self._stop.is_set():
            due = self.time_map.perf_of_sample(float(self.transport.exact_sample_of_beat(Fraction(tick, PPQN))))
            wait = due - perf_counter()
            beat_s = 60.0 / self.transport.bpm
            if wait < -beat_s or wait > 2 * beat_s / PPQN:
                # the grid moved (tap tempo, a new loop's tempo): re-align; lateness of up to a
                # beat (a stalled thread) is caught up by sending the missed ticks at once, so a
                # slave never loses count
                tick = self._next_tick()
                continue
            if wait > 0:
                # short sleeps, so a tempo change or a re-anchored grid takes effect at once
                self._stop.wait(min(wait, 0.005))
                continue
            if self._start_pending and tick % ticks_per_bar == 0:
                self._start_pending = False
                self.output.send([START])
            self.output.send([CLOCK])
            tick += 1
