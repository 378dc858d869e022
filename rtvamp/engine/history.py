"""Loop takes and the variation history: audition candidates, undo/redo, recall any take."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Take:
    """One loop: recorded, overdubbed, or a vamp candidate. audio float32 [n_samples, channels]
    at the engine rate."""

    id: int
    audio: np.ndarray = field(repr=False)
    source: str
    """"recorded", "overdub" or "vamp" """
    parent: int | None = None
    trigger: int | None = None
    candidate: int = 0
    seed: int | None = None
    preset: str | None = None
    bars: int | None = None

    @property
    def n_samples(self) -> int:
        return self.audio.shape[0]


class LoopHistory:
    """Every take, plus a timeline of the takes that were current (undo/redo walk it).

    A new take (recorded or a vamp result) drops the redo branch like an editor does; switching
    between the candidates of one trigger replaces the current timeline entry.
    """

    def __init__(self) -> None:
        self.takes: dict[int, Take] = {}
        self._ids = itertools.count(1)
        self._timeline: list[int] = []
        self._pos = -1

    @property
    def current(self) -> Take | None:
        return self.takes[self._timeline[self._pos]] if self._pos >= 0 else None

    def _push(self, take: Take) -> Take:
        self._timeline = self._timeline[:self._pos + 1] + [take.id]
        self._pos = len(self._timeline) - 1
        return take

    def add(self, audio: np.ndarray, source: str, make_current: bool = True, **meta) -> Take:
        take = Take(next(self._ids), audio, source, **meta)
        self.takes[take.id] = take
        return self._push(take) if make_current else take

    def add_candidates(self, audios: list[np.ndarray], trigger: int, parent: int | None,
                       seeds: list[int], preset: str, bars: int | None) -> list[Take]:
        """The K candidates of one vamp; the first becomes current."""
        takes = [self.add(a, "vamp", make_current=False, parent=parent, trigger=trigger, candidate=k,
                          seed=s, preset=preset, bars=bars) for k, (a, s) in enumerate(zip(audios, seeds))]
        self._push(takes[0])
        return takes

    def siblings(self, take: Take) -> list[Take]:
        if take.trigger is None:
            return [take]
        return sorted((t for t in self.takes.values() if t.trigger == take.trigger), key=lambda t: t.candidate)

    def step_candidate(self, step: int) -> Take | None:
        """Audition the next (+1) or previous (−1) candidate of the current take's trigger."""
        take = self.current
        if take is None:
            return None
        group = self.siblings(take)
        if len(group) == 1:
            return None
        chosen = group[(group.index(take) + step) % len(group)]
        self._timeline[self._pos] = chosen.id
        return chosen

    def undo(self) -> Take | None:
        if self._pos <= 0:
            return None
        self._pos -= 1
        return self.current

    def redo(self) -> Take | None:
        if self._pos >= len(self._timeline) - 1:
            return None
        self._pos += 1
        return self.current

    def recall(self, take_id: int) -> Take:
        if take_id not in self.takes:
            raise KeyError(f"no take {take_id}")
        return self._push(self.takes[take_id])

    def clear(self) -> None:
        self._timeline, self._pos = [], -1
