"""Choose a generation backend from a spec string (``rtvamp live --backend SPEC``).

====================================  =======================================================
spec                                  backend
====================================  =======================================================
``local`` (default)                   :class:`~rtvamp.engine.backend.LocalWorker`: a worker
                                      child process on this machine
``tcp://HOST:PORT``                   :class:`~rtvamp.engine.backend.RemoteWorker`: ``rtvamp
                                      worker`` on a GPU box, CURVE keys from the keys folder,
                                      a LocalWorker as fallback
``ray`` / ``ray://auto``,             :class:`~rtvamp.cluster.backend.RayBackend` through a
``ray://HOST:PORT``                   DeploymentHandle (this machine joins the Ray cluster at
                                      HOST:PORT, its GCS address)
``http://HOST:PORT[/ROUTE]``          RayBackend through the pool's HTTP ingress (a laptop
                                      outside the cluster; no Ray needed)
====================================  =======================================================

The backend is returned unstarted: call `start()`.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from .backend import LocalWorker, RemoteWorker, WorkerBackend
from .keys import is_loopback, load_keys


def make_backend(spec: str, bundle: str | None = None, max_batch: int = 2, keys: str | os.PathLike | None = None,
                 fallback: bool = True, precision: str = "auto") -> WorkerBackend:
    """The backend that `spec` names (see the module docstring).

    `bundle`: bundle folder or name (for a pool: the model each job asks for, loaded on demand);
    `max_batch`: most candidates per job; `keys`: CURVE keys folder for tcp:// (default: the
    per-user folder; CURVE is used when `keys` is given or the endpoint is not loopback);
    `fallback`: give a tcp:// backend a LocalWorker to take over lost jobs; `precision`: the
    local worker's transformer precision (auto, fp32, int8; remote workers and pools choose their own).
    Raises ValueError for an unknown spec, KeysError (a ValueError) for missing keys."""
    scheme = urlsplit(spec).scheme
    if spec == "local":
        return LocalWorker(bundle=bundle, max_batch=max_batch, precision=precision)
    if scheme == "tcp":
        curve = None
        if keys is not None or not is_loopback(spec):
            curve = load_keys(keys, "client")
        local = LocalWorker(bundle=bundle, max_batch=max_batch, precision=precision) if fallback else None
        return RemoteWorker(spec, None if curve is None else curve.server_public, None if curve is None else curve.own,
                            fallback=local)
    if spec == "ray" or scheme in ("ray", "http", "https"):
        from ..cluster.backend import RayBackend

        return RayBackend(spec, bundle=bundle)
    raise ValueError(f"unknown backend {spec!r}: local, tcp://HOST:PORT, ray[://auto|HOST:PORT] or "
                     "http://HOST:PORT[/ROUTE]")
