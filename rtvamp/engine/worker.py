"""The generation worker process: ``python -m rtvamp.engine.worker --bind ENDPOINT``.

Generation runs here, not in the audio process, so the audio callback never competes for this
process's GIL (docs/realtime.md, rule 2). Sockets (see :mod:`rtvamp.engine.protocol`):

- a ROUTER bound at ENDPOINT, owned by the main thread: engines connect DEALERs to it; with
  ``--curve-keys DIR`` it is a CURVE server that accepts only the client keys in DIR/authorized/
  (a ZAP handler thread checks them; refused handshakes are counted and reported in every
  Heartbeat). A tcp:// endpoint that other machines can reach is refused without keys;
- an inproc PAIR ("outbox"): the job thread hands its encoded Progress and Result frames
  (routing identity first) to the main thread, which forwards them on the ROUTER.

The job thread runs one vamp at a time, jobs in order of arrival. Between jobs (and before
each) it encodes the input engines feed it (Feed messages: one rtvamp.code_stream.CodeStream
per engine), so an input trigger's window is usually encoded before the trigger; a streamed
job is answered in Chunks as the decoder goes, then a Result without audio. A Cancel drops a queued job,
or stops the running one at its next progress report (the Vamper reports after every sampling
step). Every job ends with exactly one Result. Malformed messages are counted and dropped.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from ..bundle import BundleError, resolve_bundle
from ..code_stream import CodeStream
from ..codec import CodecReach
from ..vamp import Vamper, VampResult, VampSettings
from .keys import (HANDSHAKE_FAILURES, CurveKeys, is_loopback, keys_dir, load_keys, secure_server,
                   start_authenticator)
from .protocol import (MAX_AUDIO_BYTES, PROTOCOL_VERSION, Buffer, Cancel, Chunk, Connect, Feed, Heartbeat, Hello,
                       Job, Progress, ProtocolError, Result, Shutdown, WorkerInfo, decode_request, encode)

log = logging.getLogger("rtvamp.worker")

HEARTBEAT_S = 0.5
"""seconds between heartbeats to every connected engine"""

PROGRESS_INTERVAL_S = 0.05
"""least seconds between two Progress messages of a job (≤ 20 per second)"""

WARM_UP_S = 0.5
"""seconds of audio vamped once at start, so the first real job pays no warm-up cost"""

MAX_STREAMS = 8
"""engines whose fed input the worker encodes continuously (the least recently fed is dropped)"""

STREAM_CAPACITY_S = 60.0
"""seconds of each engine's input (and its codes) the worker keeps"""


class Cancelled(Exception):
    """Raised inside the Vamper's progress callback to stop the running job."""


@dataclass
class _Task:
    """A received job: who asked, what, and when it arrived (time.perf_counter() seconds)."""

    peer: bytes
    job: Job
    audio: np.ndarray
    received: float


def providers_in_use(vamper: Vamper) -> list[str]:
    """The onnxruntime execution providers the Vamper's four sessions use, preferred first
    (e.g. ["CUDAExecutionProvider", "CPUExecutionProvider"])."""
    return list(dict.fromkeys(p for s in vamper.sessions for p in s.get_providers()))


class Identity:
    """This worker's WorkerInfo, with the Vamper's current step costs."""

    def __init__(self, vamper: Vamper) -> None:
        self.vamper = vamper
        self.host = socket.gethostname()
        self.bundle = vamper.manifest.name or str(vamper.bundle.root)
        self.providers = providers_in_use(vamper)
        try:
            self.reach: CodecReach | None = CodecReach.of(vamper.manifest)
        except BundleError as exc:  # an older bundle: no continuous encoding, no streamed decode
            log.warning("%s", exc)
            self.reach = None
        self.streams: dict[bytes, CodeStream] = {}
        """each engine's continuously encoded input, by the engine's routing identity"""

    def info(self) -> WorkerInfo:
        return WorkerInfo(host=self.host, pid=os.getpid(), bundle=self.bundle, providers=self.providers,
                          max_batch=self.vamper.max_batch, step_seconds=dict(self.vamper.step_seconds),
                          precision=self.vamper.precision,
                          encode_seconds_per_second=max((s.seconds_per_second for s in list(self.streams.values())),
                                                        default=0.0))

    def feed(self, peer: bytes, message: Feed, mono: np.ndarray) -> None:
        """Continue `peer`'s input stream (ignored without a reach or at another sample rate)."""
        if self.reach is None or message.sample_rate != self.vamper.manifest.sample_rate:
            return
        stream = self.streams.pop(peer, None)
        if stream is None:
            stream = CodeStream(self.vamper.codec, self.reach, self.vamper.manifest.n_codebooks, STREAM_CAPACITY_S)
        self.streams[peer] = stream                        # (most recently fed last)
        while len(self.streams) > MAX_STREAMS:
            del self.streams[next(iter(self.streams))]
        try:
            stream.feed(message.start_sample, mono)
        except Exception:  # never lose the worker over one engine's stream: start it anew
            log.exception("continuous encoding failed; restarting that stream")
            stream.reset(message.start_sample + message.n_samples)


def make_result(job: Job, identity: Identity, status: str, error: str = "", vamped: VampResult | None = None,
                seconds: dict[str, float] | None = None) -> tuple[Result, np.ndarray | None]:
    """A job's Result header and its audio (None unless status is ok)."""
    if vamped is None:
        return Result(job_id=job.job_id, status=status, worker=identity.info(), error=error,
                      seconds=seconds or {}), None
    k, n, ch = vamped.audio.shape
    return Result(job_id=job.job_id, status=status, worker=identity.info(), n_candidates=k, n_samples=n,
                  n_channels=ch, sample_rate=vamped.sample_rate, seconds=seconds or {}), vamped.audio


def result_frames(task: _Task, identity: Identity, status: str, error: str = "") -> list[Buffer]:
    """[peer, header] of a job's Result without audio (cancelled or failed before it ran)."""
    return [task.peer, *encode(make_result(task.job, identity, status, error)[0])]


ChunkSender = Callable[[Chunk, np.ndarray], None]


def run_job(identity: Identity, job: Job, audio: np.ndarray, received: float,
            progress: Callable[[str, float], None], cancelled: Callable[[], bool],
            stream: CodeStream | None = None, send_chunk: ChunkSender | None = None
            ) -> tuple[Result, np.ndarray | None]:
    """Vamp one job on `identity.vamper` → its Result and audio. Never raises for a bad job.

    `received`: time.perf_counter() seconds of the job's arrival (the deadline counts from it);
    `progress` is the Vamper's callback and may raise :class:`Cancelled`; `cancelled()` is
    asked once more after the last stage. A job that asks to be streamed (and can be: a codec
    reach, the bundle's rate) is answered through `send_chunk` and a Result without audio;
    its codes come from `stream` (the engine's continuously encoded input) when it holds
    the window."""
    start = time.perf_counter()
    seconds = {"queued": start - received}
    try:
        if job.bundle is not None and job.bundle != identity.bundle:
            raise ValueError(f"this worker serves bundle {identity.bundle!r}, not {job.bundle!r}")
        finish_by = None if job.deadline_s is None else received + job.deadline_s
        if job.stream and send_chunk is not None and identity.reach is not None \
                and job.sample_rate == identity.vamper.manifest.sample_rate:
            return _streamed(identity, job, audio, stream, send_chunk, finish_by, progress, cancelled, seconds)
        vamped = identity.vamper.vamp(audio, job.sample_rate, settings_of(job), beat_times_s=job.beat_times_s,
                                      finish_by=finish_by, progress=progress)
    except Cancelled:
        return make_result(job, identity, "cancelled", seconds=seconds)
    except ValueError as exc:  # AudioInputError, BundleError, bad settings: the user's message
        log.info("job %d failed: %s", job.job_id, exc)
        return make_result(job, identity, "failed", str(exc) or type(exc).__name__, seconds=seconds)
    except Exception as exc:
        log.exception("job %d failed", job.job_id)
        return make_result(job, identity, "failed", f"{type(exc).__name__}: {exc}", seconds=seconds)
    seconds.update(vamped.seconds)
    if cancelled():
        return make_result(job, identity, "cancelled", seconds=seconds)
    return make_result(job, identity, "ok", vamped=vamped, seconds=seconds)


def _streamed(identity: Identity, job: Job, audio: np.ndarray, stream: CodeStream | None, send_chunk: ChunkSender,
              finish_by: float | None, progress: Callable[[str, float], None], cancelled: Callable[[], bool],
              seconds: dict[str, float]) -> tuple[Result, None]:
    """A job answered in Chunks. seconds gains `first_sample` (job start → first Chunk sent)
    and `stream_codes` (1 when the codes came from the code stream, 0 when encoded here)."""
    vamper, start = identity.vamper, time.perf_counter()
    prepared = None
    if stream is not None and job.window_start is not None:
        prepared = vamper.prepare_from_stream(stream, job.window_start, job.n_samples)
    if prepared is None:
        prepared = vamper.prepare(audio, job.sample_rate)
    fine, _, stages = vamper.generate(prepared, settings_of(job), beat_times_s=job.beat_times_s, finish_by=finish_by,
                                      progress=progress, streamed=True)
    seconds.update(stages)
    t = time.perf_counter()
    for offset, piece, eta in vamper.stream_audio(fine, prepared, job.n_channels, identity.reach):
        if cancelled():
            raise Cancelled
        k, n, ch = piece.shape
        send_chunk(Chunk(job_id=job.job_id, offset=offset, n_candidates=k, n_samples=n, n_channels=ch,
                         total_samples=job.n_samples, eta_s=eta), piece)
        seconds.setdefault("first_sample", time.perf_counter() - start)
    seconds.update(decode=time.perf_counter() - t, postprocess=0.0, stream_codes=float(prepared.source == "stream"))
    return Result(job_id=job.job_id, status="ok", worker=identity.info(), sample_rate=job.sample_rate,
                  seconds=seconds), None


def settings_of(job: Job) -> VampSettings:
    """VampSettings from a Job (raises ValueError for an unknown preset)."""
    settings = VampSettings.make(job.preset, job.coarse_steps, job.c2f_steps, job.temperature, job.top_p,
                                 seed=job.seeds[0], variations=len(job.seeds), periodic_prompt=job.periodic_prompt,
                                 upper_codebook_mask=job.upper_codebook_mask, mask_density=job.mask_density)
    return replace(settings, seeds=tuple(job.seeds))


class JobThread(threading.Thread):
    """Runs queued jobs one at a time on the Vamper; sends Progress and Result to the outbox."""

    def __init__(self, identity: Identity, context: zmq.Context, outbox: str) -> None:
        super().__init__(name="rtvamp-job", daemon=True)
        self.identity = identity
        self._context, self._outbox_address = context, outbox
        self._cond = threading.Condition()
        self._queue: deque[_Task] = deque()
        self._feeds: deque[tuple[bytes, Feed, np.ndarray]] = deque()
        self._running: _Task | None = None
        self._cancel_running = False
        self._stopping = False

    # -- called from the main thread ------------------------------------------------------------

    def submit(self, task: _Task) -> None:
        with self._cond:
            self._queue.append(task)
            self._cond.notify()

    def feed(self, peer: bytes, message: Feed, audio: np.ndarray) -> None:
        """Queue a piece of an engine's input for continuous encoding (between jobs)."""
        with self._cond:
            self._feeds.append((peer, message, np.array(audio[:, 0], np.float32)))
            self._cond.notify()

    def cancel(self, peer: bytes, job_id: int) -> _Task | None:
        """Cancel a job of `peer`: a queued one is removed and returned (the caller answers it);
        a running one is flagged and ends with a "cancelled" Result from this thread."""
        with self._cond:
            for task in self._queue:
                if task.peer == peer and task.job.job_id == job_id:
                    self._queue.remove(task)
                    return task
            if self._running is not None and (self._running.peer, self._running.job.job_id) == (peer, job_id):
                self._cancel_running = True
            return None

    def load(self) -> tuple[int, bool]:
        """(jobs queued, whether one is running)."""
        with self._cond:
            return len(self._queue), self._running is not None

    def stop(self) -> None:
        with self._cond:
            self._stopping = self._cancel_running = True
            self._cond.notify()

    # -- the job thread --------------------------------------------------------------------------

    def run(self) -> None:
        outbox = self._context.socket(zmq.PAIR)
        outbox.setsockopt(zmq.LINGER, 0)
        outbox.connect(self._outbox_address)
        try:
            while (work := self._next()) is not None:
                feeds, task = work
                if task is not None and sum(len(mono) for peer, _, mono in feeds if peer == task.peer) \
                        > task.job.n_samples:
                    # a backlog (fed during a long job) that costs more to encode than the window
                    # itself: dropped; this job encodes its window, the stream restarts at the next feed
                    feeds = [feed for feed in feeds if feed[0] != task.peer]
                for peer, message, mono in feeds:  # (first: a job's window may need them)
                    self.identity.feed(peer, message, mono)
                if task is None:
                    continue
                outbox.send_multipart(self._run_task(task, outbox), copy=False)
                with self._cond:
                    self._running, self._cancel_running = None, False
        finally:
            outbox.close()

    def _next(self) -> tuple[list[tuple[bytes, Feed, np.ndarray]], _Task | None] | None:
        """(the fed audio received so far, the next job or None); None when stopping."""
        with self._cond:
            while not self._queue and not self._feeds and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            feeds = list(self._feeds)
            self._feeds.clear()
            self._running = self._queue.popleft() if self._queue else None
            return feeds, self._running

    def _run_task(self, task: _Task, outbox: zmq.Socket) -> list[Buffer]:
        """Vamp one job → its Result frames. Never raises for a bad job."""
        def send_chunk(chunk: Chunk, piece: np.ndarray) -> None:
            outbox.send_multipart([task.peer, *encode(chunk, piece)], copy=False)

        result, audio = run_job(self.identity, task.job, task.audio, task.received, self._progress(task, outbox),
                                lambda: self._cancel_running, self.identity.streams.get(task.peer), send_chunk)
        return [task.peer, *encode(result, audio)]

    def _progress(self, task: _Task, outbox: zmq.Socket) -> Callable[[str, float], None]:
        """The Vamper's progress callback: raises Cancelled when asked to; sends Progress at
        most every PROGRESS_INTERVAL_S seconds."""
        last = -float("inf")

        def report(stage: str, fraction: float) -> None:
            nonlocal last
            if self._cancel_running:
                raise Cancelled
            now = time.perf_counter()
            if now - last >= PROGRESS_INTERVAL_S:
                last = now
                message = Progress(job_id=task.job.job_id, stage=stage, fraction=min(max(fraction, 0.0), 1.0))
                outbox.send_multipart([task.peer, *encode(message)])

        return report


class InsecureBindError(ValueError):
    """A worker asked to listen where other machines can reach it, without CURVE keys."""


def check_bind(endpoint: str, keys: CurveKeys | None) -> None:
    """Refuse (InsecureBindError) to bind a non-loopback endpoint without CURVE keys: anyone who
    can reach it could run jobs and read the audio."""
    if keys is None and not is_loopback(endpoint):
        raise InsecureBindError(
            f"refusing to bind {endpoint} without CURVE keys: anyone on the network could send jobs and read the "
            "audio. Create keys with `rtvamp keys` and pass --curve-keys [DIR], or bind 127.0.0.1 (e.g. behind an "
            "SSH tunnel)")


class Worker:
    """The main thread: owns the ROUTER, forwards the outbox, sends heartbeats.

    With `keys` the ROUTER is a CURVE server accepting only `keys.authorized` client keys."""

    def __init__(self, vamper: Vamper, endpoint: str, context: zmq.Context, parent_pid: int | None = None,
                 keys: CurveKeys | None = None) -> None:
        check_bind(endpoint, keys)
        self.identity = Identity(vamper)
        self.parent_pid = parent_pid
        self.malformed = 0
        """messages dropped because they did not follow the protocol"""
        self.refused = 0
        """connections refused in the CURVE handshake"""
        self.peers: set[bytes] = set()
        self.router = context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.MAXMSGSIZE, MAX_AUDIO_BYTES + 65536)
        self.authenticator = None if keys is None else start_authenticator(context, keys)
        if keys is not None:
            secure_server(self.router, keys)
        self.monitor = self.router.get_monitor_socket(HANDSHAKE_FAILURES)
        self.router.bind(endpoint)
        outbox_address = f"inproc://rtvamp-worker-outbox-{id(self)}"
        self.outbox = context.socket(zmq.PAIR)
        self.outbox.setsockopt(zmq.LINGER, 0)
        self.outbox.bind(outbox_address)
        self.jobs = JobThread(self.identity, context, outbox_address)

    def serve(self) -> None:
        """Serve until Shutdown (or until the parent process is gone)."""
        self.jobs.start()
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.outbox, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        next_beat = time.monotonic()
        try:
            while True:
                ready = dict(poller.poll(max(0.0, next_beat - time.monotonic()) * 1000))
                if self.outbox in ready:
                    self.router.send_multipart(self.outbox.recv_multipart(copy=False), copy=False)
                if self.router in ready and not self._receive():
                    return
                if self.monitor in ready:
                    self._count_refusal()
                if time.monotonic() >= next_beat:
                    if self._orphaned():
                        log.info("parent process %d is gone; exiting", self.parent_pid)
                        return
                    self._heartbeat()
                    next_beat = time.monotonic() + HEARTBEAT_S
        finally:
            self.jobs.stop()
            self.jobs.join(timeout=5.0)
            self.router.disable_monitor()
            self.monitor.close()
            self.router.close()
            self.outbox.close()
            if self.authenticator is not None:
                self.authenticator.stop()

    def _receive(self) -> bool:
        """Handle one message from an engine; False when told to shut down."""
        frames = self.router.recv_multipart(copy=False)
        peer = frames[0].bytes
        try:
            message, audio = decode_request([f.buffer for f in frames[1:]])
        except ProtocolError as exc:
            self.malformed += 1
            log.warning("dropped a malformed message (%d so far): %s", self.malformed, exc)
            return True
        if isinstance(message, Shutdown):
            log.info("shutdown requested")
            return False
        self.peers.add(peer)
        if isinstance(message, Connect):
            self._hello(peer, message)
        elif isinstance(message, Feed):
            self.jobs.feed(peer, message, audio)
        elif isinstance(message, Job):
            self.jobs.submit(_Task(peer, message, audio, time.perf_counter()))
        elif isinstance(message, Cancel):
            task = self.jobs.cancel(peer, message.job_id)
            if task is not None:
                self.router.send_multipart(result_frames(task, self.identity, "cancelled"), copy=False)
        return True

    def _count_refusal(self) -> None:
        event = recv_monitor_message(self.monitor)
        self.refused += 1
        log.warning("refused a connection in the CURVE handshake (%s; %d so far)", event["event"].name,
                    self.refused)

    def _hello(self, peer: bytes, message: Connect) -> None:
        if message.protocol != PROTOCOL_VERSION:
            log.warning("engine %r speaks protocol %d; this worker speaks %d", message.client,
                        message.protocol, PROTOCOL_VERSION)
        hello = Hello(protocol=PROTOCOL_VERSION, worker=self.identity.info())
        self.router.send_multipart([peer, *encode(hello)])

    def _heartbeat(self) -> None:
        queued, busy = self.jobs.load()
        frames = encode(Heartbeat(worker=self.identity.info(), queued=queued, busy=busy, malformed=self.malformed,
                                  refused=self.refused))
        for peer in self.peers:
            self.router.send_multipart([peer, *frames])

    def _orphaned(self) -> bool:
        return self.parent_pid is not None and os.getppid() != self.parent_pid


def warm_up(vamper: Vamper) -> None:
    """One tiny vamp (WARM_UP_S seconds of a sine), so that kernel caches and sessions are warm."""
    rate = vamper.manifest.sample_rate
    t = np.arange(int(WARM_UP_S * rate)) / rate
    sine = (0.3 * np.sin(2 * np.pi * 220.0 * t)).astype(np.float32)[:, None]
    vamper.vamp(sine, rate, VampSettings.make(steps="fast"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rtvamp.engine.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--bind", required=True, help="ZeroMQ endpoint to bind, e.g. ipc:///tmp/w.ipc or "
                        "tcp://127.0.0.1:5555 (a non-loopback address needs --curve-keys)")
    parser.add_argument("--curve-keys", nargs="?", const="", metavar="DIR",
                        help="CURVE keys folder: server.key_secret and authorized/*.key (default folder: "
                        f"{keys_dir()})")
    parser.add_argument("--bundle", help="bundle folder or installed name (default: the embedded tiny one)")
    parser.add_argument("--max-batch", type=int, default=2, help="most candidates per job")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "int8"],
                        help="transformer precision (auto: int8 on the CPU when the bundle's int8 agrees with fp32)")
    parser.add_argument("--parent-pid", type=int, help="exit when this process is no longer the parent")
    parser.add_argument("--nice", type=int, default=10,
                        help="lower this process's CPU priority by this much (the audio process comes first)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="rtvamp-worker[%(process)d] %(levelname)s %(message)s")
    if args.nice:
        os.nice(args.nice)
    try:
        keys = None if args.curve_keys is None else load_keys(args.curve_keys or None, "server")
        check_bind(args.bind, keys)
        vamper = Vamper(None if args.bundle is None else resolve_bundle(args.bundle), max_batch=args.max_batch,
                        precision=args.precision)
        warm_up(vamper)
    except ValueError as exc:  # KeysError, InsecureBindError, BundleError and friends: a message for the user
        log.error("cannot start: %s", exc)
        return 2
    context = zmq.Context()
    try:
        worker = Worker(vamper, args.bind, context, args.parent_pid, keys)
    except zmq.ZMQError as exc:
        log.error("cannot bind %s: %s", args.bind, exc)
        return 2
    log.info("serving bundle %r on %s (%s; providers %s; precision %s; step costs %s)", worker.identity.bundle,
             args.bind, "CURVE" if keys else "no encryption: loopback only", ", ".join(worker.identity.providers),
             vamper.precision, worker.identity.info().step_seconds)
    try:
        worker.serve()
    except KeyboardInterrupt:
        pass
    if not worker.jobs.is_alive():  # a job thread stuck in a long stage still holds its socket
        context.term()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
