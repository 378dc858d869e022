"""The audio-thread half of the engine: `AudioCore.process(in_block, out_block, frame_time)`.

Real-time rules (docs/realtime.md): `process` never allocates a buffer, takes a lock, waits or
logs. Every array it touches is preallocated; NumPy works with `out=`. The only Python objects
it creates are slice views and, on rare events (a swap done, a recording finished), one small
tuple appended to `events` (a deque: append/popleft are atomic under the GIL, no lock).

Control threads talk to it through `post(command)`: commands are applied at the start of the
next block; sample-accurate ones (record start/stop, swap) carry the absolute sample at which
they take effect, and a block is split at that sample. Playback of a loop is phase-locked to an
anchor sample: at time t the loop plays its sample (t − anchor) mod length.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from .ring import AudioRing


@dataclass(frozen=True)
class CoreConfig:
    sample_rate: int = 44100
    channels: int = 2
    max_block_frames: int = 4096
    ring_seconds: float = 90.0
    """input and output history kept (≥ 60 s: 'vamp the last N bars' reads from it)"""
    max_loop_seconds: float = 60.0
    crossfade_ms: float = 20.0
    """equal-power crossfade at every swap, start and stop (5–50 ms)"""

    def __post_init__(self) -> None:
        if not 5.0 <= self.crossfade_ms <= 50.0:
            raise ValueError(f"crossfade_ms must be within 5–50 ms, got {self.crossfade_ms}")
        if self.ring_seconds < 60.0:
            raise ValueError("ring_seconds must be ≥ 60")


class _Player:
    """A loop being played: array [length, channels] and the anchor sample of its phase 0."""

    __slots__ = ("loop", "anchor")

    def __init__(self) -> None:
        self.loop: np.ndarray | None = None
        self.anchor = 0

    def render(self, t: int, out: np.ndarray) -> None:
        """Write the loop's samples for absolute times [t, t + len(out)) into out (silence if none)."""
        loop = self.loop
        if loop is None:
            out.fill(0.0)
            return
        length = loop.shape[0]
        n = out.shape[0]
        phase = (t - self.anchor) % length
        done = 0
        while done < n:
            k = min(n - done, length - phase)
            np.copyto(out[done:done + k], loop[phase:phase + k])
            done += k
            phase = 0

    def overdub(self, t: int, block: np.ndarray) -> None:
        """Add block into the loop at the phase of time t (in place)."""
        loop = self.loop
        length = loop.shape[0]
        n = block.shape[0]
        phase = (t - self.anchor) % length
        done = 0
        while done < n:
            k = min(n - done, length - phase)
            np.add(loop[phase:phase + k], block[done:done + k], out=loop[phase:phase + k])
            done += k
            phase = 0


class _GainRamp:
    """A gain that glides to each new target over the crossfade length (no clicks)."""

    __slots__ = ("ramp", "scratch", "start", "target", "pos")

    def __init__(self, n_fade: int, max_block: int, initial: float) -> None:
        x = (np.arange(n_fade, dtype=np.float64) + 0.5) / n_fade
        self.ramp = (np.sin(0.5 * np.pi * x) ** 2).astype(np.float32)[:, None]
        self.scratch = np.zeros((max_block, 1), np.float32)
        self.start = self.target = float(initial)
        self.pos = n_fade

    def value(self) -> float:
        if self.pos >= self.ramp.shape[0]:
            return self.target
        return self.start + (self.target - self.start) * float(self.ramp[self.pos, 0])

    @property
    def silent(self) -> bool:
        return self.target == 0.0 and self.pos >= self.ramp.shape[0]

    def apply(self, block: np.ndarray, target: float) -> None:
        """Multiply block [n, ch] in place by the gain, gliding towards `target`."""
        if target != self.target:
            self.start, self.target, self.pos = self.value(), target, 0
        n, n_fade = block.shape[0], self.ramp.shape[0]
        k = min(n, max(0, n_fade - self.pos))
        if k:
            curve = self.scratch[:k]
            np.multiply(self.ramp[self.pos:self.pos + k], self.target - self.start, out=curve)
            np.add(curve, self.start, out=curve)
            np.multiply(block[:k], curve, out=block[:k])
            self.pos += k
        if k < n:
            np.multiply(block[k:], self.target, out=block[k:])


NEVER = 1 << 62


def fade_curves(crossfade_ms: float, sample_rate: int) -> tuple[np.ndarray, np.ndarray]:
    """Equal-power (fade-in, fade-out) curves float32 [n, 1] of crossfade_ms (5–50 ms)."""
    if not 5.0 <= crossfade_ms <= 50.0:
        raise ValueError(f"crossfade must be within 5–50 ms, got {crossfade_ms}")
    n_fade = max(1, int(round(crossfade_ms * sample_rate / 1000)))
    x = (np.arange(n_fade, dtype=np.float64) + 0.5) / n_fade
    return (np.sin(0.5 * np.pi * x).astype(np.float32)[:, None],
            np.cos(0.5 * np.pi * x).astype(np.float32)[:, None])


class AudioCore:
    def __init__(self, config: CoreConfig = CoreConfig()) -> None:
        self.config = c = config
        sr, ch = c.sample_rate, c.channels
        self.input_ring = AudioRing(int(c.ring_seconds * sr), ch, c.max_block_frames)
        self.output_ring = AudioRing(int(c.ring_seconds * sr), ch, c.max_block_frames)
        self._rec = [np.zeros((int(c.max_loop_seconds * sr), ch), np.float32) for _ in range(2)]
        self._rec_index = 0
        self._wet = np.zeros((c.max_block_frames, ch), np.float32)
        self._old = np.zeros((c.max_block_frames, ch), np.float32)
        self._fade_in, self._fade_out = fade_curves(c.crossfade_ms, sr)
        self._next_fade: tuple[np.ndarray, np.ndarray] | None = None
        n_fade = self._fade_in.shape[0]
        self._wet_ramp = _GainRamp(n_fade, c.max_block_frames, 1.0)
        self._dry_ramp = _GainRamp(n_fade, c.max_block_frames, 0.0)
        self._player, self._previous = _Player(), _Player()
        self._fade_pos = n_fade  # ≥ n_fade: no crossfade running
        self.mailbox: deque = deque()
        self.events: deque = deque(maxlen=1024)
        # state, written only by the audio thread (control reads are for display)
        self.now = 0
        self.blocks = 0
        self.playing = True
        self.muted = False
        self.overdubbing = False
        self.dry_gain, self.wet_gain = 0.0, 1.0
        self.monitor = True
        self._swap_at, self._swap_loop, self._swap_anchor = NEVER, None, 0
        self._rec_start_at, self._rec_stop_at, self._rec_anchor = NEVER, NEVER, 0
        self._recording_from = -1  # absolute sample the current recording started at, −1 = idle
        self._rec_len = 0

    # -- control side ---------------------------------------------------------------------

    def post(self, *command) -> None:
        """Queue a command for the audio thread (any thread). Commands:
        ("swap", at_sample, loop [n, ch] float32 or None, anchor_sample) — crossfade to the loop
            (None = to silence) at at_sample; a newer swap replaces a pending one;
        ("record", at_sample) / ("stop_record", at_sample, anchor_sample) — capture the input
            into a loop; at the stop the loop starts playing with its phase 0 at anchor_sample
            (the stop sample, or earlier by the latency compensation);
        ("overdub", bool), ("mute", bool), ("play", bool), ("monitor", bool),
        ("gains", dry, wet) — dry is the input level in the output, wet the loop level;
        ("crossfade", fade_in, fade_out) — curves from `fade_curves` for the next swaps;
        ("rebind", old_array, new_array) — replace the playing array by an equal copy (no fade)."""
        self.mailbox.append(command)

    @property
    def recording(self) -> bool:
        return self._recording_from >= 0

    @property
    def loop_length(self) -> int:
        loop = self._player.loop
        return 0 if loop is None else loop.shape[0]

    # -- audio thread ---------------------------------------------------------------------

    def _apply(self, command: tuple) -> None:
        kind = command[0]
        if kind == "swap":
            self._swap_at, self._swap_loop, self._swap_anchor = command[1], command[2], command[3]
        elif kind == "record":
            self._rec_start_at = command[1]
        elif kind == "stop_record":
            self._rec_stop_at, self._rec_anchor = command[1], command[2]
        elif kind == "overdub":
            self.overdubbing = bool(command[1])
        elif kind == "mute":
            self.muted = bool(command[1])
        elif kind == "play":
            self.playing = bool(command[1])
        elif kind == "monitor":
            self.monitor = bool(command[1])
        elif kind == "gains":
            self.dry_gain, self.wet_gain = float(command[1]), float(command[2])
        elif kind == "crossfade":
            self._next_fade = (command[1], command[2])
        elif kind == "rebind" and self._player.loop is command[1]:
            self._player.loop = command[2]

    def process(self, in_block: np.ndarray, out_block: np.ndarray, frame_time: int) -> None:
        """Process one block: float32 [n, channels] in and out, frame_time = sample of frame 0."""
        mailbox = self.mailbox
        while mailbox:
            self._apply(mailbox.popleft())
        self.input_ring.write(in_block)
        n = in_block.shape[0]
        t, done = frame_time, 0
        while done < n:
            stop = frame_time + n
            for event_at in (self._swap_at, self._rec_start_at, self._rec_stop_at):
                if t <= event_at < stop:
                    stop = event_at
            if stop > t:
                self._render(in_block[done:done + stop - t], out_block[done:done + stop - t], t)
                done += stop - t
                t = stop
            self._fire_events(t)
        self.output_ring.write(out_block)
        self.now = frame_time + n
        self.blocks += 1

    def _fire_events(self, t: int) -> None:
        if self._rec_start_at == t:
            self._rec_start_at = NEVER
            self._recording_from, self._rec_len = t, 0
        if self._rec_stop_at == t:
            self._rec_stop_at = NEVER
            self._finish_recording(t)
        if self._swap_at == t:
            self._swap_at = NEVER
            self._start_crossfade(self._swap_loop, self._swap_anchor)
            self._swap_loop = None
            self.events.append(("swapped", t))

    def _finish_recording(self, t: int) -> None:
        if self._recording_from < 0:
            return
        loop = self._rec[self._rec_index][:self._rec_len]
        self._rec_index ^= 1
        start = self._recording_from
        self._recording_from = -1
        if loop.shape[0] > 0:
            self._start_crossfade(loop, min(self._rec_anchor, t))
        self.events.append(("recorded", start, t, loop))

    def _start_crossfade(self, loop: np.ndarray | None, anchor: int) -> None:
        if self._next_fade is not None:  # a new crossfade length takes effect at the next swap
            self._fade_in, self._fade_out = self._next_fade
            self._next_fade = None
        self._previous.loop, self._previous.anchor = self._player.loop, self._player.anchor
        self._player.loop, self._player.anchor = loop, anchor
        self._fade_pos = 0

    def _render(self, inp: np.ndarray, out: np.ndarray, t: int) -> None:
        n = inp.shape[0]
        if self._recording_from >= 0:
            rec = self._rec[self._rec_index]
            k = min(n, rec.shape[0] - self._rec_len)
            np.copyto(rec[self._rec_len:self._rec_len + k], inp[:k])
            self._rec_len += k
            if k < n:  # the loop buffer is full: end the recording here
                self._finish_recording(t + k)
        wet = self._wet[:n]
        self._player.render(t, wet)
        n_fade = self._fade_in.shape[0]
        if self._fade_pos < n_fade:
            k = min(n, n_fade - self._fade_pos)
            old = self._old[:k]
            self._previous.render(t, old)
            np.multiply(wet[:k], self._fade_in[self._fade_pos:self._fade_pos + k], out=wet[:k])
            np.multiply(old, self._fade_out[self._fade_pos:self._fade_pos + k], out=old)
            np.add(wet[:k], old, out=wet[:k])
            self._fade_pos += k
            if self._fade_pos >= n_fade:
                self._previous.loop = None
        if self.overdubbing and self._player.loop is not None and self._fade_pos >= n_fade:
            self._player.overdub(t, inp)
        self._wet_ramp.apply(wet, 0.0 if (self.muted or not self.playing) else self.wet_gain)
        np.copyto(out, wet)
        dry_target = self.dry_gain if self.monitor else 0.0
        if dry_target != 0.0 or not self._dry_ramp.silent:
            dry = self._old[:n]
            np.copyto(dry, inp)
            self._dry_ramp.apply(dry, dry_target)
            np.add(out, dry, out=out)
