"""The Ray Serve pool: replicas that each hold Vampers, for many performers on many GPUs.

One Serve application (default name ``rtvamp``) with one deployment, :class:`VampReplica`:

- each replica keeps the pool's default bundle loaded and warm, and loads other bundles
  (fine-tunes: ``rtvamp models download --lora NAME``) on demand with ``serve.multiplexed``,
  at most ``max_models_per_replica`` of them, least recently used evicted; Serve routes a job to
  a replica that already holds its model when it can;
- a replica runs one vamp at a time (a Vamper's buffers are not shared), on a thread, so its
  event loop keeps answering health checks and cancellations;
- its health check fails when a vamp has run longer than ``stuck_after_s`` seconds, and Serve
  replaces the replica;
- ``stream`` (DeploymentHandle) and HTTP ``POST`` (the ingress) take one packed Job
  (:func:`rtvamp.cluster.backend.pack`) and stream a Hello, Progress and the Result;
  ``hello`` and HTTP ``GET`` answer a Hello.

Replica count, autoscaling, ``max_ongoing_requests``, health checks and resources come from a
TOML file (the packaged ``pool.toml`` by default). Everything here imports Ray: the engine only
imports this module when the pool backend or ``rtvamp pool`` is used.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import msgspec
import ray
from ray import serve

from ..bundle import resolve_bundle
from ..engine.protocol import PROTOCOL_VERSION, Hello, Job, Progress, ProtocolError, decode_request, encode
from ..engine.worker import PROGRESS_INTERVAL_S, Cancelled, Identity, make_result, run_job, warm_up
from ..vamp import Vamper
from .backend import pack, prefixed, unpack

DEFAULT_CONFIG = Path(__file__).with_name("pool.toml")


@dataclass(frozen=True)
class PoolConfig:
    """A pool: where it listens, what it serves, and the Serve deployment options."""

    name: str = "rtvamp"
    """Serve application name"""
    route_prefix: str = "/rtvamp"
    http_host: str = "127.0.0.1"
    """address of Serve's HTTP proxy (0.0.0.0 exposes it: put TLS and authentication in front)"""
    http_port: int = 8000
    bundle: str = ""
    """default bundle (installed name or folder; "" = the embedded tiny one)"""
    max_batch: int = 2
    """most candidates per job"""
    threads: int = 0
    """onnxruntime intra-op threads per replica (0 = its default: every core of the node)"""
    precision: str = "auto"
    """transformer precision of every replica: auto (int8 on CPU replicas when the bundle's int8
    agrees with fp32, else fp32), fp32 or int8"""
    max_models_per_replica: int = 3
    """models (bundles) a replica keeps loaded besides the default, LRU"""
    stuck_after_s: float = 120.0
    """a replica whose vamp has run this long fails its health check"""
    deployment: dict = field(default_factory=dict)
    """Serve deployment options: num_replicas, max_ongoing_requests, health_check_period_s, …"""
    autoscaling: dict = field(default_factory=dict)
    """Serve autoscaling_config, used when num_replicas is "auto" """
    resources: dict = field(default_factory=dict)
    """Ray actor options of each replica: num_cpus, num_gpus"""

    def with_replicas(self, replicas: str | int) -> PoolConfig:
        """A copy with `replicas` replicas (a count, or "auto" for autoscaling)."""
        value = "auto" if str(replicas) == "auto" else int(replicas)
        if value != "auto" and value < 1:
            raise ValueError("replicas must be ≥ 1 or auto")
        return dataclasses.replace(self, deployment={**self.deployment, "num_replicas": value})

    def with_gpus(self, gpus: float) -> PoolConfig:
        """A copy whose replicas each hold `gpus` GPUs."""
        return dataclasses.replace(self, resources={**self.resources, "num_gpus": float(gpus)})

    def with_bundle(self, bundle: str) -> PoolConfig:
        """A copy whose default bundle is `bundle`."""
        return dataclasses.replace(self, bundle=bundle)

    def with_precision(self, precision: str) -> PoolConfig:
        """A copy whose replicas run the transformers in `precision` (auto, fp32, int8)."""
        return dataclasses.replace(self, precision=precision)

    def deployment_options(self) -> dict:
        """Keyword arguments of `Deployment.options` for this pool."""
        options = {**self.deployment, "ray_actor_options": dict(self.resources)}
        if options.get("num_replicas") == "auto":
            options["autoscaling_config"] = dict(self.autoscaling)
            del options["num_replicas"]
        return options

    @property
    def url(self) -> str:
        """The HTTP ingress URL (for `rtvamp live --backend URL`)."""
        return f"http://{self.http_host}:{self.http_port}{self.route_prefix}"


def load_config(path: Path | None = None) -> PoolConfig:
    """A PoolConfig from a TOML file ([pool], [deployment], [autoscaling], [resources])."""
    path = DEFAULT_CONFIG if path is None else path
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    unknown = set(data) - {"pool", "deployment", "autoscaling", "resources"}
    if unknown:
        raise ValueError(f"{path}: unknown sections {sorted(unknown)}")
    try:
        config = PoolConfig(**data.get("pool", {}), deployment=data.get("deployment", {}),
                            autoscaling=data.get("autoscaling", {}), resources=data.get("resources", {}))
    except TypeError as exc:
        raise ValueError(f"{path}: [pool] {exc}") from None
    if "num_replicas" in config.deployment:
        config = config.with_replicas(config.deployment["num_replicas"])
    return config


class VampReplica:
    """One replica (see the module docstring). `default_bundle` "" = the embedded tiny one."""

    def __init__(self, default_bundle: str, max_batch: int, threads: int, stuck_after_s: float,
                 precision: str = "auto") -> None:
        self.default_bundle, self.max_batch, self.stuck_after_s = default_bundle, max_batch, stuck_after_s
        self.threads, self.precision = threads, precision
        self.default = Identity(self._load(default_bundle))
        self._vamp_lock = threading.Lock()
        self._running_since: float | None = None

    def _load(self, model: str) -> Vamper:
        vamper = Vamper(resolve_bundle(model) if model else None, max_batch=self.max_batch, threads=self.threads,
                        precision=self.precision)
        warm_up(vamper)
        return vamper

    async def load_model(self, model: str) -> Identity:
        """A non-default bundle's Identity, loaded on a thread (wrapped by `serve.multiplexed`
        in :func:`build_app`: cached per replica, least recently used evicted)."""
        return Identity(await asyncio.to_thread(self._load, model))

    async def identity(self) -> Identity:
        """The Identity of the model this request names (raises ValueError for a bad bundle)."""
        model = serve.get_multiplexed_model_id()
        if model in ("", self.default_bundle, self.default.bundle):
            return self.default
        return await self.load_model(model)

    async def hello(self) -> bytes:
        """A packed Hello of the model this request names."""
        identity = await self.identity()
        return pack(encode(Hello(protocol=PROTOCOL_VERSION, worker=identity.info())))

    async def stream(self, request: bytes) -> AsyncIterator[bytes]:
        """Run one packed Job: yield a packed Hello, Progress messages and the Result."""
        try:
            job, audio = decode_request(unpack(request))
        except (ProtocolError, ValueError) as exc:
            raise ValueError(f"not a job: {exc}") from None
        if not isinstance(job, Job):
            raise ValueError(f"not a job: {type(job).__name__}")
        received = time.perf_counter()
        try:
            identity = await self.identity()
        except ValueError as exc:  # BundleError: not installed, hashes, contract
            yield pack(encode(make_result(job, self.default, "failed", str(exc))[0]))
            return
        yield pack(encode(Hello(protocol=PROTOCOL_VERSION, worker=identity.info())))
        job = msgspec.structs.replace(job, bundle=None)  # routed by model id; the replica serves it
        loop, replies, cancel = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
        last = -float("inf")

        def progress(stage: str, fraction: float) -> None:
            nonlocal last
            if cancel.is_set():
                raise Cancelled
            now = time.perf_counter()
            if now - last >= PROGRESS_INTERVAL_S:
                last = now
                message = Progress(job_id=job.job_id, stage=stage, fraction=min(max(fraction, 0.0), 1.0))
                loop.call_soon_threadsafe(replies.put_nowait, pack(encode(message)))

        def work() -> None:
            with self._vamp_lock:
                self._running_since = time.monotonic()
                try:
                    if cancel.is_set():
                        result, out = make_result(job, identity, "cancelled")
                    else:
                        result, out = run_job(identity, job, audio, received, progress, cancel.is_set)
                finally:
                    self._running_since = None
            loop.call_soon_threadsafe(replies.put_nowait, pack(encode(result, out)))
            loop.call_soon_threadsafe(replies.put_nowait, None)

        loop.run_in_executor(None, work)
        try:
            while (reply := await replies.get()) is not None:
                yield reply
        finally:  # normal end, or the request cancelled / the client gone: stop the vamp
            cancel.set()

    async def __call__(self, request):
        """HTTP ingress: GET → a packed Hello; POST a packed Job → a length-prefixed reply stream."""
        from starlette.responses import Response, StreamingResponse

        if request.method == "GET":
            return Response(await self.hello(), media_type="application/octet-stream")
        body = await request.body()

        async def framed() -> AsyncIterator[bytes]:
            async for reply in self.stream(body):
                yield prefixed(reply)

        return StreamingResponse(framed(), media_type="application/octet-stream")

    def check_health(self) -> None:
        """Fail (Serve then replaces the replica) when a vamp has been stuck for too long."""
        since = self._running_since
        if since is not None and time.monotonic() - since > self.stuck_after_s:
            raise RuntimeError(f"a vamp has been running for {time.monotonic() - since:.0f} s")


def build_app(config: PoolConfig) -> serve.Application:
    """The Serve application of a pool configuration."""
    replica = type("VampReplica", (VampReplica,), {
        "load_model": serve.multiplexed(max_num_models_per_replica=config.max_models_per_replica)(
            VampReplica.load_model)})
    deployment = serve.deployment(replica, name="VampReplica").options(**config.deployment_options())
    return deployment.bind(config.bundle, config.max_batch, config.threads, config.stuck_after_s, config.precision)


def connect(address: str) -> None:
    """Join the Ray cluster at `address` ("auto", "HOST:PORT", or "local": start one here,
    on 127.0.0.1), unless this process has already."""
    if ray.is_initialized():
        return
    if address == "local":
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)


def up(config: PoolConfig, address: str = "auto") -> str:
    """Deploy (or update) the pool and wait until it is running → its HTTP ingress URL."""
    connect(address)
    serve.start(http_options={"host": config.http_host, "port": config.http_port})
    serve.run(build_app(config), name=config.name, route_prefix=config.route_prefix)
    return config.url


def down(config: PoolConfig, address: str = "auto") -> None:
    """Delete the pool's application (the Ray cluster and Serve keep running)."""
    connect(address)
    serve.delete(config.name)


@dataclass(frozen=True)
class DeploymentState:
    """One deployment of the pool as `rtvamp pool status` shows it."""

    deployment: str
    status: str
    replicas: dict[str, int]
    """replica state (RUNNING, STARTING, …) → count"""
    message: str


def status(config: PoolConfig, address: str = "auto") -> list[DeploymentState]:
    """The pool's deployments and their replicas (empty when the pool is not deployed)."""
    connect(address)
    application = serve.status().applications.get(config.name)
    if application is None:
        return []
    return [DeploymentState(name, str(d.status.value if hasattr(d.status, "value") else d.status),
                            {str(getattr(s, "value", s)): n for s, n in d.replica_states.items()}, d.message)
            for name, d in application.deployments.items()]


def serve_forever(config: PoolConfig) -> None:
    """Keep this process (and a local Ray started by `connect("local")`) up until Ctrl-C."""
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(config.name)
