"""`rtvamp serve`: the bridge driver — a DAW's audio blocks drive `Engine.process`.

Sockets (bridge/PROTOCOL.md), all bound by the engine, one owner thread each:

- **audio** ROUTER at the base port — thread ``rtvamp-bridge-audio``: session handshake and the
  stream of audio frames both ways. For each DAW block it calls ``engine.process`` (the engine
  never blocks) and sends the processed block back at once. DAW-clocked: the engine's clock
  advances exactly by the frames the DAW sends; the DAW's transport (tempo, bar, beat) drives
  the engine's grid through ``Transport.sync``. With ``ServeOptions.realtime`` (where
  permitted) it runs SCHED_FIFO at the lowest real-time priority, as does ZeroMQ's I/O
  thread: each reply is due within the client's latency.
- **control** ROUTER at base + 1 and **state** PUB at base + 2 — thread
  ``rtvamp-bridge-control``: triggers, parameters, looper commands, MIDI learn, bundles, and
  the state pushed ~10 Hz when it changed.

Loss and reordering: frames carry sequence numbers from 0. A frame that arrives early waits in
the jitter buffer; once the stream is ``jitter_blocks`` frames past a missing one, the missing
frame is concealed (the engine processes silence, the reply is flagged CONCEALED) so the
engine's clock stays on the DAW's timeline. The client plays the reply to the frame sent at
sample t at t + latency (latency = jitter_blocks × block_frames), and plays its own dry input
when a reply is late. Everything a peer sends that does not follow the protocol is counted in
``stats`` and dropped; nothing a peer sends can stop the engine.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, replace as dc_replace
from fractions import Fraction
from pathlib import Path

import msgspec
import numpy as np
import zmq

from .. import __version__
from ..engine.backend import JobChunk, JobResult, LocalWorker
from ..engine.engine import Engine
from ..engine.protocol import Progress
from ..engine.scheduler import SOURCES, Trigger as EngineTrigger, VampParams
from ..engine.transport import Quantize
from ..masks import PRESETS
from ..vamp import STEP_PRESETS
from . import wire
from .wire import (DEFAULT_ENDPOINT, Bye, Endpoints, Command, Failed, Flag, Forget, FrameHeader, GetState, Hello, JobInfo, Learn, LoadBundle,
                   Mapping, Midi, Notice, Ok, Reject, Set, State, StreamInfo, Subscribe, Subscribed, Trigger,
                   Welcome, WireError)

log = logging.getLogger("rtvamp.bridge")

MAX_GAP_BLOCKS = 64
"""a sequence jump larger than this restarts the numbering instead of concealing every block"""

MAX_SKIP_BLOCKS = 16
"""a jump ahead of the DAW's timeline by at most this many blocks may be a skip (an xrun) that
the engine's clock follows (AudioEndpoint._timeline); beyond, it is a locate"""

NOTICE_INTERVAL_S = 1.0
"""least seconds between two "no_session" notices to one peer"""

REALTIME_PRIORITY = 1
"""SCHED_FIFO priority of the audio thread and of ZeroMQ's I/O thread (ServeOptions.realtime): the
lowest real-time priority, below any audio host's threads, above every normal thread"""

FLOOD_PAUSE_S = 0.001
"""a real-time audio thread pauses this long after each 1024 messages of a flood, so that a peer
that floods the engine cannot starve the machine's normal threads"""

STAT_KEYS = ("frames", "processed", "concealed", "late", "duplicate", "reordered", "malformed", "oversized",
             "version", "rejected", "unknown_stream", "unauthenticated", "nonfinite", "send_dropped", "sessions",
             "sessions_replaced", "sessions_timed_out", "transport_syncs", "transport_ignored", "timeline_skips",
             "timeline_glitches", "requests", "control_errors", "triggers")
"""the counters in State.stats (frames / requests received, losses, rejections, sessions)"""


class BridgeError(ValueError):
    """A server that cannot start as configured (message for the user)."""


@dataclass(frozen=True)
class ServerKeys:
    """CURVE material of a server: its keypair and the folder of authorised client keys."""

    public: bytes
    secret: bytes
    authorized: Path

    @classmethod
    def load(cls, folder: Path) -> ServerKeys:
        """Keys written by `rtvamp keys` (server.key_secret, authorized/)."""
        import zmq.auth

        secret_file = folder / "server.key_secret"
        if not secret_file.is_file():
            raise BridgeError(f"{folder}: no server.key_secret (run `rtvamp keys --dir {folder}`)")
        public, secret = zmq.auth.load_certificate(secret_file)
        return cls(public, secret, folder / "authorized")


@dataclass(frozen=True)
class ServeOptions:
    bind: str = DEFAULT_ENDPOINT
    keys: ServerKeys | None = None
    """CURVE on every socket; required for a bind that is not loopback"""
    session_timeout_s: float = 2.0
    """a stream silent for this long ends (the client vanished)"""
    takeover_s: float = 0.5
    """another client's Hello replaces a stream only after it has been silent this long"""
    state_hz: float = 10.0
    realtime: bool = False
    """the audio thread and ZeroMQ's I/O thread run SCHED_FIFO at REALTIME_PRIORITY where this
    process may (Linux, RLIMIT_RTPRIO or CAP_SYS_NICE; `rtvamp serve --realtime`): a reply is due
    within the client's latency (2 blocks: 11.6 ms at 256 frames, 44.1 kHz), which normal threads
    on a loaded machine often miss. Off by default: real-time threads busy with a peer's flood
    take the CPU from everything else (FLOOD_PAUSE_S bounds it)"""


def realtime_permitted(priority: int = REALTIME_PRIORITY) -> bool:
    """Whether this process may run a thread SCHED_FIFO at `priority` (tried on a thread of its own)."""
    if not hasattr(os, "sched_setscheduler"):
        return False
    permitted: list[bool] = []

    def attempt() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))  # 0: this thread
            permitted.append(True)
        except OSError:
            permitted.append(False)

    thread = threading.Thread(target=attempt, name="rtvamp-realtime-check")
    thread.start()
    thread.join()
    return permitted[0]


class SwitchableBackend:
    """A LocalWorker shared by the scheduler thread and the control thread (a lock around
    every call), which `load` replaces by one serving another bundle while the engine runs.
    Job ids are its own, so ids of the two workers never meet in the scheduler; jobs in
    flight on the old worker end as failed. Fed input and streamed results pass through (a
    new worker's code stream starts at its first feed)."""

    supports_streaming = True

    def __init__(self, bundle: str | None = None, max_batch: int = 2, precision: str = "auto") -> None:
        self.max_batch, self.precision = max_batch, precision
        self._lock = threading.Lock()
        self._worker = LocalWorker(bundle, max_batch, precision=precision)
        self._ids: dict[int, int] = {}
        """inner (current worker) job id → outer id"""
        self._next = 1
        self._orphans: list[JobResult] = []

    @property
    def info(self):
        return self._worker.info

    @property
    def restarts(self) -> int:
        return self._worker.restarts

    @property
    def latencies(self):
        return self._worker.latencies

    def start(self, timeout_s: float | None = None):
        return self._worker.start(timeout_s)

    def submit(self, *args, **kwargs) -> int:
        with self._lock:
            inner = self._worker.submit(*args, **kwargs)
            outer, self._next = self._next, self._next + 1
            self._ids[inner] = outer
            return outer

    def cancel(self, job_id: int) -> None:
        with self._lock:
            for inner, outer in self._ids.items():
                if outer == job_id:
                    self._worker.cancel(inner)

    def feed(self, start_sample: int, mono: np.ndarray, sample_rate: int) -> None:
        with self._lock:
            self._worker.feed(start_sample, mono, sample_rate)

    def events(self, timeout_s: float = 0.0) -> list:
        """Events since the last call; waits up to `timeout_s` seconds *outside* the lock, so
        that submit, cancel and load from a control thread never starve behind this loop."""
        out = self._collect()
        if not out and timeout_s > 0:
            time.sleep(timeout_s)
            out = self._collect()
        return out

    def _collect(self) -> list:
        with self._lock:
            out, self._orphans = self._orphans, []
            for event in self._worker.events(0.0):
                if isinstance(event, Progress):
                    if event.job_id in self._ids:
                        out.append(msgspec.structs.replace(event, job_id=self._ids[event.job_id]))
                elif isinstance(event, JobChunk):
                    if event.job_id in self._ids:
                        out.append(dc_replace(event, job_id=self._ids[event.job_id]))
                elif isinstance(event, JobResult):
                    if event.job_id in self._ids:
                        out.append(dc_replace(event, job_id=self._ids.pop(event.job_id)))
                else:
                    out.append(event)
            return out

    def load(self, bundle: str) -> str:
        """Start a worker for `bundle` (seconds), then switch to it; returns its bundle name.
        Raises WorkerError/BundleError and keeps the current worker when it cannot start."""
        new = LocalWorker(bundle, self.max_batch, precision=self.precision)
        try:
            info = new.start()
        except BaseException:
            new.close()
            raise
        with self._lock:
            old, self._worker = self._worker, new
            self._orphans += [JobResult(outer, "failed", "the bundle changed", np.zeros((0, 0, 0), np.float32), 0,
                                        {}, 0.0, None) for outer in self._ids.values()]
            self._ids = {}
        old.close()
        return info.bundle

    def close(self) -> None:
        self._worker.close()


# -- audio ---------------------------------------------------------------------------------------

class _DawSync:
    """Keeps the engine's grid on the DAW's transport: `Transport.sync` when the DAW's tempo,
    meter or position jumps, or drifts by more than `TOLERANCE_BEATS` from the grid."""

    TOLERANCE_BEATS = 1e-3

    def __init__(self, engine: Engine, stats: dict[str, int]) -> None:
        self.transport = engine.transport
        self.scheduler = engine.scheduler
        self.rate = engine.sample_rate
        self.stats = stats
        self.anchor: tuple[int, float, float, int] | None = None
        """(engine sample, absolute beat, bpm, beats per bar) of the last sync"""

    def update(self, h: FrameHeader, engine_time: int) -> None:
        if h.flags & (Flag.TRANSPORT | Flag.PLAYING) != (Flag.TRANSPORT | Flag.PLAYING):
            return
        bpb = max(1, round(h.beats_per_bar))
        beat = h.bar * bpb + h.beat
        a = self.anchor
        if (a is not None and not h.flags & Flag.DISCONTINUITY and a[2] == h.tempo and a[3] == bpb
                and abs(a[1] + (engine_time - a[0]) * a[2] / (60.0 * self.rate) - beat) <= self.TOLERANCE_BEATS):
            return
        try:
            self.transport.sync(engine_time, Fraction(beat).limit_denominator(1_000_000), h.tempo)
        except ValueError:  # a tempo the engine refuses (outside 20–400 BPM)
            self.stats["transport_ignored"] += 1
            return
        self.transport.beats_per_bar = bpb
        self.scheduler.tempo_locked = True  # a recorded loop must not reset the DAW's tempo
        self.anchor = (engine_time, beat, h.tempo, bpb)
        self.stats["transport_syncs"] += 1


@dataclass
class _Session:
    peer: bytes
    stream_id: int
    hello: Hello
    latency: int
    last_heard: float
    next_seq: int = 0
    pending: dict | None = None
    """sequence → (header, samples, zmq frame kept alive) waiting for a missing frame"""
    highest: int = -1
    """the highest sequence received (a lower one arriving in time is reordered)"""
    concealed: deque | None = None
    """recently concealed sequences (a frame arriving for one is late, not a duplicate)"""
    last_sample_time: int | None = None
    """where the next frame continues the DAW's timeline"""
    skip: int = 0
    """the last frame jumped this far ahead; the next frame decides what it was (_timeline)"""

    def __post_init__(self) -> None:
        self.pending, self.concealed = {}, deque(maxlen=256)


class AudioEndpoint:
    """The audio ROUTER and its thread: handshakes, the jitter buffer, `engine.process`."""

    def __init__(self, context: zmq.Context, engine: Engine, endpoints: Endpoints, options: ServeOptions,
                 stats: dict[str, int], realtime: bool = False) -> None:
        self.engine = engine
        self.endpoints = endpoints
        self.options = options
        self.stats = stats
        self.realtime = realtime
        """this thread asks for SCHED_FIFO at REALTIME_PRIORITY (permitted: checked by the server)"""
        self.socket = _bind(context, zmq.ROUTER, endpoints.audio, options.keys)
        self.socket.setsockopt(zmq.SNDHWM, 256)
        self.monitor = _auth_monitor(self.socket, options.keys)
        self.session: _Session | None = None
        self.engine_time = engine.core.now
        self._sync = _DawSync(engine, stats)
        self._out = np.zeros((engine.config.core.max_block_frames, engine.channels), np.float32)
        self._silence = np.zeros_like(self._out)
        self._next_stream = int(time.time()) & 0xFFFF
        self._notified: dict[bytes, float] = {}
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="rtvamp-bridge-audio", daemon=True)

    @property
    def stream(self) -> StreamInfo | None:
        s = self.session
        if s is None:
            return None
        return StreamInfo(stream_id=s.stream_id, client=s.hello.client, sample_rate=s.hello.sample_rate,
                          block_frames=s.hello.block_frames, jitter_blocks=s.hello.jitter_blocks,
                          latency_samples=s.latency)

    @property
    def synced(self) -> bool:
        """True once the DAW's transport has set the engine's grid."""
        return self._sync.anchor is not None

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)
        if self.session is not None:
            self._send(self.session.peer, wire.encode_message(Bye(stream_id=self.session.stream_id,
                                                                  reason="shutdown")))
        if self.monitor is not None:
            self.socket.disable_monitor()
            self.monitor.close()
        self.socket.close()

    def _run(self) -> None:
        if self.realtime:
            try:
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(REALTIME_PRIORITY))
            except OSError as exc:
                log.info("bridge audio thread: no real-time scheduling (%s)", exc)
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        if self.monitor is not None:
            poller.register(self.monitor, zmq.POLLIN)
        while not self._stop.is_set():
            ready = dict(poller.poll(100))
            if self.socket in ready and self._drain() and self.realtime:
                time.sleep(FLOOD_PAUSE_S)  # a flood: a real-time thread must not starve the machine
            if self.monitor in ready:
                self.stats["unauthenticated"] += _drain_monitor(self.monitor)
            self._expire()

    def _drain(self) -> bool:
        """Handle what has arrived, up to 1024 messages → True when more are waiting (a flood)."""
        for _ in range(1024):  # then look at the clock and the monitor again
            try:
                parts = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return False
            try:
                self._on_message(parts)
            except WireError as exc:
                self.stats[exc.reason] += 1
            except Exception:  # a bug must cost one message, never the stream
                log.exception("bridge audio: message dropped")
                self.stats["malformed"] += 1
        return True

    def _on_message(self, parts: list) -> None:
        if len(parts) != 2:
            raise WireError("malformed", f"{len(parts) - 1} frames in one message")
        peer, frame = parts[0].bytes, parts[1]
        data = frame.buffer
        if wire.is_frame(data):
            header, samples = wire.decode_frame(data)
            self._on_frame(peer, header, samples, frame)
            return
        message = wire.decode_session(data)
        if isinstance(message, Hello):
            self._on_hello(peer, message)
        elif isinstance(message, Bye):
            s = self.session
            if s is not None and s.peer == peer and message.stream_id in (0, s.stream_id):
                self.session = None
            else:
                self.stats["unknown_stream"] += 1
        else:
            raise WireError("malformed", f"{type(message).__name__} is not for the engine")

    # -- sessions ------------------------------------------------------------------------------

    def _on_hello(self, peer: bytes, hello: Hello) -> None:
        reject = self._refusal(hello)
        if reject is not None:
            self.stats["version" if reject.code == "version" else "rejected"] += 1
            self._send(peer, wire.encode_message(reject))
            return
        old = self.session
        if old is not None and old.peer != peer and time.monotonic() - old.last_heard < self.options.takeover_s:
            self.stats["rejected"] += 1
            self._send(peer, wire.encode_message(Reject(code="busy", message="another client is streaming: retry "
                                                                             "once it has stopped")))
            return
        if old is not None:
            self.stats["sessions_replaced"] += 1
            if old.peer != peer:
                self._send(old.peer, wire.encode_message(Bye(stream_id=old.stream_id, reason="replaced")))
        self._next_stream = (self._next_stream + 1) & 0xFFFFFFFF
        latency = hello.jitter_blocks * hello.block_frames
        self.session = _Session(peer, self._next_stream, hello, latency, time.monotonic())
        self._sync.anchor = None  # a new timeline: sync on its first frame
        self.stats["sessions"] += 1
        self._send(peer, wire.encode_message(Welcome(
            version=wire.VERSION, stream_id=self._next_stream, sample_rate=hello.sample_rate,
            channels=hello.channels, block_frames=hello.block_frames, jitter_blocks=hello.jitter_blocks,
            latency_samples=latency, control_port=self.endpoints.port + 1, state_port=self.endpoints.port + 2,
            engine=f"rtvamp {__version__}")))

    def _refusal(self, hello: Hello) -> Reject | None:
        e = self.engine
        if wire.VERSION not in hello.versions:
            return Reject(code="version", message=f"the engine speaks version {wire.VERSION}, the client "
                                                  f"{hello.versions}", versions=list(wire.SUPPORTED_VERSIONS))
        if hello.sample_rate != e.sample_rate:
            return Reject(code="rate", message=f"the engine runs at {e.sample_rate} Hz, the client at "
                                               f"{hello.sample_rate} Hz (start `rtvamp serve --rate "
                                               f"{hello.sample_rate}`)")
        if hello.channels != e.channels:
            return Reject(code="channels", message=f"the engine has {e.channels} channels, the client "
                                                   f"{hello.channels} (`rtvamp serve --channels`)")
        if hello.block_frames > e.config.core.max_block_frames:
            return Reject(code="block", message=f"blocks of {hello.block_frames} frames exceed the engine's "
                                                f"{e.config.core.max_block_frames}")
        return None

    def _expire(self) -> None:
        s = self.session
        if s is not None and time.monotonic() - s.last_heard > self.options.session_timeout_s:
            self.stats["sessions_timed_out"] += 1
            self._send(s.peer, wire.encode_message(Bye(stream_id=s.stream_id, reason="timeout")))
            self.session = None

    # -- frames --------------------------------------------------------------------------------

    def _on_frame(self, peer: bytes, h: FrameHeader, samples: np.ndarray, frame: zmq.Frame) -> None:
        s = self.session
        if s is None or s.peer != peer or s.stream_id != h.stream_id:
            self.stats["unknown_stream"] += 1
            self._notify(peer, "no_session", "unknown stream: say Hello")
            return
        hello = s.hello
        if h.frames > hello.block_frames:
            raise WireError("oversized", f"{h.frames} frames exceed the session's {hello.block_frames}")
        if h.channels != hello.channels or h.sample_rate != hello.sample_rate:
            raise WireError("malformed", "channels or rate differ from the session's")
        self.stats["frames"] += 1
        s.last_heard = time.monotonic()
        seq = h.sequence
        if seq < s.next_seq:
            self.stats["late" if seq in s.concealed else "duplicate"] += 1
            return
        if seq in s.pending:
            self.stats["duplicate"] += 1
            return
        if seq - s.next_seq > MAX_GAP_BLOCKS:  # the client renumbered: start over from here
            self.stats["concealed"] += seq - s.next_seq
            s.pending.clear()
            s.next_seq = s.highest = seq
            h = dc_replace(h, flags=h.flags | Flag.DISCONTINUITY)
        if seq < s.highest:
            self.stats["reordered"] += 1
        s.highest = max(s.highest, seq)
        s.pending[seq] = (h, samples, frame)
        self._flush(s)

    def _flush(self, s: _Session) -> None:
        jitter = s.hello.jitter_blocks
        while True:
            item = s.pending.pop(s.next_seq, None)
            if item is not None:
                self._process(s, *item[:2])
            elif s.pending and max(s.pending) - s.next_seq >= jitter:
                self._conceal(s)
            else:
                return
            s.next_seq += 1

    def _conceal(self, s: _Session) -> None:
        """The frame `s.next_seq` is lost: process silence in its place (the DAW's block size)."""
        n = s.hello.block_frames
        t = s.last_sample_time if s.last_sample_time is not None else 0
        h = FrameHeader(s.stream_id, s.next_seq, t, n, s.hello.channels, s.hello.sample_rate,
                        flags=Flag.CONCEALED)
        s.concealed.append(s.next_seq)
        self.stats["concealed"] += 1
        self._process(s, h, self._silence[:n])

    def _process(self, s: _Session, h: FrameHeader, samples: np.ndarray) -> None:
        n = h.frames
        if not np.isfinite(samples).all():
            samples = np.nan_to_num(samples, nan=0.0, posinf=0.0, neginf=0.0)
            self.stats["nonfinite"] += 1
        h, sync = self._timeline(s, h)
        if sync:
            self._sync.update(h, self.engine_time)
        out = self._out[:n]
        self.engine.process(samples, out, self.engine_time)
        self.engine_time += n
        s.last_sample_time = h.sample_time + n
        self.stats["processed"] += 1
        transport = self.engine.transport
        bar, beat = transport.position(self.engine_time - n)
        reply = FrameHeader(s.stream_id, h.sequence, h.sample_time, n, h.channels, h.sample_rate,
                            wall_ns=time.time_ns(),
                            flags=(h.flags & (Flag.CONCEALED | Flag.PLAYING)) | Flag.TRANSPORT,
                            tempo=transport.bpm, bar=bar, beat=min(beat, 64.0),
                            beats_per_bar=float(transport.beats_per_bar))
        self._send(s.peer, wire.encode_frame(reply, out))

    def _timeline(self, s: _Session, h: FrameHeader) -> tuple[FrameHeader, bool]:
        """Where a frame sits on the DAW's timeline → (its header, whether it may sync the grid).

        A frame that continues the previous one is plain. A frame ahead of that by at most
        MAX_SKIP_BLOCKS blocks is judged by the next frame: when the next one continues from it,
        the DAW skipped those frames (a host's xrun: JACK skips whole cycles; frames the client
        dropped) and the engine's clock skips them too, processing silence, so that its clock,
        its grid, its loop's phase and a vamp already aimed stay on the DAW's timeline; when the
        next one continues from before the jump, this frame's position was misreported (a host
        that ran a cycle late and read the next cycle's transport) and is ignored. Any other
        jump is a locate or a loop: DISCONTINUITY, and the grid re-syncs."""
        expected = s.last_sample_time
        if expected is None or h.flags & Flag.CONCEALED:
            return h, True
        continuous = dc_replace(h, flags=h.flags & ~Flag.DISCONTINUITY)
        ahead, skipped, s.skip = h.sample_time - expected, s.skip, 0
        if skipped and ahead == -skipped:  # back where the timeline was: that position was wrong
            self.stats["timeline_glitches"] += 1
            return continuous, True
        if skipped and ahead >= 0:  # on from there: the DAW did skip those frames
            self._advance(skipped)
            self.stats["timeline_skips"] += 1
        if ahead == 0:
            return (continuous if skipped else h), True
        if 0 < ahead <= MAX_SKIP_BLOCKS * s.hello.block_frames:
            s.skip = ahead  # decided by the next frame
            return continuous, False
        return dc_replace(h, flags=h.flags | Flag.DISCONTINUITY), True  # the DAW located or looped

    def _advance(self, frames: int) -> None:
        """The engine's clock moves on by `frames` (silence in, the output dropped)."""
        while frames > 0:
            k = min(frames, self._silence.shape[0])
            self.engine.process(self._silence[:k], self._out[:k], self.engine_time)
            self.engine_time += k
            frames -= k

    def _notify(self, peer: bytes, code: str, message: str) -> None:
        now = time.monotonic()
        if now - self._notified.get(peer, -NOTICE_INTERVAL_S) < NOTICE_INTERVAL_S:
            return
        if len(self._notified) > 1024:
            self._notified.clear()
        self._notified[peer] = now
        self._send(peer, wire.encode_message(Notice(code=code, message=message)))

    def _send(self, peer: bytes, data: bytes) -> None:
        try:
            self.socket.send_multipart([peer, data], zmq.NOBLOCK)
        except zmq.ZMQError:  # peer gone or its queue full: the client conceals
            self.stats["send_dropped"] += 1


# -- control -------------------------------------------------------------------------------------

COMMANDS = ("record", "stop_record", "undo", "redo", "next", "previous", "clear", "tap", "cancel", "trigger")
"""what Command (and a MIDI mapping) can fire; "trigger" vamps with the current defaults"""

BOOL_PARAMS = ("overdub", "mute", "play")


class Controls:
    """Parameters, triggers, looper commands and MIDI learn, applied to the engine (the
    control thread's side; the audio thread never waits on any of it)."""

    def __init__(self, engine: Engine, stats: dict[str, int]) -> None:
        self.engine = engine
        self.stats = stats
        self.defaults: dict[str, wire.Value] = {
            "source": "input", "bars": 2, "quantize": "bar", "preset": VampParams.preset, "steps": "fast",
            "temperature": 1.0, "variations": 1, "seed": None, "top_p": None}
        self.gains = [0.0, 1.0]
        self.mappings: list[Mapping] = []
        self.learning: Learn | None = None
        self._midi_last: dict[tuple[str, int, int], int] = {}

    # -- parameters ----------------------------------------------------------------------------

    def params(self) -> dict[str, wire.Value]:
        core, s = self.engine.core, self.engine.scheduler
        return {**self.defaults, "dry": self.gains[0], "wet": self.gains[1], "overdub": core.overdubbing,
                "mute": core.muted, "play": core.playing, "bpm": self.engine.transport.bpm,
                "auto_every": s.auto_every_loops, "loop_quantize": s.loop_quantize.value}

    def set(self, name: str, value: wire.Value) -> wire.Value:
        """Validate and apply; returns the value in force. Raises ValueError with the reason."""
        e = self.engine
        if name in self.defaults:
            value = _check_default(name, value, e.backend)
            self.defaults[name] = value
        elif name in ("dry", "wet"):
            self.gains[name == "wet"] = _number(name, value, 0.0, 4.0)
            e.core.post("gains", *self.gains)
        elif name in BOOL_PARAMS:
            if not isinstance(value, bool):
                raise ValueError(f"{name} takes true or false")
            e.core.post(name, value)
        elif name == "bpm":
            value = _number(name, value, 20.0, 400.0)
            e.transport.set_tempo(value, e.core.now)
        elif name == "auto_every":
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError("auto_every takes a whole number of loops ≥ 1, or null")
            e.scheduler.auto_every_loops = value
        elif name == "loop_quantize":
            e.scheduler.loop_quantize = Quantize(_choice(name, value, [q.value for q in Quantize]))
        else:
            raise ValueError(f"unknown parameter {name!r}")
        return value

    def trigger(self, request: Trigger) -> int:
        """Vamp with the request's fields over the defaults → the engine's job id."""
        fields = {k: getattr(request, k) for k in self.defaults if hasattr(request, k)}
        merged = {k: _check_default(k, fields[k], self.engine.backend) if fields.get(k) is not None else v
                  for k, v in self.defaults.items()}
        params = VampParams(preset=merged["preset"], steps=merged["steps"], temperature=merged["temperature"],
                            top_p=merged["top_p"], variations=merged["variations"], seed=merged["seed"])
        params.step_counts()
        job = self.engine.scheduler.trigger(EngineTrigger(merged["source"], bars=merged["bars"],
                                                          quantize=Quantize(merged["quantize"]), params=params))
        self.stats["triggers"] += 1
        if job is None:
            raise ValueError(f"nothing to vamp yet ({merged['source']})")
        return job.id

    def command(self, name: str) -> wire.Value:
        s, core = self.engine.scheduler, self.engine.core
        if name == "trigger":
            return self.trigger(Trigger())
        if name == "record":
            return s.record()
        if name == "stop_record":
            return s.stop_record()
        if name == "tap":
            return self.engine.transport.tap(core.now)
        if name == "cancel":
            if s.active is not None:
                s.cancel(s.active)
            return None
        take = {"undo": s.undo, "redo": s.redo, "next": lambda: s.next_candidate(1),
                "previous": lambda: s.next_candidate(-1), "clear": s.clear}[name]()
        return take.id if take is not None else None

    # -- MIDI learn ----------------------------------------------------------------------------

    def learn(self, request: Learn) -> str:
        if request.target not in COMMANDS and request.target not in self.params():
            raise ValueError(f"unknown target {request.target!r}")
        if request.scale == "log" and not (request.min > 0 and request.max > 0):
            raise ValueError("a log scale needs min and max > 0")
        if request.number is None:
            self.learning = request
            return "armed"
        self._bind(request, request.number, request.channel)
        return "bound"

    def forget(self, target: str) -> int:
        before = len(self.mappings)
        self.mappings = [m for m in self.mappings if target not in ("*", m.target)]
        return before - len(self.mappings)

    def _bind(self, request: Learn, number: int, channel: int | None) -> None:
        mapping = Mapping(target=request.target, kind=request.kind, number=number, channel=channel,
                          mode=request.mode, min=request.min, max=request.max, scale=request.scale)
        self.mappings = [m for m in self.mappings if (m.kind, m.number, m.channel) !=
                         (mapping.kind, mapping.number, mapping.channel)] + [mapping]

    def midi(self, data: bytes) -> list[str]:
        """Apply a MIDI message to the mappings (or bind it when learning) → targets applied."""
        status = data[0]
        kind = {0xB0: "cc", 0x90: "note", 0x80: "note"}.get(status & 0xF0)
        if kind is None or len(data) < 3:
            return []
        channel, number, value = status & 0x0F, data[1] & 0x7F, data[2] & 0x7F
        if status & 0xF0 == 0x80:
            value = 0
        if self.learning is not None and self.learning.kind == kind:
            learn, self.learning = self.learning, None
            self._bind(learn, number, learn.channel if learn.channel is not None else channel)
            return [f"learned {learn.target}"]
        key = (kind, channel, number)
        previous = self._midi_last.get(key, 0)
        self._midi_last[key] = value
        applied = []
        for m in self.mappings:
            if m.kind == kind and m.number == number and m.channel in (None, channel):
                if self._apply(m, value, previous):
                    applied.append(m.target)
        return applied

    def _apply(self, m: Mapping, value: int, previous: int) -> bool:
        pressed, was_pressed = value >= 64, previous >= 64
        if m.target in COMMANDS:
            if pressed and not was_pressed:
                if m.target == "record" and m.mode == "toggle" and self.engine.core.recording:
                    self.command("stop_record")
                else:
                    self.command(m.target)
                return True
            return False
        if m.target in BOOL_PARAMS:
            if m.mode == "momentary":
                self.set(m.target, pressed)
            elif m.mode == "toggle":
                if not pressed or was_pressed:
                    return False
                self.set(m.target, not self.params()[m.target])
            else:
                self.set(m.target, pressed)
            return True
        x = value / 127.0
        number = m.min * (m.max / m.min) ** x if m.scale == "log" else m.min + (m.max - m.min) * x
        current = self.params()[m.target]
        self.set(m.target, int(round(number)) if isinstance(current, int) and not isinstance(current, bool)
                 else float(number))
        return True


def _number(name: str, value: wire.Value, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ValueError(f"{name} takes a number within {lo:g}–{hi:g}, got {value!r}")
    return float(value)


def _choice(name: str, value: wire.Value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} takes one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def _check_default(name: str, value: wire.Value, backend) -> wire.Value:
    """A trigger default, validated (ValueError with the reason)."""
    if name == "source":
        return _choice(name, value, SOURCES)
    if name == "quantize":
        return _choice(name, value, [q.value for q in Quantize])
    if name == "preset":
        return _choice(name, value, sorted(PRESETS))
    if name == "steps":
        if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 1000:
            return value
        return _choice(name, value, sorted(STEP_PRESETS))
    if name == "temperature":
        return _number(name, value, 1e-3, 100.0)
    if name == "top_p":
        return None if value is None else _number(name, value, 1e-3, 1.0)
    if name in ("bars", "variations", "seed"):
        if name == "seed" and value is None:
            return None
        hi = {"bars": 16, "variations": getattr(backend, "max_batch", 64), "seed": 2**62}[name]
        if isinstance(value, bool) or not isinstance(value, int) or not (0 if name == "seed" else 1) <= value <= hi:
            raise ValueError(f"{name} takes a whole number up to {hi}, got {value!r}")
        return value
    raise ValueError(f"unknown parameter {name!r}")


class ControlEndpoint:
    """The control ROUTER, the state PUB and their thread."""

    def __init__(self, context: zmq.Context, engine: Engine, audio: AudioEndpoint, endpoints: Endpoints,
                 options: ServeOptions, stats: dict[str, int]) -> None:
        self.engine = engine
        self.audio = audio
        self.options = options
        self.stats = stats
        self.controls = Controls(engine, stats)
        self.socket = _bind(context, zmq.ROUTER, endpoints.control, options.keys)
        self.monitor = _auth_monitor(self.socket, options.keys)
        self.pub = _bind(context, zmq.PUB, endpoints.state, options.keys)
        self.state_port = endpoints.port + 2
        self._last_state = b""
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="rtvamp-bridge-control", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)
        if self.monitor is not None:
            self.socket.disable_monitor()
            self.monitor.close()
        self.socket.close()
        self.pub.close()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        if self.monitor is not None:
            poller.register(self.monitor, zmq.POLLIN)
        period = 1.0 / self.options.state_hz
        next_push = time.monotonic()
        while not self._stop.is_set():
            ready = dict(poller.poll(max(1, int((next_push - time.monotonic()) * 1000))))
            if self.socket in ready:
                self._drain()
            if self.monitor in ready:
                self.stats["unauthenticated"] += _drain_monitor(self.monitor)
            if time.monotonic() >= next_push:
                next_push = time.monotonic() + period
                self._push()

    def _drain(self) -> None:
        for _ in range(256):
            try:
                parts = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(parts) < 2:
                self.stats["malformed"] += 1
                continue
            reply = self.handle(parts[-1])
            try:
                self.socket.send_multipart([parts[0], wire.encode_message(reply)], zmq.NOBLOCK)
            except zmq.ZMQError:
                self.stats["send_dropped"] += 1

    def handle(self, data: bytes) -> msgspec.Struct:
        """One request's bytes → its reply (never raises)."""
        self.stats["requests"] += 1
        try:
            request = wire.decode_request(data)
        except WireError as exc:
            self.stats[exc.reason] += 1
            return Failed(code="version" if exc.reason == "version" else "bad", message=str(exc))
        try:
            return self._dispatch(request)
        except ValueError as exc:
            self.stats["control_errors"] += 1
            return Failed(id=request.id, code="value", message=str(exc))
        except Exception as exc:  # the engine must outlive any request
            log.exception("control request failed")
            self.stats["control_errors"] += 1
            return Failed(id=request.id, code="internal", message=f"{type(exc).__name__}: {exc}")

    def _dispatch(self, r: wire.ControlRequest) -> msgspec.Struct:
        c = self.controls
        if isinstance(r, GetState):
            return self.state(r.id)
        if isinstance(r, Trigger):
            return Ok(id=r.id, result=c.trigger(r))
        if isinstance(r, Set):
            return Ok(id=r.id, result=c.set(r.name, r.value))
        if isinstance(r, Command):
            return Ok(id=r.id, result=c.command(r.name))
        if isinstance(r, Learn):
            return Ok(id=r.id, result=c.learn(r))
        if isinstance(r, Forget):
            return Ok(id=r.id, result=c.forget(r.target))
        if isinstance(r, Midi):
            return Ok(id=r.id, result=c.midi(r.data))
        if isinstance(r, Subscribe):
            return Subscribed(id=r.id, state_port=self.state_port, topic=wire.STATE_TOPIC,
                              state_hz=self.options.state_hz)
        if isinstance(r, LoadBundle):
            load = getattr(self.engine.backend, "load", None)
            if load is None:
                return Failed(id=r.id, code="busy", message="this engine's backend cannot change bundles")
            from ..bundle import BundleError, resolve_bundle
            from ..engine.backend import WorkerError
            try:
                return Ok(id=r.id, result=load(str(resolve_bundle(r.bundle))))
            except (BundleError, WorkerError) as exc:
                raise ValueError(str(exc)) from None
        raise ValueError(f"unhandled request {type(r).__name__}")

    def state(self, request_id: int = 0) -> State:
        e = self.engine
        core, s, t = e.core, e.scheduler, e.transport
        now = core.now
        bar, beat = t.position(now)
        take = s.history.current
        job = s.active
        return State(
            id=request_id, now=now, sample_rate=e.sample_rate, channels=e.channels, bpm=t.bpm,
            beats_per_bar=t.beats_per_bar, bar=bar, beat=beat, synced=self.audio.synced,
            playing=core.playing, recording=core.recording, overdubbing=core.overdubbing, muted=core.muted,
            loop_samples=core.loop_length, take=take.id if take else None, takes=len(s.history.takes),
            job=None if job is None else JobInfo(id=job.id, source=job.trigger.source, status=job.status,
                                                  stage=job.stage, fraction=job.fraction, target=job.target,
                                                  swap_at=job.swap_at),
            params=self.controls.params(), mappings=list(self.controls.mappings),
            learning=self.controls.learning.target if self.controls.learning else None,
            stream=self.audio.stream, stats=dict(self.stats), messages=list(s.messages[-5:]))

    def _push(self) -> None:
        data = wire.encode_message(self.state())
        if data != self._last_state:
            self._last_state = data
            try:
                self.pub.send_multipart([wire.STATE_TOPIC, data], zmq.NOBLOCK)
            except zmq.ZMQError:
                self.stats["send_dropped"] += 1


# -- sockets -------------------------------------------------------------------------------------

def _bind(context: zmq.Context, kind: int, endpoint: str, keys: ServerKeys | None) -> zmq.Socket:
    sock = context.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, wire.MAX_MESSAGE_BYTES)
    if keys is not None:
        sock.curve_secretkey = keys.secret
        sock.curve_publickey = keys.public
        sock.curve_server = True
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        sock.close()
        raise BridgeError(f"cannot bind {endpoint}: {exc}") from None
    return sock


_AUTH_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def _auth_monitor(sock: zmq.Socket, keys: ServerKeys | None) -> zmq.Socket | None:
    """A monitor of failed CURVE handshakes (only when CURVE is on)."""
    return sock.get_monitor_socket(_AUTH_EVENTS) if keys is not None else None


def _drain_monitor(monitor: zmq.Socket) -> int:
    from zmq.utils.monitor import recv_monitor_message

    count = 0
    while True:
        try:
            event = recv_monitor_message(monitor, zmq.NOBLOCK)
        except zmq.Again:
            return count
        if event["event"] & _AUTH_EVENTS:
            count += 1


class BridgeServer:
    """The bridge driver around a running engine: `start()`, then `close()`.

    `engine`: an Engine whose only driver is this server (its clock follows the DAW). For a
    non-loopback bind `options.keys` is required (CURVE on every socket, clients authorised
    by the public keys in ``keys.authorized``)."""

    def __init__(self, engine: Engine, options: ServeOptions = ServeOptions()) -> None:
        self.endpoints = self.check(options)
        self.engine = engine
        self.options = options
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self.context = zmq.Context()
        self.realtime = options.realtime and realtime_permitted()
        """the audio thread and ZeroMQ's I/O thread run SCHED_FIFO (ServeOptions.realtime)"""
        if self.realtime:  # before the first socket starts the I/O thread; libzmq aborts if it may not
            self.context.set(zmq.THREAD_SCHED_POLICY, os.SCHED_FIFO)
            self.context.set(zmq.THREAD_PRIORITY, REALTIME_PRIORITY)
        log.info("bridge: real-time scheduling %s", "on (SCHED_FIFO %d)" % REALTIME_PRIORITY if self.realtime
                 else "off" if not options.realtime else "not permitted (normal threads)")
        self._auth = None
        try:
            if options.keys is not None:
                from zmq.auth.thread import ThreadAuthenticator

                self._auth = ThreadAuthenticator(self.context)
                self._auth.start()
                self._auth.configure_curve(domain="*", location=str(options.keys.authorized))
            self.audio = AudioEndpoint(self.context, engine, self.endpoints, options, self.stats, self.realtime)
            self.control = ControlEndpoint(self.context, engine, self.audio, self.endpoints, options, self.stats)
        except BaseException:
            self._close_context()
            raise

    @staticmethod
    def check(options: ServeOptions) -> Endpoints:
        """The endpoints of `options`, or BridgeError when they may not be served (a bind off
        loopback without CURVE keys)."""
        endpoints = Endpoints.parse(options.bind)
        if not endpoints.loopback and options.keys is None:
            raise BridgeError(f"refusing to bind {options.bind} without CURVE keys: anyone on the network could "
                              "drive the engine. Run `rtvamp keys`, then `rtvamp serve --keys DIR`, or bind "
                              "tcp://127.0.0.1:PORT")
        if options.keys is not None and not zmq.has("curve"):
            raise BridgeError("this libzmq has no CURVE support")
        return endpoints

    def start(self) -> BridgeServer:
        self.audio.start()
        self.control.start()
        return self

    def close(self) -> None:
        self.control.close()
        self.audio.close()
        self._close_context()

    def _close_context(self) -> None:
        if self._auth is not None:
            self._auth.stop()
        self.context.destroy(linger=0)

    def __enter__(self) -> BridgeServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
