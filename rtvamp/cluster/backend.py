"""`RayBackend`: the engine's WorkerBackend over a Ray Serve pool (:mod:`rtvamp.cluster.pool`).

Requests carry the same Job and reply messages as a worker socket (:mod:`rtvamp.engine.protocol`),
framed into bytes (:func:`pack`): a job is one request whose response streams a Hello (the
replica's identity and step costs), Progress at most 20 times a second, and the Result. Two
transports, chosen by the spec:

- a DeploymentHandle (``ray``, ``ray://auto``, ``ray://HOST:PORT`` = the cluster's GCS address):
  for engines running on a machine of the Ray cluster; imports Ray;
- the Serve HTTP ingress (``http://HOST:PORT/ROUTE``): for a performer's laptop outside the
  cluster; only the standard library. Each message is prefixed by its length (u32 LE).

The job's model (``bundle``: an installed bundle name or folder, e.g. a fine-tune) routes it to
a replica that has the model loaded (``serve.multiplexed``). Cancellation is best-effort: the
request is cancelled (handle) or its connection closed (HTTP); Serve then cancels the replica's
request and the vamp stops at its next sampling step, and the engine gets a "cancelled"
JobResult as soon as the request ends. A job whose replica dies (or whose request fails in
transport) is retried once on another replica when its deadline still leaves time for it
(estimated from this backend's latencies), else it ends as a failed JobResult saying why.
"""

from __future__ import annotations

import http.client
import queue
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

import numpy as np

from ..engine.backend import (Event, JobResult, LatencySample, WorkerError, WorkerLost, failed_result, job_options,
                              latency_sample, least_seconds, make_job, transfer_overhead_s)
from ..engine.protocol import PROTOCOL_VERSION, Buffer, Hello, Job, Progress, Result, WorkerInfo, decode_reply, encode

APP_NAME = "rtvamp"
"""the Serve application name the pool deploys by default"""

RETRIES = 1
"""times a job whose replica died is submitted again"""

_LENGTH = struct.Struct("<I")


# -- framing -----------------------------------------------------------------------------------

def pack(frames: Sequence[Buffer]) -> bytes:
    """One message's frames → bytes: each frame prefixed by its length (u32 LE)."""
    return b"".join(_LENGTH.pack(memoryview(f).nbytes) + bytes(f) for f in frames)


def unpack(data: Buffer) -> list[memoryview]:
    """The inverse of :func:`pack` (views into `data`). Raises ValueError for truncated data."""
    view, frames, at = memoryview(data).cast("B"), [], 0
    while at < len(view):
        if at + 4 > len(view):
            raise ValueError("truncated frame length")
        (n,) = _LENGTH.unpack_from(view, at)
        if at + 4 + n > len(view):
            raise ValueError("truncated frame")
        frames.append(view[at + 4:at + 4 + n])
        at += 4 + n
    return frames


def prefixed(chunk: bytes) -> bytes:
    """`chunk` prefixed by its length (u32 LE): one message of a byte stream (the HTTP response)."""
    return _LENGTH.pack(len(chunk)) + chunk


# -- transports --------------------------------------------------------------------------------

class Transport(Protocol):
    """How requests reach the pool. `hello` returns a packed Hello of a replica serving
    `model`; `stream` yields the packed reply messages of one request (raises TransportError
    when the request fails, RequestCancelled once `cancel` is set)."""

    def start(self) -> None: ...

    def hello(self, model: str) -> bytes: ...

    def stream(self, request: bytes, model: str, cancel: threading.Event) -> Iterator[bytes]: ...

    def close(self) -> None: ...


class TransportError(RuntimeError):
    """A request that failed on its way: a replica died, the proxy or connection broke."""


class RequestCancelled(Exception):
    """The request was cancelled by `Request.cancel`."""


def _when_set(cancel: threading.Event, action: Callable[[], object]) -> threading.Event:
    """Run `action` (on a watcher thread) once `cancel` is set, unless the returned event is set
    first (the request is over)."""
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if cancel.wait(0.05):
                action()
                return

    threading.Thread(target=watch, daemon=True, name="rtvamp-ray-cancel").start()
    return done


class HandleTransport:
    """Through a DeploymentHandle (this process joins the Ray cluster)."""

    def __init__(self, address: str, app_name: str = APP_NAME) -> None:
        self.address, self.app_name = address, app_name
        self._handle = None
        self._owns_ray = False

    def start(self) -> None:
        import ray
        from ray import serve

        if not ray.is_initialized():
            ray.init(address=self.address, log_to_driver=False)
            self._owns_ray = True
        self._handle = serve.get_app_handle(self.app_name)

    def hello(self, model: str) -> bytes:
        return self._handle.options(method_name="hello", multiplexed_model_id=model).remote().result(
            timeout_s=600.0)

    def stream(self, request: bytes, model: str, cancel: threading.Event) -> Iterator[bytes]:
        response = self._handle.options(method_name="stream", stream=True, multiplexed_model_id=model).remote(request)
        done = _when_set(cancel, response.cancel)
        try:
            yield from response
        except Exception as exc:  # RequestCancelledError; ActorDiedError, ActorUnavailableError, …
            if cancel.is_set():
                raise RequestCancelled from None
            raise TransportError(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
        finally:
            done.set()

    def close(self) -> None:
        if self._owns_ray:
            import ray

            ray.shutdown()


class HttpTransport:
    """Through the pool's HTTP ingress (no Ray here): POST a job, read the streamed replies."""

    def __init__(self, url: str, timeout_s: float = 600.0) -> None:
        parts = urlsplit(url)
        if not parts.hostname:
            raise ValueError(f"not an http URL: {url!r}")
        self.url, self.timeout_s = url, timeout_s
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname, parts.port or (443 if self._https else 80)
        self._path = parts.path or "/"

    def _connection(self) -> http.client.HTTPConnection:
        kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        return kind(self._host, self._port, timeout=self.timeout_s)

    def hello(self, model: str) -> bytes:
        connection = self._connection()
        try:
            connection.request("GET", self._path, headers={"serve_multiplexed_model_id": model})
            response = connection.getresponse()
            body = response.read()
        except OSError as exc:
            raise TransportError(f"{self.url}: {exc}") from None
        finally:
            connection.close()
        if response.status != 200:
            raise TransportError(f"{self.url}: HTTP {response.status} {body[:200]!r}")
        return body

    def start(self) -> None:
        pass

    def stream(self, request: bytes, model: str, cancel: threading.Event) -> Iterator[bytes]:
        connection = self._connection()
        done = _when_set(cancel, lambda: _shut(connection))  # a closed connection makes Serve cancel
        try:
            connection.request("POST", self._path, body=request, headers={
                "serve_multiplexed_model_id": model, "Content-Type": "application/octet-stream"})
            response = connection.getresponse()
            if response.status != 200:
                raise TransportError(f"{self.url}: HTTP {response.status} {response.read(200)!r}")
            while header := response.read(4):
                if len(header) < 4:
                    raise TransportError(f"{self.url}: the reply stream broke off")
                (n,) = _LENGTH.unpack(header)
                chunk = response.read(n)
                if len(chunk) < n:
                    raise TransportError(f"{self.url}: the reply stream broke off")
                yield chunk
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if cancel.is_set():
                raise RequestCancelled from None
            raise TransportError(f"{self.url}: {type(exc).__name__}: {exc}") from None
        finally:
            done.set()
            connection.close()

    def close(self) -> None:
        pass


def _shut(connection: http.client.HTTPConnection) -> None:
    """Wake a thread blocked reading `connection` (close() alone does not, on Linux)."""
    if connection.sock is not None:
        try:
            connection.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def transport_for(spec: str, app_name: str = APP_NAME) -> Transport:
    """``ray`` / ``ray://auto`` / ``ray://HOST:PORT`` → HandleTransport; ``http(s)://…`` → HttpTransport."""
    parts = urlsplit(spec)
    if spec == "ray" or parts.scheme == "ray":
        address = "auto" if spec in ("ray", "ray://auto") else parts.netloc
        return HandleTransport(address, app_name)
    if parts.scheme in ("http", "https"):
        return HttpTransport(spec)
    raise ValueError(f"not a pool address: {spec!r} (ray, ray://HOST:PORT or http://HOST:PORT/ROUTE)")


# -- the backend -------------------------------------------------------------------------------

@dataclass
class _Request:
    """A job on its way: one thread streams its replies into the backend's queue."""

    job: Job
    audio: np.ndarray
    submitted: float
    """time.perf_counter() seconds"""
    deadline: float | None
    """time.perf_counter() seconds by which the engine wanted the result"""
    cancel: threading.Event
    tries: int = 1


class RayBackend:
    """The WorkerBackend interface over a Ray Serve pool (see the module docstring).

    `bundle`: the model jobs ask for when they name none ("" = the pool's default). `info` is
    the WorkerInfo of the replica that answered last; `restarts` counts requests lost with
    their replica. Each job has a thread that reads its replies; `events` hands them over."""

    def __init__(self, spec: str, bundle: str | None = None, app_name: str = APP_NAME,
                 transport: Transport | None = None) -> None:
        self.spec = spec
        self.bundle = bundle or ""
        self.transport = transport or transport_for(spec, app_name)
        self.info: WorkerInfo | None = None
        self.restarts = 0
        self.latencies: deque[LatencySample] = deque(maxlen=256)
        self._requests: dict[int, _Request] = {}
        self._replies: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._next_job_id = 1
        self._started = False

    def __enter__(self) -> RayBackend:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, timeout_s: float | None = None) -> WorkerInfo:
        """Reach the pool and ask a replica for its Hello (loading the default model if needed)."""
        try:
            self.transport.start()
            message, _ = decode_reply(unpack(self.transport.hello(self.bundle)))
        except TransportError as exc:
            raise WorkerError(f"the pool at {self.spec} is unreachable: {exc}") from None
        except Exception as exc:  # Ray: no cluster, no application of that name, …
            raise WorkerError(f"the pool at {self.spec} is unreachable: {type(exc).__name__}: {exc}") from None
        if not isinstance(message, Hello) or message.protocol != PROTOCOL_VERSION:
            raise WorkerError(f"the pool at {self.spec} speaks another protocol")
        self.info = message.worker
        self._started = True
        return self.info

    def close(self) -> None:
        """Cancel the requests in flight and wait (≤ 5 s) for their threads."""
        for request in self._requests.values():
            request.cancel.set()
        deadline = time.monotonic() + 5.0
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self._requests.clear()
        self.transport.close()

    def submit(self, audio: np.ndarray, sample_rate: int, *, preset: str, coarse_steps: int, c2f_steps: int,
               temperature: float = 1.0, top_p: float | None = None, seeds: Sequence[int] = (0,),
               beat_times_s: Sequence[float] | None = None, deadline_s: float | None = None,
               bundle: str | None = None, periodic_prompt: int | None = None,
               upper_codebook_mask: int | None = None, mask_density: float | None = None) -> int:
        """Send a job to the pool (see `WorkerBackend.submit`) → its job_id."""
        if not self._started:
            raise WorkerError("start() the backend first")
        now = time.perf_counter()
        sent = None if deadline_s is None else max(0.0, deadline_s - transfer_overhead_s(self.latencies))
        job = make_job(self._next_job_id, audio, sample_rate, preset=preset, coarse_steps=coarse_steps,
                       c2f_steps=c2f_steps, temperature=temperature, top_p=top_p, seeds=seeds,
                       beat_times_s=beat_times_s, deadline_s=sent, bundle=bundle or self.bundle or None,
                       periodic_prompt=periodic_prompt, upper_codebook_mask=upper_codebook_mask,
                       mask_density=mask_density)
        self._next_job_id += 1
        request = _Request(job, np.array(audio, np.float32), now, None if deadline_s is None else now + deadline_s,
                           threading.Event())
        self._requests[job.job_id] = request
        self._send(request)
        return job.job_id

    def cancel(self, job_id: int) -> None:
        """Cancel the request (best-effort: see the module docstring); a "cancelled" JobResult follows."""
        request = self._requests.get(job_id)
        if request is not None:
            request.cancel.set()

    def events(self, timeout_s: float = 0.0) -> list[Event]:
        """Progress, results and lost replicas since the last call, waiting up to `timeout_s`
        seconds for the first."""
        out: list[Event] = []
        try:
            item = self._replies.get(timeout=timeout_s) if timeout_s > 0 else self._replies.get_nowait()
        except queue.Empty:
            return out
        while True:
            out.extend(self._take(*item))
            try:
                item = self._replies.get_nowait()
            except queue.Empty:
                return out

    @property
    def in_flight(self) -> list[int]:
        """job_ids submitted and not yet answered"""
        return list(self._requests)

    # -- internals ---------------------------------------------------------------------------

    def _send(self, request: _Request) -> None:
        frames = encode(request.job, request.audio)
        thread = threading.Thread(target=self._stream, args=(request, pack(frames)), daemon=True,
                                  name=f"rtvamp-ray-job-{request.job.job_id}")
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def _stream(self, request: _Request, packed: bytes) -> None:
        """(thread) Stream one request's replies into the queue; its end as ("end", error)."""
        job_id = request.job.job_id
        try:
            for chunk in self.transport.stream(packed, request.job.bundle or "", request.cancel):
                self._replies.put((job_id, "reply", chunk))
        except RequestCancelled:
            self._replies.put((job_id, "cancelled", ""))
        except TransportError as exc:
            self._replies.put((job_id, "lost", str(exc)))
        else:
            self._replies.put((job_id, "end", ""))

    def _take(self, job_id: int, kind: str, payload) -> list[Event]:
        request = self._requests.get(job_id)
        if request is None:
            return []
        now = time.perf_counter()
        if kind == "reply":
            message, audio = decode_reply(unpack(payload))
            if isinstance(message, Hello):
                self.info = message.worker
            elif isinstance(message, Progress):
                return [message]
            elif isinstance(message, Result):
                del self._requests[job_id]
                latency = now - request.submitted
                if message.status == "ok":
                    self.latencies.append(latency_sample(request.job, message, latency))
                return [JobResult(job_id, message.status, message.error, audio.copy(), message.sample_rate,
                                  dict(message.seconds), latency, message.worker)]
            return []
        if kind == "cancelled" or (kind == "end" and request.cancel.is_set()):
            del self._requests[job_id]
            return [JobResult(job_id, "cancelled", "", np.zeros((0, 0, 0), np.float32), 0, {}, now - request.submitted,
                              self.info)]
        reason = payload or "the reply stream ended without a Result"
        self.restarts += 1
        return [WorkerLost(f"pool replica lost: {reason}"), *self._retry_or_fail(request, reason, now)]

    def _retry_or_fail(self, request: _Request, reason: str, now: float) -> list[Event]:
        """Submit a job lost with its replica once more when the deadline leaves time for it."""
        job_id = request.job.job_id
        left = None if request.deadline is None else request.deadline - now
        need = least_seconds(self.latencies, request.job)
        why_not = None
        if request.tries > RETRIES:
            why_not = f"tried {request.tries} times"
        elif left is not None and (left <= 0.0 or (need is not None and need > left)):
            why_not = f"its deadline leaves {max(left, 0.0):.2f} s, a replica needs {need or 0.0:.2f} s"
        if why_not is not None:
            del self._requests[job_id]
            return [failed_result(job_id, f"pool request lost ({reason}); {why_not}", now - request.submitted,
                                  self.info)]
        options = job_options(request.job)
        options["deadline_s"] = None if left is None else max(0.0, left - transfer_overhead_s(self.latencies))
        request.job = make_job(job_id, request.audio, request.job.sample_rate, **options)
        request.tries += 1
        self._send(request)
        return []
