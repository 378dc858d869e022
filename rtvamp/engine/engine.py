"""The engine: audio core + transport + scheduler + a generation backend, behind one
`Engine.process(in_block, out_block, frame_time)` that every driver calls."""

from __future__ import annotations

from dataclasses import dataclass, field

from .core import AudioCore, CoreConfig
from .scheduler import Scheduler
from .transport import Quantize, Transport


@dataclass(frozen=True)
class EngineConfig:
    core: CoreConfig = field(default_factory=CoreConfig)
    bpm: float = 120.0
    beats_per_bar: int = 4
    loop_quantize: Quantize = Quantize.BAR
    safety_ms: float = 30.0
    """margin between a decision and the sample it takes effect at (covers one block + jitter)"""
    deadline_mode: bool = True
    """the worker commits early so a vamp lands on its target boundary; off for offline renders
    that wait for every job (then a vamp always runs all its steps and renders are
    deterministic)"""


class Engine:
    """`backend`: a started generation backend (rtvamp.engine.backend.LocalWorker or a remote
    one). `threaded=False` leaves the scheduler to the caller (`scheduler.poll()`), which the
    file driver uses for sample-exact offline renders."""

    def __init__(self, backend, config: EngineConfig = EngineConfig(), threaded: bool = True) -> None:
        self.config = config
        self.core = AudioCore(config.core)
        self.transport = Transport(config.core.sample_rate, config.bpm, config.beats_per_bar)
        self.scheduler = Scheduler(self.core, self.transport, backend, config.safety_ms, config.loop_quantize,
                                   config.deadline_mode)
        self.backend = backend
        self.process = self.core.process
        """the driver entry point: process(in_block [n, ch], out_block [n, ch], frame_time)"""
        self._threaded = threaded
        if threaded:
            self.scheduler.start()

    @property
    def sample_rate(self) -> int:
        return self.config.core.sample_rate

    @property
    def channels(self) -> int:
        return self.config.core.channels

    def close(self) -> None:
        if self._threaded:
            self.scheduler.close()
        self.backend.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
