"""The control half of the engine: triggers become jobs, results become swaps at a boundary.

Runs on its own thread (never the audio thread). Everything time-related is decided in *engine
samples* (the audio clock), so a file-driven render is sample-exact and deterministic, and a
live one swaps exactly on the grid. Rules (docs/realtime.md rule 3):
- a result is swapped in at the job's target boundary if it arrives in time, else at the first
  boundary after it arrived (quantised the same way); until then the current loop keeps playing;
- a streamed result (a backend with `supports_streaming`) is committed at its first piece: to
  the target boundary when the worker's estimate says the decoder stays ahead of playback
  from there (with a margin), else to the first boundary from which it does. Its buffer starts
  as a copy of the loop playing, so a piece that is late after all plays the old loop, never
  silence; a committed job is not cancelled by a newer trigger;
- a newer trigger cancels the job in flight;
- the deadline given to the worker is the time to the target boundary, minus a safety margin;
- continuous encoding: every FEED_INTERVAL_S the input heard since the last feed goes to the
  worker (`backend.feed`), which keeps its codes; an input trigger names its window's place in
  that stream so the worker need not encode it.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass, field, replace

import numpy as np

from ..masks import DEFAULT_PRESET
from ..vamp import resolve_steps
from .backend import Event, JobChunk, JobResult, WorkerLost
from .core import AudioCore
from .protocol import Progress
from .history import LoopHistory, Take
from .transport import Quantize, Transport

log = logging.getLogger(__name__)

FEED_INTERVAL_S = 0.5
"""seconds of input gathered before it is fed to the worker's continuous encoder (each feed
re-encodes the encoder's reach of context, so fewer, longer feeds cost less)"""

STREAM_MARGIN = 0.25
"""fraction of the worker's remaining-decode estimate kept in hand when committing a stream"""

SOURCES = ("input", "loop", "output")
"""What a trigger vamps: the last N bars of the input (retrospective capture), the current
loop, or the last N bars of the output (feedback)."""


def raise_thread_priority(priority: int = 1) -> bool:
    """Best effort: make the calling thread SCHED_FIFO at a low real-time priority.

    The audio callback needs the GIL; a control thread that holds it and is then preempted by
    another process (the worker, a compiler, a browser) makes the callback wait. At real-time
    priority 1 — below the audio thread, above every normal process — a control thread runs its
    short bursts to the end. False where the system does not allow it (no privilege)."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
        return True
    except (AttributeError, OSError):
        return False


@dataclass(frozen=True)
class VampParams:
    """Performer-level vamp parameters (see rtvamp.vamp.VampSettings.make)."""

    preset: str = DEFAULT_PRESET
    steps: str | int = "fast"
    c2f_steps: int | None = None
    temperature: float = 1.0
    top_p: float | None = None
    variations: int = 1
    seed: int | None = None
    """None: a fresh seed per trigger (seed counter)"""
    periodic_prompt: int | None = None
    upper_codebook_mask: int | None = None
    mask_density: float | None = None
    """overrides of the mask preset (None = the preset's own value)"""

    def step_counts(self) -> tuple[int, int]:
        return resolve_steps(self.steps, self.c2f_steps)


@dataclass(frozen=True)
class Trigger:
    source: str = "input"
    bars: int = 2
    quantize: Quantize = Quantize.BAR
    params: VampParams = field(default_factory=VampParams)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"unknown trigger source {self.source!r} ({', '.join(SOURCES)})")
        if not 1 <= self.bars <= 16:
            raise ValueError("bars must be within 1–16")


@dataclass
class JobState:
    id: int
    trigger: Trigger
    backend_id: int
    window: tuple[int, int]
    target: int
    """engine sample of the boundary the result should land on"""
    submitted_sample: int
    seeds: list[int]
    parent: int | None
    stage: str = "queued"
    fraction: float = 0.0
    status: str = "running"
    """running, ok, cancelled, failed"""
    swap_at: int | None = None
    takes: list[Take] | None = None
    """a streamed result's takes, filled piece by piece (None until the first piece)"""
    error: str = ""
    seconds: dict = field(default_factory=dict)
    wall_latency_s: float = 0.0
    """wall seconds from the trigger to the whole result"""
    first_piece_s: float = 0.0
    """wall seconds from the trigger to a streamed result's first piece (0: not streamed)"""
    triggered_at: float = field(default_factory=time.perf_counter)
    """time.perf_counter() at the trigger"""


class Scheduler:
    """Triggers, looper commands and the job loop. `backend` has submit/cancel/events/close
    (rtvamp.engine.backend)."""

    def __init__(self, core: AudioCore, transport: Transport, backend, safety_ms: float = 30.0,
                 loop_quantize: Quantize = Quantize.BAR, deadline_mode: bool = True) -> None:
        self.core = core
        self.transport = transport
        self.backend = backend
        self.history = LoopHistory()
        self.sample_rate = core.config.sample_rate
        self.safety = int(safety_ms * self.sample_rate / 1000)
        self.loop_quantize = loop_quantize
        self.deadline_mode = deadline_mode
        self.jobs: dict[int, JobState] = {}
        self.active: JobState | None = None
        self.auto_every_loops: int | None = None
        self.auto_trigger = Trigger(source="loop")
        self.loop_start_bar = 0
        self.loop_bars = 1
        self.tempo_locked = False
        self.latency = 0
        """round-trip latency compensation, samples: what the performer played in time with the
        grid arrives this much later in the input (set from the sound card's reported latency)"""
        self.messages: list[str] = []
        """human-readable notices for the UI (worker lost, job failed, …), newest last"""
        self._lock = threading.RLock()
        self._backend_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._seeds = itertools.count(1)
        self._by_backend: dict[int, JobState] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_auto_sample: int | None = None
        self.events_log: list[tuple] = []
        """(kind, sample, info) for the session log: trigger, swap, record, …"""
        self.realtime = True
        """False when the clock waits for jobs (offline renders): streamed results are then
        committed to their target, whatever the decoder's speed, and nothing is fed (windows
        are encoded on the trigger path, so a render never depends on the worker's pace)"""
        self.streaming = bool(getattr(backend, "supports_streaming", False))
        """the backend takes fed input and streams results"""
        self._fed_until: int | None = None
        self._feed_every = int(FEED_INTERVAL_S * self.sample_rate)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="rtvamp-scheduler", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        raise_thread_priority()
        while not self._stop.is_set():
            try:
                self.poll(timeout_s=0.01)
            except Exception as exc:  # the control thread must outlive any single bad event
                log.exception("scheduler error")
                self.note(f"error: {exc}")
                self._stop.wait(0.5)

    def poll(self, timeout_s: float = 0.0) -> None:
        """Handle backend events, audio-thread events and automatic triggers (scheduler thread,
        or the file driver's thread in offline renders)."""
        with self._backend_lock:  # ZeroMQ sockets are not thread-safe: one caller at a time,
            events = self.backend.events(0.0)  # and never waiting inside the lock (a trigger
        if not events and timeout_s > 0:       # from another thread would starve behind us)
            self._stop.wait(timeout_s)
            with self._backend_lock:
                events = self.backend.events(0.0)
        for event in events:
            self._on_backend_event(event)
        while self.core.events:
            self._on_core_event(self.core.events.popleft())
        self._feed()
        self._auto()

    def _feed(self, force: bool = False) -> None:
        """Send the input heard since the last feed to the worker's continuous encoder (at
        least FEED_INTERVAL_S of it unless `force`)."""
        if not self.streaming or not self.realtime:
            return
        now, ring = self.core.now, self.core.input_ring
        start = now if self._fed_until is None else max(self._fed_until, ring.oldest())
        if now <= start or (not force and now - start < self._feed_every):
            if self._fed_until is None:
                self._fed_until = now
            return
        mono = ring.read(start, now).mean(axis=1, dtype=np.float32)
        with self._backend_lock:
            self.backend.feed(start, mono, self.sample_rate)
        self._fed_until = now

    def note(self, text: str) -> None:
        """A notice for the performer (shown by the live view, logged)."""
        log.info(text)
        self.messages.append(text)
        del self.messages[:-20]

    # -- triggers and jobs ----------------------------------------------------------------

    def trigger(self, trigger: Trigger, now: int | None = None) -> JobState | None:
        """Start a vamp. Returns its job (None if there is nothing to vamp yet)."""
        with self._lock:
            now = self.core.now if now is None else now
            window_audio, window = self._window(trigger, now)
            if window_audio is None:
                self.note(f"nothing to vamp yet ({trigger.source})")
                return None
            target = self._target(now + self.safety, trigger.quantize)
            p = trigger.params
            first_seed = p.seed if p.seed is not None else next(self._seeds) * 1000
            seeds = [first_seed + k for k in range(p.variations)]
            deadline_s = max(0.0, (target - now - self.safety) / self.sample_rate) if self.deadline_mode else None
            if self.active is not None and self.active.status == "running" and self.active.takes is None:
                self.cancel(self.active)  # (a committed stream plays on; this job queues behind it)
            beat_times = self._beat_times(window)
            coarse_steps, c2f_steps = p.step_counts()
            streaming = {}
            if self.streaming:
                streaming["stream"] = True
                if trigger.source == "input" and self.realtime:  # (offline: upstream's encode, so
                    self._feed(force=True)  # a render never depends on how far the worker got)
                    streaming["window_start"] = window[0]
            with self._backend_lock:
                backend_id = self.backend.submit(
                    window_audio, self.sample_rate, preset=p.preset, coarse_steps=coarse_steps,
                    c2f_steps=c2f_steps, temperature=p.temperature, top_p=p.top_p, seeds=seeds,
                    beat_times_s=beat_times, deadline_s=deadline_s, periodic_prompt=p.periodic_prompt,
                    upper_codebook_mask=p.upper_codebook_mask, mask_density=p.mask_density, **streaming)
            current = self.history.current
            job = JobState(next(self._ids), trigger, backend_id, window, target, now, seeds,
                           current.id if current else None)
            self.jobs[job.id] = job
            self._by_backend[backend_id] = job
            self.active = job
            self.events_log.append(("trigger", now, {"job": job.id, "source": trigger.source,
                                                      "bars": trigger.bars, "target": target}))
            return job

    def cancel(self, job: JobState) -> None:
        with self._lock:
            if job.status == "running":
                with self._backend_lock:
                    self.backend.cancel(job.backend_id)
                job.status = "cancelled"

    def _window(self, trigger: Trigger, now: int) -> tuple[np.ndarray | None, tuple[int, int]]:
        if trigger.source == "loop":
            take = self.history.current
            if take is None:
                return None, (now, now)
            start = self.transport.bar_sample(self.loop_start_bar)  # the loop's phase 0 on the grid
            return take.audio, (start, start + take.n_samples)
        start, stop = self.transport.last_bars(now, trigger.bars)
        if trigger.source == "input":
            start, stop = start + self.latency, stop + self.latency
            if stop > now:  # the compensated window has not fully arrived: take the bars before
                start, stop = self.transport.last_bars(now - self.latency, trigger.bars)
                start, stop = start + self.latency, stop + self.latency
        ring = self.core.input_ring if trigger.source == "input" else self.core.output_ring
        if start < ring.oldest() or stop <= start:
            return None, (start, stop)
        return ring.read(start, stop), (start, stop)

    def _beat_times(self, window: tuple[int, int]) -> list[float]:
        """Beat positions inside the window, in seconds from its start (for follow-beat masks)."""
        start, stop = window
        first = int(np.ceil(float(self.transport.beat_at(start))))
        times = []
        beat = first
        while (s := self.transport.beat_sample(beat)) < stop:
            times.append((s - start) / self.sample_rate)
            beat += 1
        return times

    def _target(self, earliest: int, quantize: Quantize) -> int:
        return self.transport.next_boundary(earliest, quantize, self.loop_start_bar, self.loop_bars)

    def _on_backend_event(self, event: Event) -> None:
        if isinstance(event, Progress):
            job = self._by_backend.get(event.job_id)
            if job is not None:
                job.stage, job.fraction = event.stage, event.fraction
        elif isinstance(event, JobChunk):
            self._on_chunk(event)
        elif isinstance(event, JobResult):
            self._on_result(event)
        elif isinstance(event, WorkerLost):
            self.note(f"worker lost ({event.reason}); reconnecting or starting a new one")

    def _on_result(self, result: JobResult) -> None:
        with self._lock:
            job = self._by_backend.pop(result.job_id, None)
            if job is None:
                return
            job.wall_latency_s = result.latency_s
            job.seconds = dict(result.seconds)
            if result.status != "ok":
                job.status = result.status if job.status != "cancelled" else "cancelled"
                job.error = result.error
                if result.status == "failed":
                    self.note(f"vamp {job.id} failed: {result.error}")
                return
            if job.status == "cancelled" and job.takes is None:
                return
            job.status = "ok"
            if job.takes is not None:  # streamed: already playing from its buffers
                for take, audio in zip(job.takes, result.audio):
                    take.audio[:] = audio  # (the same samples the pieces brought)
                return
            takes = self._add_takes(job, [np.ascontiguousarray(a, dtype=np.float32) for a in result.audio])
            now = self.core.now
            at = job.target if job.target >= now + self.safety else self._target(now + self.safety, job.trigger.quantize)
            job.swap_at = at
            self._swap_to(takes[0], at)

    def _add_takes(self, job: JobState, candidates: list[np.ndarray]) -> list[Take]:
        parent = self.history.takes.get(job.parent) if job.parent is not None else None
        bars = parent.bars if job.trigger.source == "loop" and parent is not None else job.trigger.bars
        return self.history.add_candidates(candidates, job.id, job.parent, job.seeds, job.trigger.params.preset, bars)

    def _on_chunk(self, chunk: JobChunk) -> None:
        """A piece of a streamed result: the first one commits the swap (see the module
        docstring); every one is written into the takes' buffers, which may be playing."""
        with self._lock:
            job = self._by_backend.get(chunk.job_id)
            if job is None or (job.status != "running" and job.takes is None):
                return
            if job.takes is None:
                job.first_piece_s = time.perf_counter() - job.triggered_at
                fill = self._playing_material(chunk.total_samples)
                job.takes = self._add_takes(job, [fill.copy() for _ in range(chunk.audio.shape[0])])
                self._write_piece(job, chunk)
                now = self.core.now
                lead_s = 0.0 if not self.realtime else \
                    max(0.0, chunk.eta_s - chunk.total_samples / self.sample_rate) + STREAM_MARGIN * chunk.eta_s
                earliest = now + self.safety + int(lead_s * self.sample_rate)
                at = job.target if job.target >= earliest else self._target(earliest, job.trigger.quantize)
                job.swap_at = at
                self._swap_to(job.takes[0], at)
            else:
                self._write_piece(job, chunk)

    @staticmethod
    def _write_piece(job: JobState, chunk: JobChunk) -> None:
        for take, audio in zip(job.takes, chunk.audio):
            take.audio[chunk.offset:chunk.offset + audio.shape[0]] = audio

    def _playing_material(self, n_samples: int) -> np.ndarray:
        """float32 [n_samples, channels]: the current loop repeated (silence without one), what
        a streamed take plays where a piece comes late."""
        current = self.history.current
        if current is None or current.audio.shape[0] == 0:
            return np.zeros((n_samples, self.core.config.channels), np.float32)
        return np.resize(current.audio, (n_samples, current.audio.shape[1])).astype(np.float32)

    def _swap_to(self, take: Take, at: int) -> None:
        self.core.post("swap", at, take.audio, at)
        self.loop_bars = take.bars or self.loop_bars
        self.loop_start_bar = self.transport.position(at)[0]
        self.events_log.append(("swap", at, {"take": take.id}))

    def job_pending_before(self, sample: int) -> JobState | None:
        """The running job whose target is before `sample` (the file driver waits for it)."""
        job = self.active
        if job is not None and job.status == "running" and job.target < sample:
            return job
        return None

    # -- looper ---------------------------------------------------------------------------

    def _boundary(self, quantize: Quantize | None = None) -> int:
        return self._target(self.core.now + self.safety, quantize or self.loop_quantize)

    def record(self, quantize: Quantize | None = None) -> int:
        """Start capturing a loop at the next boundary (input taken `latency` samples later)."""
        at = self._boundary(quantize)
        self.core.post("record", at + self.latency)
        self.events_log.append(("record", at, {}))
        return at

    def stop_record(self, quantize: Quantize | None = None) -> int:
        """End the loop at the next boundary; it plays from there, in phase with the grid."""
        at = self._boundary(quantize)
        self.core.post("stop_record", at + self.latency, at)
        return at

    def load_loop(self, audio: np.ndarray, bars: int | None = None, quantize: Quantize | None = None) -> Take:
        """Play a loop from elsewhere (a file, a saved take) from the next boundary."""
        audio = np.ascontiguousarray(audio, dtype=np.float32)
        if audio.ndim != 2 or audio.shape[1] != self.core.config.channels or audio.shape[0] == 0:
            raise ValueError(f"a loop must be float32 [n > 0, {self.core.config.channels}], got {audio.shape}")
        bars = bars or max(1, round(audio.shape[0] / float(self.transport.samples_per_bar())))
        take = self.history.add(audio, "loaded", bars=bars)
        self.select(take, quantize)
        return take

    def _on_core_event(self, event: tuple) -> None:
        if event[0] == "recorded":
            _, start, stop, view = event
            start, stop = start - self.latency, stop - self.latency  # back on the grid
            audio = view.copy()
            self.core.post("rebind", view, audio)
            bars = max(1, round(audio.shape[0] / float(self.transport.samples_per_bar())))
            if not self.tempo_locked:  # the first loop sets the tempo: it is exactly `bars` bars
                try:
                    bpm = self.transport.tempo_from_loop(start, audio.shape[0], bars)
                    self.tempo_locked = True
                    self.note(f"tempo {bpm:.2f} BPM from the first loop ({bars} bars)")
                except ValueError as exc:
                    self.note(f"tempo unchanged: {exc}")
            self.history.add(audio, "recorded", bars=bars)
            self.loop_bars = bars
            self.loop_start_bar = self.transport.position(stop)[0]
            self.events_log.append(("recorded", stop, {"start": start, "samples": audio.shape[0]}))
        elif event[0] == "swapped":
            self.events_log.append(("swapped", event[1], {}))

    def select(self, take: Take | None, quantize: Quantize | None = None) -> Take | None:
        """Swap to a take from the history at the next boundary (undo/redo/candidates/recall)."""
        if take is not None:
            self._swap_to(take, self._boundary(quantize))
        return take

    def undo(self) -> Take | None:
        return self.select(self.history.undo())

    def redo(self) -> Take | None:
        return self.select(self.history.redo())

    def next_candidate(self, step: int = 1) -> Take | None:
        return self.select(self.history.step_candidate(step))

    def recall(self, take_id: int) -> Take:
        return self.select(self.history.recall(take_id))

    def clear(self) -> None:
        self.core.post("swap", self._boundary(Quantize.OFF), None, 0)
        self.history.clear()
        self.tempo_locked = False

    # -- automatic triggers ---------------------------------------------------------------

    def _auto(self) -> None:
        if not self.auto_every_loops or self.history.current is None:
            self._next_auto_sample = None
            return
        now = self.core.now
        if self._next_auto_sample is None:
            self._next_auto_sample = now + self.auto_every_loops * self.history.current.n_samples
        if now >= self._next_auto_sample:
            self._next_auto_sample = None
            self.trigger(replace(self.auto_trigger, quantize=Quantize.LOOP), now)
