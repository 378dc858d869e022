"""A rolling audio buffer addressed by absolute sample index (single writer, many readers).

The audio thread `write`s every block (two `np.copyto` calls at most, no allocation). Other
threads `read` any span that is still held: the reader copies, then checks that the writer has
not overwritten the span meanwhile (a seqlock without a lock), so a slow reader gets an error
instead of torn audio. The writer advances `written` only after its copy, so a write in
progress is invisible to that check: the oldest `guard_frames` (≥ the largest block) count as
no longer held.
"""

from __future__ import annotations

import numpy as np


class RingOverrun(RuntimeError):
    """The requested span is no longer (or not yet) held by the ring."""


class AudioRing:
    def __init__(self, capacity_frames: int, channels: int, guard_frames: int = 4096) -> None:
        if capacity_frames <= 2 * guard_frames or channels <= 0:
            raise ValueError("capacity_frames must exceed twice guard_frames, channels must be positive")
        self.capacity = capacity_frames
        self.guard = guard_frames
        self.channels = channels
        self.buffer = np.zeros((capacity_frames, channels), dtype=np.float32)
        self.written = 0
        """absolute index of the next frame to be written (= frames written so far)"""

    def write(self, block: np.ndarray) -> None:
        """Append a block [n ≤ guard_frames, channels] (audio thread; allocation-free)."""
        n = block.shape[0]
        start = self.written % self.capacity
        first = min(n, self.capacity - start)
        np.copyto(self.buffer[start:start + first], block[:first])
        if first < n:
            np.copyto(self.buffer[:n - first], block[first:])
        self.written += n

    def oldest(self) -> int:
        """Absolute index of the oldest frame still safely held."""
        return max(0, self.written - self.capacity + self.guard)

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Frames [start, stop) (absolute indices) as float32 [stop − start, channels]."""
        n = stop - start
        if n < 0 or n > self.capacity:
            raise ValueError(f"cannot read {n} frames from a ring of {self.capacity}")
        if stop > self.written or start < self.oldest():
            raise RingOverrun(f"frames [{start}, {stop}) are not held (ring holds [{self.oldest()}, {self.written}))")
        out = np.empty((n, self.channels), dtype=np.float32) if out is None else out
        s = start % self.capacity
        first = min(n, self.capacity - s)
        np.copyto(out[:first], self.buffer[s:s + first])
        if first < n:
            np.copyto(out[first:n], self.buffer[:n - first])
        if start < self.oldest():  # overwritten (or being overwritten) while we copied
            raise RingOverrun(f"frames from {start} were overwritten during the read")
        return out
