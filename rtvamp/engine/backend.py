"""The engine side of generation: submit jobs to a worker, collect progress and results.

The scheduler thread (never the audio callback) owns a backend object and calls `submit`,
`cancel` and `events` on it; the object is not thread-safe. Backends (one interface,
:class:`WorkerBackend`; the engine tells them apart only by latency):

- :class:`LocalWorker` runs the worker as a child process on an ipc endpoint and restarts it
  when it dies or goes silent;
- :class:`RemoteWorker` talks to ``rtvamp worker`` on another machine over tcp (CURVE keys),
  and hands the jobs in flight to a local fallback when that worker is lost;
- ``rtvamp.cluster.backend.RayBackend`` submits to a Ray Serve pool.

Each backend measures its transfer overhead (submit → result wall time minus the worker's own
wall time) and takes it off the deadline it sends, so the worker's deadline mode plans for the
time the result still needs to travel.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, Union

import msgspec
import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from .keys import HANDSHAKE_FAILURES, CurveKeys, KeyPair, handshake_failure, is_loopback, secure_client
from .protocol import (PROTOCOL_VERSION, Cancel, Chunk, Connect, Feed, Heartbeat, Hello, Job, Progress, ProtocolError,
                       Reply, Request, Result, Shutdown, WorkerInfo, decode_reply, encode)

log = logging.getLogger(__name__)

HEARTBEAT_TIMEOUT_S = 2.0
"""a worker not heard from for this many seconds is lost"""

START_TIMEOUT_S = 60.0
"""seconds a starting worker may take to load its bundle, warm up and say Hello"""

CONNECT_TIMEOUT_S = 10.0
"""seconds a remote worker (already running) may take to answer Connect with Hello"""

OVERHEAD_WINDOW = 16
"""recent jobs whose median transfer overhead is taken off the next job's deadline"""


class WorkerError(RuntimeError):
    """A worker that cannot be started or reached, refuses our keys, or speaks another protocol."""


@dataclass(frozen=True)
class WorkerLost:
    """The worker died or went silent; its in-flight jobs fail (or fall back) and a new one is
    starting (or being reconnected)."""

    reason: str


@dataclass(frozen=True)
class JobResult:
    """The end of a job, as the scheduler sees it."""

    job_id: int
    status: str
    """"ok", "cancelled" or "failed" """
    error: str
    audio: np.ndarray
    """float32 [candidates, n_samples, n_channels] at `sample_rate` (candidates = 0 unless ok)"""
    sample_rate: int
    seconds: dict[str, float]
    """the worker's wall seconds per stage (and `queued`)"""
    latency_s: float
    """wall seconds from submit to the result's arrival"""
    worker: WorkerInfo | None


@dataclass(frozen=True)
class LatencySample:
    """One finished job's size and submit → result latency (seconds), for deadline planning."""

    n_samples: int
    sample_rate: int
    n_candidates: int
    coarse_steps: int
    c2f_steps: int
    latency_s: float
    overhead_s: float = 0.0
    """latency minus the worker's own wall seconds: transfer and (de)serialisation"""


@dataclass(frozen=True)
class JobChunk:
    """A piece of a streamed job's result, as it is decoded (see Job.stream)."""

    job_id: int
    offset: int
    """the piece's first sample in the result"""
    audio: np.ndarray
    """float32 [candidates, n, n_channels]"""
    total_samples: int
    eta_s: float
    """the worker's estimate: seconds from this piece until the last one"""


Event = Union[Progress, JobChunk, JobResult, WorkerLost]


class WorkerBackend(Protocol):
    """What the scheduler needs from a generation backend: local, remote or a pool."""

    info: WorkerInfo | None
    restarts: int
    latencies: deque[LatencySample]

    def start(self, timeout_s: float | None = None) -> WorkerInfo: ...

    def submit(self, audio: np.ndarray, sample_rate: int, *, preset: str, coarse_steps: int, c2f_steps: int,
               temperature: float = 1.0, top_p: float | None = None, seeds: Sequence[int] = (0,),
               beat_times_s: Sequence[float] | None = None, deadline_s: float | None = None,
               bundle: str | None = None, periodic_prompt: int | None = None,
               upper_codebook_mask: int | None = None, mask_density: float | None = None) -> int: ...

    def cancel(self, job_id: int) -> None: ...

    def events(self, timeout_s: float = 0.0) -> list[Event]: ...

    def close(self) -> None: ...


# -- jobs and latencies (shared by every backend) ----------------------------------------------

def make_job(job_id: int, audio: np.ndarray, sample_rate: int, *, preset: str, coarse_steps: int, c2f_steps: int,
             temperature: float = 1.0, top_p: float | None = None, seeds: Sequence[int] = (0,),
             beat_times_s: Sequence[float] | None = None, deadline_s: float | None = None,
             bundle: str | None = None, periodic_prompt: int | None = None, upper_codebook_mask: int | None = None,
             mask_density: float | None = None, window_start: int | None = None, stream: bool = False) -> Job:
    """The Job message for audio float32 [n_samples, n_channels] (raises ProtocolError, a
    ValueError, for a shape or values the protocol refuses)."""
    audio = np.asarray(audio)
    if audio.ndim != 2:
        raise ProtocolError(f"audio must be [n_samples, n_channels], got shape {audio.shape}")
    job = Job(job_id=job_id, n_samples=audio.shape[0], n_channels=audio.shape[1], sample_rate=int(sample_rate),
              preset=preset, coarse_steps=int(coarse_steps), c2f_steps=int(c2f_steps),
              temperature=float(temperature), top_p=None if top_p is None else float(top_p),
              seeds=[int(s) for s in seeds],
              beat_times_s=None if beat_times_s is None else [float(t) for t in beat_times_s],
              deadline_s=None if deadline_s is None else float(deadline_s), bundle=bundle,
              periodic_prompt=periodic_prompt, upper_codebook_mask=upper_codebook_mask,
              mask_density=None if mask_density is None else float(mask_density),
              window_start=None if window_start is None else int(window_start), stream=bool(stream))
    encode(job, audio)  # validates every field against the receiver's constraints
    return job


def job_options(job: Job) -> dict:
    """The keyword arguments of `WorkerBackend.submit` that describe `job` (to resubmit it)."""
    fields = ("preset", "coarse_steps", "c2f_steps", "temperature", "top_p", "seeds", "beat_times_s",
              "deadline_s", "bundle", "periodic_prompt", "upper_codebook_mask", "mask_density", "window_start",
              "stream")
    return {name: getattr(job, name) for name in fields}


def latency_sample(job: Job, result: Result, latency_s: float) -> LatencySample:
    """What a finished ok job tells about this backend's speed."""
    return LatencySample(job.n_samples, job.sample_rate, result.n_candidates, job.coarse_steps, job.c2f_steps,
                         latency_s, max(0.0, latency_s - sum(result.seconds.values())))


def transfer_overhead_s(latencies: Sequence[LatencySample]) -> float:
    """Median transfer overhead (seconds) of the last OVERHEAD_WINDOW jobs; 0 before any."""
    recent = list(latencies)[-OVERHEAD_WINDOW:]
    return statistics.median(s.overhead_s for s in recent) if recent else 0.0


def least_seconds(latencies: Sequence[LatencySample], job: Job) -> float | None:
    """Estimated seconds for the shortest run of `job` a backend can make (one coarse step, as
    deadline mode may cut it to): measured latencies scaled by audio seconds × candidates ×
    (coarse steps + C2F steps + 1 for the codec). None before any job was measured."""
    if not latencies:
        return None

    def work(seconds: float, candidates: int, coarse: int, c2f: int) -> float:
        return seconds * candidates * (coarse + c2f + 1)

    least = work(job.n_samples / job.sample_rate, len(job.seeds), 1, job.c2f_steps)
    return statistics.median(s.latency_s * least / work(s.n_samples / s.sample_rate, s.n_candidates,
                                                          s.coarse_steps, s.c2f_steps) for s in latencies)


class WorkerConnection:
    """A DEALER connected to a worker's ROUTER, handshake sent. With `keys` it is a CURVE client
    (the keys are set on the socket before it connects). A monitor reports the connection being
    dropped and, with keys, the handshake being refused."""

    def __init__(self, context: zmq.Context, endpoint: str, client: str, keys: CurveKeys | None = None) -> None:
        self.endpoint = endpoint
        self.malformed = 0
        """replies dropped because they did not follow the protocol"""
        self.disconnected = False
        """the connection was dropped after it was up (the worker died or the network broke)"""
        self.handshake_error: str | None = None
        """why the latest security handshake failed (None while none has)"""
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            secure_client(self.socket, keys)
        self._monitor = self.socket.get_monitor_socket(
            HANDSHAKE_FAILURES | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self._up = False
        self.socket.connect(endpoint)
        self.send(Connect(protocol=PROTOCOL_VERSION, client=client))

    def send(self, message: Request, audio: np.ndarray | None = None) -> None:
        """Queue a request (the audio is copied into the message: the caller may reuse it)."""
        self.socket.send_multipart(encode(message, audio))

    def receive(self, timeout_s: float) -> list[tuple[Reply, np.ndarray | None]]:
        """Every reply waiting, after waiting up to `timeout_s` seconds for the first."""
        replies = []
        self._watch()
        if not self.socket.poll(max(0.0, timeout_s) * 1000):
            self._watch()
            return replies
        while True:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return replies
            try:
                replies.append(decode_reply([f.buffer for f in frames]))
            except ProtocolError:
                self.malformed += 1

    def _watch(self) -> None:
        """Account for the monitor's events (handshakes, disconnections) so far."""
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._up, self.handshake_error = True, None
            elif event == zmq.EVENT_DISCONNECTED:
                self.disconnected = self.disconnected or self._up
            else:
                self.handshake_error = handshake_failure(event, self.endpoint)

    def close(self) -> None:
        self.socket.disable_monitor()
        self._monitor.close()
        self.socket.close()


@dataclass
class _InFlight:
    """A submitted job without a Result yet."""

    job: Job
    submitted: float
    """time.perf_counter() seconds"""
    audio: np.ndarray | None = None
    """a copy of the job's audio, kept where the job may be resubmitted elsewhere"""
    deadline: float | None = None
    """time.perf_counter() seconds by which the engine wanted the result (None: no deadline)"""
    streamed: np.ndarray | None = None
    """a streamed result, assembled from its Chunks: float32 [candidates, n_samples, n_channels]"""


class _ConnectedBackend:
    """Job bookkeeping over one WorkerConnection: ids, jobs in flight, replies → events, the
    latency record. Subclasses say when the worker is lost and what happens then."""

    keep_audio = False
    """whether jobs in flight keep a copy of their audio (to resubmit them elsewhere)"""
    supports_streaming = True
    """takes `feed` (continuous encoding) and `submit(..., window_start, stream=True)`"""

    def __init__(self, heartbeat_timeout_s: float) -> None:
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.info: WorkerInfo | None = None
        """the worker's identity and step costs, from its Hello and latest Heartbeat"""
        self.restarts = 0
        self.latencies: deque[LatencySample] = deque(maxlen=256)
        self._connection: WorkerConnection | None = None
        self._in_flight: dict[int, _InFlight] = {}
        self._next_job_id = 1
        self._last_heard = 0.0

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, timeout_s: float | None = None) -> WorkerInfo:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def submit(self, audio: np.ndarray, sample_rate: int, *, preset: str, coarse_steps: int, c2f_steps: int,
               temperature: float = 1.0, top_p: float | None = None, seeds: Sequence[int] = (0,),
               beat_times_s: Sequence[float] | None = None, deadline_s: float | None = None,
               bundle: str | None = None, periodic_prompt: int | None = None,
               upper_codebook_mask: int | None = None, mask_density: float | None = None,
               window_start: int | None = None, stream: bool = False) -> int:
        """Queue a vamp of audio float32 [n_samples, n_channels] at `sample_rate` (one candidate
        per seed; `deadline_s`: seconds from now, of which the measured transfer overhead is
        kept for the way back) → its job_id. `window_start`: the engine sample where the audio
        starts in the fed stream (the worker then takes its codes from there when it can);
        `stream`: the result arrives as JobChunk events before its JobResult. Raises
        ProtocolError (a ValueError) for values the protocol refuses."""
        self._started()
        now = time.perf_counter()
        sent_deadline = None if deadline_s is None else max(0.0, deadline_s - transfer_overhead_s(self.latencies))
        job = make_job(self._next_job_id, audio, sample_rate, preset=preset, coarse_steps=coarse_steps,
                       c2f_steps=c2f_steps, temperature=temperature, top_p=top_p, seeds=seeds,
                       beat_times_s=beat_times_s, deadline_s=sent_deadline, bundle=bundle,
                       periodic_prompt=periodic_prompt, upper_codebook_mask=upper_codebook_mask,
                       mask_density=mask_density, window_start=window_start, stream=stream)
        self._next_job_id += 1
        flight = _InFlight(job, now, np.array(audio, np.float32) if self.keep_audio else None,
                           None if deadline_s is None else now + deadline_s)
        self._dispatch(flight, np.asarray(audio))
        return job.job_id

    def cancel(self, job_id: int) -> None:
        """Ask to cancel a job; its Result (usually "cancelled") still arrives through `events`."""
        if job_id in self._in_flight:
            self._started().send(Cancel(job_id=job_id))

    def feed(self, start_sample: int, mono: np.ndarray, sample_rate: int) -> None:
        """The engine's input continues: mono float32 [n] from engine sample `start_sample`
        (continuous encoding on the worker; dropped while there is no worker to take it)."""
        if self._connection is not None and len(mono):
            self._connection.send(Feed(start_sample=int(start_sample), n_samples=len(mono),
                                       sample_rate=int(sample_rate)), np.asarray(mono, np.float32)[:, None])

    def events(self, timeout_s: float = 0.0) -> list[Event]:
        """Progress, results and losses since the last call, waiting up to `timeout_s` seconds
        for the first message."""
        out: list[Event] = []
        for message, audio in self._started().receive(timeout_s):
            event = self._take(message, audio)
            if event is not None:
                out.append(event)
        reason = self._lost_reason()
        if reason is not None:
            out.extend(self._recover(reason))
        return out

    @property
    def endpoint(self) -> str | None:
        """the current worker's endpoint, None before `start`"""
        return None if self._connection is None else self._connection.endpoint

    @property
    def in_flight(self) -> list[int]:
        """job_ids submitted and not yet answered"""
        return list(self._in_flight)

    # -- internals ---------------------------------------------------------------------------

    def _dispatch(self, flight: _InFlight, audio: np.ndarray) -> None:
        """Send a new job to the worker and track it."""
        self._started().send(flight.job, audio)
        self._in_flight[flight.job.job_id] = flight

    def _started(self) -> WorkerConnection:
        if self._connection is None:
            raise WorkerError("start() the worker first")
        return self._connection

    def _lost_reason(self) -> str | None:
        raise NotImplementedError

    def _recover(self, reason: str) -> list[Event]:
        raise NotImplementedError

    def _take(self, message: Reply, audio: np.ndarray | None) -> Progress | JobResult | None:
        """Account for one reply; the event it makes for the scheduler, if any."""
        self._last_heard = time.monotonic()
        if isinstance(message, Hello):
            if message.protocol != PROTOCOL_VERSION:
                raise WorkerError(f"the worker speaks protocol {message.protocol}, this engine {PROTOCOL_VERSION}")
            self._hello(message.worker)
        elif isinstance(message, Heartbeat):
            self.info = message.worker
        elif isinstance(message, Progress):
            return message if message.job_id in self._in_flight else None
        elif isinstance(message, Chunk):
            return self._chunk(message, audio)
        elif isinstance(message, Result):
            return self._finish(message, audio)
        return None

    def _hello(self, info: WorkerInfo) -> None:
        self.info = info

    def _chunk(self, chunk: Chunk, audio: np.ndarray) -> JobChunk | None:
        flight = self._in_flight.get(chunk.job_id)
        if flight is None or chunk.total_samples != flight.job.n_samples:
            return None
        shape = (chunk.n_candidates, chunk.total_samples, chunk.n_channels)
        if flight.streamed is None or flight.streamed.shape != shape:
            flight.streamed = np.zeros(shape, np.float32)
        flight.streamed[:, chunk.offset:chunk.offset + chunk.n_samples] = audio
        return JobChunk(chunk.job_id, chunk.offset, audio.copy(), chunk.total_samples, chunk.eta_s)

    def _finish(self, result: Result, audio: np.ndarray) -> JobResult | None:
        flight = self._in_flight.pop(result.job_id, None)
        if flight is None:
            return None
        if result.status == "ok" and audio.shape[0] == 0 and flight.streamed is not None:
            audio = flight.streamed
            result = msgspec.structs.replace(result, n_candidates=audio.shape[0], n_samples=audio.shape[1],
                                             n_channels=audio.shape[2])
        latency = time.perf_counter() - flight.submitted
        if result.status == "ok":
            self.latencies.append(latency_sample(flight.job, result, latency))
        return JobResult(result.job_id, result.status, result.error, audio.copy(), result.sample_rate,
                         dict(result.seconds), latency, result.worker)

    def _fail_in_flight(self, error: str) -> list[Event]:
        """A failed JobResult for every job in flight, which are then forgotten."""
        now = time.perf_counter()
        failed: list[Event] = [failed_result(job_id, error, now - flight.submitted, self.info)
                               for job_id, flight in self._in_flight.items()]
        self._in_flight.clear()
        return failed


def failed_result(job_id: int, error: str, latency_s: float, worker: WorkerInfo | None) -> JobResult:
    """A "failed" JobResult that no worker sent (the worker was lost or unreachable)."""
    return JobResult(job_id, "failed", error, np.zeros((0, 0, 0), np.float32), 0, {}, latency_s, worker)


class LocalWorker(_ConnectedBackend):
    """A worker child process on a private ipc endpoint, restarted when lost.

    `start()` spawns it and waits for its Hello; after that, `events()` also watches it: when
    the process exits or is silent for `heartbeat_timeout_s` seconds it reports
    :class:`WorkerLost` once, fails the jobs in flight and spawns a new process (`restarts`
    counts them). Jobs submitted while the new process starts wait for it.
    """

    def __init__(self, bundle: str | None = None, max_batch: int = 2,
                 heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S, start_timeout_s: float = START_TIMEOUT_S,
                 precision: str = "auto") -> None:
        super().__init__(heartbeat_timeout_s)
        self.bundle, self.max_batch = bundle, max_batch
        self.precision = precision
        """the worker's transformer precision: auto, fp32 or int8 (see rtvamp.vamp.Vamper)"""
        self.start_timeout_s = start_timeout_s
        """seconds a new process may take to say Hello (at `start` and after a restart)"""
        self.process: subprocess.Popen | None = None
        self._dir = tempfile.mkdtemp(prefix="rtvamp-worker-")
        self._context = zmq.Context()
        self._spawns = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout_s: float | None = None) -> WorkerInfo:
        """Spawn the worker and wait up to `timeout_s` seconds (default `start_timeout_s`) for
        its Hello. Call once; later processes are started by `events` as needed."""
        if self.process is not None:
            raise WorkerError("this worker was started already")
        timeout_s = self.start_timeout_s if timeout_s is None else timeout_s
        self._spawn()
        deadline = time.monotonic() + timeout_s
        while self.info is None:
            for message, _ in self._connection.receive(0.05):
                self._take(message, None)
            if self.process.poll() is not None:
                raise WorkerError(f"the worker exited with code {self.process.returncode} before it was ready "
                                  "(its log is on stderr)")
            if time.monotonic() > deadline:
                self._stop_process()
                raise WorkerError(f"the worker did not say Hello within {timeout_s:.0f} s")
        return self.info

    def close(self) -> None:
        """Ask the worker to exit (killed after 3 s), close the socket, remove the endpoint."""
        if self._context.closed:
            return
        if self._connection is not None:
            self._connection.send(Shutdown())
        self._stop_process(grace_s=3.0)
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        self._context.term()
        shutil.rmtree(self._dir, ignore_errors=True)

    # -- internals ---------------------------------------------------------------------------

    def _spawn(self) -> None:
        """Start a worker process on a fresh endpoint and connect to it."""
        self._spawns += 1
        endpoint = f"ipc://{os.path.join(self._dir, f'worker-{self._spawns}.ipc')}"
        command = [sys.executable, "-m", "rtvamp.engine.worker", "--bind", endpoint,
                   "--max-batch", str(self.max_batch), "--parent-pid", str(os.getpid()), "--precision", self.precision]
        if self.bundle is not None:
            command += ["--bundle", self.bundle]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        self._connection = WorkerConnection(self._context, endpoint, client=f"engine-{os.getpid()}")
        self.info = None
        self._last_heard = time.monotonic()

    def _stop_process(self, grace_s: float = 0.0) -> None:
        """Wait up to `grace_s` seconds for the process to exit, then kill it."""
        if self.process is None:
            return
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _lost_reason(self) -> str | None:
        code = self.process.poll()
        if code is not None:
            return f"the worker process was killed by signal {-code}" if code < 0 else \
                f"the worker process exited with code {code}"
        silence = time.monotonic() - self._last_heard
        limit = self.heartbeat_timeout_s if self.info is not None else self.start_timeout_s
        if silence > limit:
            return f"no word from the worker for {silence:.1f} s"
        return None

    def _recover(self, reason: str) -> list[Event]:
        """WorkerLost, a failed JobResult per job in flight; then a new worker process."""
        lost: list[Event] = [WorkerLost(reason), *self._fail_in_flight(f"worker lost: {reason}")]
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._connection.close()
        self._spawn()
        self.restarts += 1
        return lost


class RemoteWorker(_ConnectedBackend):
    """``rtvamp worker`` on another machine, over tcp with CURVE, with a local fallback.

    `start()` connects and waits for the worker's Hello (its providers and measured step costs
    are then in `info`); a refused key or a wrong server key is a WorkerError that says which.
    The worker is lost when the connection drops or it is silent for `heartbeat_timeout_s`
    seconds: `events()` then reports :class:`WorkerLost` once, and each job in flight is
    resubmitted to `fallback` when its deadline still leaves the fallback enough time
    (:func:`least_seconds` from the fallback's measured latencies; always before it has any),
    else it ends as a failed JobResult saying why. Until the worker says Hello again (it is
    reconnected automatically; `restarts` counts the returns) new jobs go to the fallback, or
    fail at once without one. The fallback is started by `start()` if it is not yet, and closed
    by `close()`. Without keys only a loopback endpoint is allowed (e.g. an SSH tunnel).
    """

    keep_audio = True

    def __init__(self, endpoint: str, server_public_key: bytes | None = None, client_keys: KeyPair | None = None,
                 fallback: LocalWorker | None = None, heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        super().__init__(heartbeat_timeout_s)
        if (server_public_key is None) != (client_keys is None):
            raise ValueError("CURVE needs both the server's public key and this client's keypair, or neither")
        if server_public_key is None and not is_loopback(endpoint):
            raise WorkerError(f"refusing to send audio to {endpoint} unencrypted: give CURVE keys (`rtvamp keys`), "
                              "or reach the worker through a loopback endpoint (an SSH tunnel)")
        self.remote_endpoint = endpoint
        self.fallback = fallback
        self.connect_timeout_s = connect_timeout_s
        self.connected = False
        """the worker has said Hello and is not lost since"""
        self.fallbacks = 0
        """jobs handed to the fallback (lost in flight, or submitted while the worker was away)"""
        self._keys = None if server_public_key is None else CurveKeys(client_keys, server_public=server_public_key)
        self._context = zmq.Context()
        self._on_fallback: dict[int, tuple[int, float]] = {}
        """fallback job_id → (our job_id, submitted time.perf_counter() seconds)"""
        self._pending: list[Event] = []
        self._ever_connected = False

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout_s: float | None = None) -> WorkerInfo:
        """Connect (and start the fallback); wait up to `timeout_s` seconds (default
        `connect_timeout_s`) for the worker's Hello. Raises WorkerError when the handshake is
        refused, the server key is wrong, or no Hello comes."""
        if self._connection is not None:
            raise WorkerError("this worker was started already")
        timeout_s = self.connect_timeout_s if timeout_s is None else timeout_s
        self._connect()
        if self.fallback is not None and self.fallback.endpoint is None:
            self.fallback.start()
        deadline = time.monotonic() + timeout_s
        while not self.connected:
            for message, _ in self._connection.receive(0.05):
                self._take(message, None)
            error = self._connection.handshake_error
            if error is not None or time.monotonic() > deadline:
                self.close()
                raise WorkerError(error or f"no Hello from {self.remote_endpoint} within {timeout_s:.0f} s: is "
                                  "`rtvamp worker` running there and reachable (firewall, address, port)?")
        return self.info

    def close(self) -> None:
        """Close the connection and the fallback (the remote worker keeps running)."""
        if self._context.closed:
            return
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        self._context.term()
        if self.fallback is not None:
            self.fallback.close()

    # -- jobs --------------------------------------------------------------------------------

    def cancel(self, job_id: int) -> None:
        """Ask to cancel a job, wherever it runs; its Result still arrives through `events`."""
        for fallback_id, (ours, _) in self._on_fallback.items():
            if ours == job_id:
                self.fallback.cancel(fallback_id)
                return
        super().cancel(job_id)

    def events(self, timeout_s: float = 0.0) -> list[Event]:
        """Progress, results and losses of the remote worker and of the fallback."""
        out, self._pending = self._pending, []
        wait_on_fallback = bool(self._on_fallback) and not self._in_flight
        out += super().events(0.0 if wait_on_fallback else timeout_s)
        if self.fallback is not None:
            out += self._from_fallback(self.fallback.events(timeout_s if wait_on_fallback else 0.0))
        return out

    @property
    def in_flight(self) -> list[int]:
        """job_ids submitted and not yet answered (on the worker or on the fallback)"""
        return [*self._in_flight, *(ours for ours, _ in self._on_fallback.values())]

    # -- internals ---------------------------------------------------------------------------

    def _connect(self) -> None:
        """A new connection (a new DEALER: the worker's replies to an older one are dropped)."""
        if self._connection is not None:
            self._connection.close()
        self._connection = WorkerConnection(self._context, self.remote_endpoint, f"engine-{os.getpid()}", self._keys)
        self._last_heard = time.monotonic()

    def _dispatch(self, flight: _InFlight, audio: np.ndarray) -> None:
        if self.connected:
            super()._dispatch(flight, audio)
        elif self.fallback is not None:
            self._to_fallback(flight)
        else:
            self._pending.append(failed_result(flight.job.job_id, f"the remote worker at {self.remote_endpoint} is "
                                               "unreachable and there is no local fallback", 0.0, self.info))

    def _hello(self, info: WorkerInfo) -> None:
        super()._hello(info)
        if not self.connected:
            if self._ever_connected:
                self.restarts += 1
                log.info("remote worker at %s is back", self.remote_endpoint)
            self.connected = self._ever_connected = True

    def _lost_reason(self) -> str | None:
        if not self.connected:
            return None
        if self._connection.disconnected:
            return f"the connection to {self.remote_endpoint} dropped"
        silence = time.monotonic() - self._last_heard
        if silence > self.heartbeat_timeout_s:
            return f"no word from the remote worker at {self.remote_endpoint} for {silence:.1f} s"
        return None

    def _recover(self, reason: str) -> list[Event]:
        """WorkerLost; each job in flight to the fallback or failed; then reconnect."""
        log.warning("remote worker lost: %s", reason)
        out: list[Event] = [WorkerLost(reason)]
        now = time.perf_counter()
        for flight in self._in_flight.values():
            why_not = self._why_not_fallback(flight, now)
            if why_not is None:
                self._to_fallback(flight)
            else:
                out.append(failed_result(flight.job.job_id, f"remote worker lost ({reason}); {why_not}",
                                         now - flight.submitted, self.info))
        self._in_flight.clear()
        self.connected = False
        self._connect()
        return out

    def _why_not_fallback(self, flight: _InFlight, now: float) -> str | None:
        """None when the job can go to the fallback, else why not."""
        if self.fallback is None:
            return "no local fallback"
        if flight.deadline is None:
            return None
        left = flight.deadline - now
        need = least_seconds(self.fallback.latencies, flight.job)
        if left <= 0.0 or (need is not None and need > left):
            return (f"its deadline leaves {max(left, 0.0):.2f} s, the local fallback needs "
                    f"{'?' if need is None else f'{need:.2f}'} s")
        return None

    def _to_fallback(self, flight: _InFlight) -> None:
        options = job_options(flight.job)
        options["deadline_s"] = None if flight.deadline is None else max(0.0, flight.deadline - time.perf_counter())
        fallback_id = self.fallback.submit(flight.audio, flight.job.sample_rate, **options)
        self._on_fallback[fallback_id] = (flight.job.job_id, flight.submitted)
        self.fallbacks += 1

    def _from_fallback(self, events: list[Event]) -> list[Event]:
        """The fallback's events under our job ids (events of no job of ours are dropped)."""
        out: list[Event] = []
        for event in events:
            if isinstance(event, WorkerLost):
                out.append(WorkerLost(f"local fallback: {event.reason}"))
            elif isinstance(event, Progress) and event.job_id in self._on_fallback:
                out.append(msgspec.structs.replace(event, job_id=self._on_fallback[event.job_id][0]))
            elif isinstance(event, JobChunk) and event.job_id in self._on_fallback:
                out.append(dataclasses.replace(event, job_id=self._on_fallback[event.job_id][0]))
            elif isinstance(event, JobResult) and event.job_id in self._on_fallback:
                ours, submitted = self._on_fallback.pop(event.job_id)
                out.append(dataclasses.replace(event, job_id=ours, latency_s=time.perf_counter() - submitted))
        return out
