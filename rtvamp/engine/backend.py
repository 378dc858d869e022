"""The engine side of generation: submit jobs to a worker, collect progress and results.

The scheduler thread (never the audio callback) owns a worker object and calls `submit`,
`cancel` and `events` on it; the object is not thread-safe. :class:`LocalWorker` runs the
worker as a child process on an ipc endpoint and restarts it when it dies or goes silent.
A remote worker will implement the same :class:`WorkerBackend` interface on a tcp endpoint,
reusing :class:`WorkerConnection`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, Union

import numpy as np
import zmq

from .protocol import (PROTOCOL_VERSION, Cancel, Connect, Heartbeat, Hello, Job, Progress, ProtocolError, Reply,
                       Request, Result, Shutdown, WorkerInfo, decode_reply, encode)

HEARTBEAT_TIMEOUT_S = 2.0
"""a worker not heard from for this many seconds is lost"""

START_TIMEOUT_S = 60.0
"""seconds a starting worker may take to load its bundle, warm up and say Hello"""


class WorkerError(RuntimeError):
    """A worker that cannot be started, or that speaks another protocol version."""


@dataclass(frozen=True)
class WorkerLost:
    """The worker died or went silent; its in-flight jobs fail and a new one is starting."""

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


Event = Union[Progress, JobResult, WorkerLost]


class WorkerBackend(Protocol):
    """What the scheduler needs from a worker, local or remote."""

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


class WorkerConnection:
    """A DEALER connected to a worker's ROUTER, handshake sent. (CURVE client keys for a remote
    worker belong here, set on the socket before it connects.)"""

    def __init__(self, context: zmq.Context, endpoint: str, client: str) -> None:
        self.endpoint = endpoint
        self.malformed = 0
        """replies dropped because they did not follow the protocol"""
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)
        self.send(Connect(protocol=PROTOCOL_VERSION, client=client))

    def send(self, message: Request, audio: np.ndarray | None = None) -> None:
        """Queue a request (the audio is copied into the message: the caller may reuse it)."""
        self.socket.send_multipart(encode(message, audio))

    def receive(self, timeout_s: float) -> list[tuple[Reply, np.ndarray | None]]:
        """Every reply waiting, after waiting up to `timeout_s` seconds for the first."""
        replies = []
        if not self.socket.poll(max(0.0, timeout_s) * 1000):
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

    def close(self) -> None:
        self.socket.close()


@dataclass
class _InFlight:
    """A submitted job without a Result yet."""

    job: Job
    submitted: float
    """time.perf_counter() seconds"""


class LocalWorker:
    """A worker child process on a private ipc endpoint, restarted when lost.

    `start()` spawns it and waits for its Hello; after that, `events()` also watches it: when
    the process exits or is silent for `heartbeat_timeout_s` seconds it reports
    :class:`WorkerLost` once, fails the jobs in flight and spawns a new process (`restarts`
    counts them). Jobs submitted while the new process starts wait for it.
    """

    def __init__(self, bundle: str | None = None, max_batch: int = 2,
                 heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S, start_timeout_s: float = START_TIMEOUT_S) -> None:
        self.bundle, self.max_batch = bundle, max_batch
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.start_timeout_s = start_timeout_s
        """seconds a new process may take to say Hello (at `start` and after a restart)"""
        self.info: WorkerInfo | None = None
        """the worker's identity and step costs, from its Hello and latest Heartbeat"""
        self.restarts = 0
        self.latencies: deque[LatencySample] = deque(maxlen=256)
        self.process: subprocess.Popen | None = None
        self._dir = tempfile.mkdtemp(prefix="rtvamp-worker-")
        self._context = zmq.Context()
        self._connection: WorkerConnection | None = None
        self._in_flight: dict[int, _InFlight] = {}
        self._next_job_id = 1
        self._spawns = 0
        self._last_heard = 0.0

    def __enter__(self) -> LocalWorker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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

    # -- jobs --------------------------------------------------------------------------------

    def submit(self, audio: np.ndarray, sample_rate: int, *, preset: str, coarse_steps: int, c2f_steps: int,
               temperature: float = 1.0, top_p: float | None = None, seeds: Sequence[int] = (0,),
               beat_times_s: Sequence[float] | None = None, deadline_s: float | None = None,
               bundle: str | None = None, periodic_prompt: int | None = None,
               upper_codebook_mask: int | None = None, mask_density: float | None = None) -> int:
        """Queue a vamp of audio float32 [n_samples, n_channels] at `sample_rate` (one candidate
        per seed; `deadline_s`: seconds from the worker's receipt) → its job_id.
        Raises ProtocolError (a ValueError) for values the protocol refuses."""
        connection = self._started()
        audio = np.asarray(audio)
        if audio.ndim != 2:
            raise ProtocolError(f"audio must be [n_samples, n_channels], got shape {audio.shape}")
        job = Job(job_id=self._next_job_id, n_samples=audio.shape[0], n_channels=audio.shape[1],
                  sample_rate=int(sample_rate), preset=preset, coarse_steps=int(coarse_steps),
                  c2f_steps=int(c2f_steps), temperature=float(temperature),
                  top_p=None if top_p is None else float(top_p), seeds=[int(s) for s in seeds],
                  beat_times_s=None if beat_times_s is None else [float(t) for t in beat_times_s],
                  deadline_s=None if deadline_s is None else float(deadline_s), bundle=bundle,
                  periodic_prompt=periodic_prompt, upper_codebook_mask=upper_codebook_mask,
                  mask_density=None if mask_density is None else float(mask_density))
        connection.send(job, audio)
        self._next_job_id += 1
        self._in_flight[job.job_id] = _InFlight(job, time.perf_counter())
        return job.job_id

    def cancel(self, job_id: int) -> None:
        """Ask to cancel a job; its Result (usually "cancelled") still arrives through `events`."""
        if job_id in self._in_flight:
            self._started().send(Cancel(job_id=job_id))

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
        """the current worker process's endpoint (ipc://…), None before `start`"""
        return None if self._connection is None else self._connection.endpoint

    @property
    def in_flight(self) -> list[int]:
        """job_ids submitted and not yet answered"""
        return list(self._in_flight)

    # -- internals ---------------------------------------------------------------------------

    def _started(self) -> WorkerConnection:
        if self._connection is None:
            raise WorkerError("start() the worker first")
        return self._connection

    def _spawn(self) -> None:
        """Start a worker process on a fresh endpoint and connect to it."""
        self._spawns += 1
        endpoint = f"ipc://{os.path.join(self._dir, f'worker-{self._spawns}.ipc')}"
        command = [sys.executable, "-m", "rtvamp.engine.worker", "--bind", endpoint,
                   "--max-batch", str(self.max_batch), "--parent-pid", str(os.getpid())]
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

    def _take(self, message: Reply, audio: np.ndarray | None) -> Progress | JobResult | None:
        """Account for one reply; the event it makes for the scheduler, if any."""
        self._last_heard = time.monotonic()
        if isinstance(message, Hello):
            if message.protocol != PROTOCOL_VERSION:
                raise WorkerError(f"the worker speaks protocol {message.protocol}, this engine {PROTOCOL_VERSION}")
            self.info = message.worker
        elif isinstance(message, Heartbeat):
            self.info = message.worker
        elif isinstance(message, Progress):
            return message if message.job_id in self._in_flight else None
        elif isinstance(message, Result):
            return self._finish(message, audio)
        return None

    def _finish(self, result: Result, audio: np.ndarray) -> JobResult | None:
        flight = self._in_flight.pop(result.job_id, None)
        if flight is None:
            return None
        latency = time.perf_counter() - flight.submitted
        job = flight.job
        if result.status == "ok":
            self.latencies.append(LatencySample(job.n_samples, job.sample_rate, result.n_candidates,
                                                job.coarse_steps, job.c2f_steps, latency))
        return JobResult(result.job_id, result.status, result.error, audio.copy(), result.sample_rate,
                         dict(result.seconds), latency, result.worker)

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
        now = time.perf_counter()
        lost: list[Event] = [WorkerLost(reason)]
        lost += [JobResult(job_id, "failed", f"worker lost: {reason}", np.zeros((0, 0, 0), np.float32), 0, {},
                           now - flight.submitted, self.info) for job_id, flight in self._in_flight.items()]
        self._in_flight.clear()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._connection.close()
        self._spawn()
        self.restarts += 1
        return lost
