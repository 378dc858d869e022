"""The Ray Serve pool: a real local Ray instance (head on 127.0.0.1, 2 CPUs) running the pool
with 2 replicas on the tiny bundle, reached through DeploymentHandles and the HTTP ingress."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the Ray pool needs the cluster extra: pip install 'rtvamp[cluster]'")
serve = pytest.importorskip("ray.serve", reason="the Ray pool needs the cluster extra: pip install 'rtvamp[cluster]'")

from rtvamp.bundle import default_bundle_path  # noqa: E402
from rtvamp.cluster import pool  # noqa: E402
from rtvamp.cluster.backend import RayBackend, pack, unpack  # noqa: E402
from rtvamp.engine.backend import JobResult, LocalWorker, WorkerError, WorkerLost  # noqa: E402
from rtvamp.engine.backends import make_backend  # noqa: E402
from rtvamp.engine.protocol import Progress  # noqa: E402

from test_remote_worker import VERY_LONG, free_port  # noqa: E402
from test_worker import FAST, LONG, RATE, START_S, clip, first_progress, result_of, wait_for  # noqa: E402


@pytest.fixture(scope="module")
def config():
    """A 2-replica pool on a local Ray head (127.0.0.1, 2 CPUs); torn down after the module."""
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    config = dataclasses.replace(pool.load_config().with_replicas(2), http_port=free_port(),
                                 deployment={**pool.load_config().deployment, "num_replicas": 2,
                                             "health_check_period_s": 1.0})
    try:
        assert pool.up(config, "auto") == config.url
        yield config
    finally:
        serve.shutdown()
        ray.shutdown()


def replica_pids(config, count: int = 2, timeout_s: float = 90.0) -> set[int]:
    """The pids of the pool's replica processes (their title is ray::ServeReplica:APP:…) once
    `count` of them run."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = pool.status(config, "auto")
        pids = set()
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    title = f.read()
            except (OSError, ValueError):
                continue
            if title.startswith(f"ray::ServeReplica:{config.name}:".encode()):
                pids.add(int(entry))
        if states and states[0].replicas.get("RUNNING") == count and len(pids) == count:
            return pids
        assert time.monotonic() < deadline, f"the pool did not get {count} running replicas: {states}, {pids}"
        time.sleep(0.5)


def test_framing_round_trips():
    frames = [b"header", b"", bytes(range(256)) * 3]
    assert [bytes(f) for f in unpack(pack(frames))] == frames
    with pytest.raises(ValueError, match="truncated"):
        unpack(pack(frames)[:-1])


def test_the_default_config_is_valid_and_overridable():
    config = pool.load_config()
    assert config.http_host == "127.0.0.1", "the ingress binds loopback by default"
    auto = config.with_replicas("auto").with_gpus(0.5).deployment_options()
    assert "num_replicas" not in auto and auto["autoscaling_config"]["max_replicas"] >= 1
    assert auto["ray_actor_options"]["num_gpus"] == 0.5 and auto["max_ongoing_requests"] == 1


def test_jobs_from_two_engines_spread_over_both_replicas(config):
    pids = replica_pids(config)
    with make_backend("ray") as one, make_backend(config.url) as two:  # handle and HTTP ingress
        assert isinstance(one, RayBackend) and isinstance(two, RayBackend)
        assert one.info.pid in pids and two.info.pid in pids
        jobs = [(backend, backend.submit(clip(), RATE, seeds=[1], **LONG)) for backend in (one, two)]
        results = [result_of(wait_for(b, [j], timeout_s=60), j) for b, j in jobs]
        assert [r.status for r in results] == ["ok", "ok"], [r.error for r in results]
        assert {r.worker.pid for r in results} == pids, "concurrent jobs run on both replicas"
        assert results[0].audio.shape == (1, RATE + 17, 2)
        assert {"encode", "coarse", "c2f", "decode"} <= set(results[0].seconds)


def test_tokens_match_the_local_backend(config):
    with LocalWorker(start_timeout_s=START_S) as local, make_backend("ray") as remote:
        audio = clip(1.0)
        kwargs = dict(seeds=[5, 6], preset="medium-variation", coarse_steps=6, c2f_steps=2, temperature=0.9)
        here = local.submit(audio, RATE, **kwargs)
        there = remote.submit(audio, RATE, **kwargs)
        a = result_of(wait_for(local, [here]), here)
        b = result_of(wait_for(remote, [there]), there)
    assert a.status == b.status == "ok"
    # same tokens → the same decoded audio up to float rounding; one different token in the
    # 14 × 58 generated ones changes the audio far more than this tolerance
    np.testing.assert_allclose(a.audio, b.audio, rtol=0, atol=1e-5)


def test_a_multiplexed_model_switch(config, tmp_path):
    other = tmp_path / "tiny-b"
    shutil.copytree(default_bundle_path(), other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "name": "tiny-b"}))
    with make_backend(config.url) as backend:
        first = backend.submit(clip(0.5), RATE, seeds=[1], bundle=str(other), **FAST)
        second = backend.submit(clip(0.5), RATE, seeds=[1], **FAST)
        third = backend.submit(clip(0.5), RATE, seeds=[1], bundle="no-such-bundle", **FAST)
        events = wait_for(backend, [first, second, third], timeout_s=120)
    assert result_of(events, first).worker.bundle == "tiny-b"
    assert result_of(events, second).worker.bundle == "tiny"
    missing = [e for e in events if isinstance(e, JobResult) and e.job_id == third][0]
    assert missing.status == "failed" and "no-such-bundle" in missing.error


def test_cancel_stops_the_replica(config):
    with make_backend(config.url) as backend:
        long_job = backend.submit(clip(10.0), RATE, seeds=[1], **VERY_LONG)
        first_progress(backend, long_job)
        cancelled_at = time.monotonic()
        backend.cancel(long_job)
        assert result_of(wait_for(backend, [long_job], timeout_s=10), long_job).status == "cancelled"
        assert time.monotonic() - cancelled_at < 3.0
        jobs = [backend.submit(clip(0.5), RATE, seeds=[1], **FAST) for _ in range(2)]
        events = wait_for(backend, jobs, timeout_s=10)  # VERY_LONG would hold its replica for minutes
        assert all(result_of(events, j).status == "ok" for j in jobs)


def running_again(backend: RayBackend, job: int, events: list, timeout_s: float = 90.0) -> list:
    """Events until `job`, lost with its replica, reports progress from its retry."""
    deadline = time.monotonic() + timeout_s
    while True:
        lost = next((i for i, e in enumerate(events) if isinstance(e, WorkerLost)), None)
        if lost is not None and any(isinstance(e, Progress) and e.job_id == job for e in events[lost:]):
            return events
        assert not any(isinstance(e, JobResult) and e.job_id == job for e in events), "ended before its retry ran"
        assert time.monotonic() < deadline, "the job was never retried"
        events += backend.events(0.1)


def test_a_replica_killed_mid_job_is_restarted_and_the_job_retried_or_reported(config):
    before = replica_pids(config)
    with make_backend("ray") as backend:
        job = backend.submit(clip(), RATE, seeds=[1], **LONG)
        first_progress(backend, job)
        victim = backend.info.pid  # the replica that said Hello for this job
        os.kill(victim, signal.SIGKILL)
        events = wait_for(backend, [job], timeout_s=90)
        assert sum(isinstance(e, WorkerLost) for e in events) == 1
        retried = result_of(events, job)
        assert retried.status == "ok" and retried.worker.pid in before - {victim}, "retried on the other replica"
        restarted = replica_pids(config)
        assert victim not in restarted, "Serve replaced the killed replica"

        job = backend.submit(clip(), RATE, seeds=[1], **LONG)
        first_progress(backend, job)
        victims = [backend.info.pid]
        os.kill(victims[0], signal.SIGKILL)
        running_again(backend, job, [])
        victims.append(backend.info.pid)
        assert victims[1] != victims[0]
        os.kill(victims[1], signal.SIGKILL)
        reported = result_of(wait_for(backend, [job], timeout_s=90), job)
        assert reported.status == "failed" and "pool request lost" in reported.error
        assert "tried 2 times" in reported.error
    after = replica_pids(config)
    assert not after & {victim, *victims}, "Serve restarted every killed replica"
    with make_backend("ray") as backend:
        job = backend.submit(clip(0.5), RATE, seeds=[1], **FAST)
        assert result_of(wait_for(backend, [job], timeout_s=60), job).status == "ok"


def test_an_unreachable_pool_is_a_clear_error():
    with pytest.raises(WorkerError, match="unreachable"):
        make_backend(f"http://127.0.0.1:{free_port()}/rtvamp").start()


def test_pool_status_command(config, capsys):
    import argparse

    from rtvamp.engine.remote_cli import register_cli

    parser = argparse.ArgumentParser(prog="rtvamp")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["pool", "status", "--address", "auto"])
    args.func(args)
    assert [s.replicas for s in pool.status(config, "auto")] == [{"RUNNING": 2}]
    assert "VampReplica" in capsys.readouterr().err
