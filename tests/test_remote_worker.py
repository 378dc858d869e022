"""The remote worker: real `rtvamp.engine.worker` processes on 127.0.0.1 TCP with CURVE keys,
a real LocalWorker fallback, and an engine that must keep playing when the remote one dies."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rtvamp.engine.backend import LocalWorker, RemoteWorker, WorkerConnection, WorkerError, WorkerLost
from rtvamp.engine.backends import make_backend
from rtvamp.engine.engine import Engine, EngineConfig
from rtvamp.engine.keys import (CLIENT, SERVER, KeysError, create_keypair, init_keys, is_loopback, load_keys,
                                load_public_key)
from rtvamp.engine.protocol import Heartbeat, Progress
from rtvamp.engine.scheduler import Trigger, VampParams
from rtvamp.engine.transport import Quantize
from rtvamp.engine.worker import InsecureBindError, check_bind
from rtvamp.synth import groove

from test_worker import FAST, LONG, RATE, START_S, clip, first_progress, result_of, wait_for

VERY_LONG = dict(preset="medium-variation", coarse_steps=1000, c2f_steps=1)
"""seconds (2 s clip) to minutes (10 s clip) of coarse steps (LONG runs ~1 s on a 1 s clip)"""

SILENCE_S = 10.0
"""heartbeat timeout of the tests' RemoteWorkers: a killed worker is noticed at once (the
connection drops), and a worker starved of CPU by other test runs is not declared lost"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_worker(endpoint: str, keys: Path | None, log: Path) -> subprocess.Popen:
    """`python -m rtvamp.engine.worker` (stderr to `log`); returns once it listens."""
    command = [sys.executable, "-m", "rtvamp.engine.worker", "--bind", endpoint, "--nice", "0"]
    if keys is not None:
        command += ["--curve-keys", str(keys)]
    with open(log, "ab") as err:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + START_S
    while b"serving bundle" not in log.read_bytes():
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "the worker never started"
        time.sleep(0.05)
    return process


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("keys")
    init_keys(folder)
    return folder


@pytest.fixture(scope="module")
def remote(keys, tmp_path_factory):
    """A CURVE worker on 127.0.0.1 that lives for the module: (endpoint, process, log)."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    log = tmp_path_factory.mktemp("remote") / "worker.log"
    process = spawn_worker(endpoint, keys, log)
    yield endpoint, process, log
    stop(process)


def connect(endpoint: str, keys: Path, fallback: LocalWorker | None = None) -> RemoteWorker:
    curve = load_keys(keys, CLIENT)
    return RemoteWorker(endpoint, curve.server_public, curve.own, fallback=fallback, heartbeat_timeout_s=SILENCE_S)


# -- keys and refusals -------------------------------------------------------------------------

def test_keys_are_named_pairs_in_a_folder(tmp_path):
    with pytest.raises(KeysError, match="no keys folder"):
        load_keys(tmp_path / "missing")
    init_keys(tmp_path)
    server, client = load_keys(tmp_path, SERVER), load_keys(tmp_path, CLIENT)
    assert client.server_public == server.own.public and server.authorized == (client.own.public,)
    assert (tmp_path / "server.key_secret").stat().st_mode & 0o777 == 0o600
    with pytest.raises(KeysError, match="exists already"):
        create_keypair(SERVER, tmp_path)
    bridge = create_keypair("bridge", tmp_path)  # any other named pair (e.g. the DAW bridge's)
    assert load_public_key("bridge", tmp_path) == bridge.public != server.own.public
    (tmp_path / "authorized" / "client.key").unlink()
    with pytest.raises(KeysError, match="holds no client keys"):
        load_keys(tmp_path, SERVER)
    (tmp_path / "garbage.key").write_text("not a certificate")
    with pytest.raises(KeysError, match="not a ZeroMQ certificate"):
        load_public_key(tmp_path / "garbage.key")


@pytest.mark.parametrize("endpoint,local", [("tcp://127.0.0.1:5555", True), ("tcp://localhost:5555", True),
                                            ("tcp://[::1]:5555", True), ("ipc:///tmp/w.ipc", True),
                                            ("tcp://*:5555", False), ("tcp://0.0.0.0:5555", False),
                                            ("tcp://192.168.1.20:5555", False), ("tcp://gpu-box:5555", False)])
def test_only_loopback_endpoints_go_without_keys(endpoint, local):
    assert is_loopback(endpoint) is local
    if local:
        check_bind(endpoint, None)
    else:
        with pytest.raises(InsecureBindError, match="without CURVE keys"):
            check_bind(endpoint, None)
        with pytest.raises(WorkerError, match="unencrypted"):
            RemoteWorker(endpoint)  # refused before any socket exists: nothing is sent anywhere


def test_a_worker_refuses_to_bind_the_network_without_keys(tmp_path):
    run = subprocess.run([sys.executable, "-m", "rtvamp.engine.worker", "--bind", f"tcp://0.0.0.0:{free_port()}"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "refusing to bind tcp://0.0.0.0" in run.stderr
    run = subprocess.run([sys.executable, "-m", "rtvamp.engine.worker", "--bind", f"tcp://127.0.0.1:{free_port()}",
                          "--curve-keys", str(tmp_path / "none")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "no keys folder" in run.stderr


def test_wrong_keys_are_refused_with_a_clear_error_and_counted(remote, keys, tmp_path):
    endpoint, _, log = remote
    stranger = create_keypair(CLIENT, tmp_path)  # a keypair the worker never authorized
    with pytest.raises(WorkerError, match="refused this client's key"):
        RemoteWorker(endpoint, load_public_key(SERVER, keys), stranger).start(timeout_s=10)
    impostor = create_keypair(SERVER, tmp_path)  # the engine holds the wrong server key
    with pytest.raises(WorkerError, match="server's public key here .* is not the server's"):
        RemoteWorker(endpoint, impostor.public, load_keys(keys, CLIENT).own).start(timeout_s=10)
    with pytest.raises(WorkerError, match="handshake .* failed|no Hello"):
        RemoteWorker(endpoint).start(timeout_s=3)  # no keys at all, on loopback
    import zmq

    context = zmq.Context()
    connection = WorkerConnection(context, endpoint, "test", load_keys(keys, CLIENT))
    try:
        refused, deadline = None, time.monotonic() + 10
        while refused is None:
            assert time.monotonic() < deadline, "no heartbeat"
            refused = next((m.refused for m, _ in connection.receive(0.2) if isinstance(m, Heartbeat)), None)
    finally:
        connection.close()
        context.term()
    assert refused >= 3
    assert "refused a connection in the CURVE handshake" in log.read_text()


# -- jobs --------------------------------------------------------------------------------------

def test_jobs_round_trip_over_curve(remote, keys):
    endpoint, process, _ = remote
    with connect(endpoint, keys) as backend:
        assert backend.info.pid == process.pid and "CPUExecutionProvider" in backend.info.providers
        assert any(k.startswith("coarse/") for k in backend.info.step_seconds), "step costs measured at start"
        audio = clip(1.0)
        first = backend.submit(audio, RATE, seeds=[1, 2], **FAST)
        second = backend.submit(audio, RATE, seeds=[1, 2], deadline_s=30.0, **FAST)
        events = wait_for(backend, [first, second])
        a, b = result_of(events, first), result_of(events, second)
        assert a.status == b.status == "ok", (a.error, b.error)
        assert a.audio.shape == (2, audio.shape[0], 2) and a.worker.pid == process.pid
        np.testing.assert_array_equal(a.audio, b.audio)  # same seeds, same audio
        assert {"encode", "coarse", "c2f", "decode", "queued"} <= set(a.seconds)
        assert any(isinstance(e, Progress) and e.job_id == first for e in events)
        sample = backend.latencies[-1]
        assert 0.0 <= sample.overhead_s < sample.latency_s
        long_job = backend.submit(clip(2.0), RATE, seeds=[1], **VERY_LONG)
        first_progress(backend, long_job)
        backend.cancel(long_job)
        assert result_of(wait_for(backend, [long_job], timeout_s=10), long_job).status == "cancelled"


def test_a_remote_lost_mid_job_falls_back_or_reports(keys, tmp_path):
    endpoint, log = f"tcp://127.0.0.1:{free_port()}", tmp_path / "worker.log"
    process = spawn_worker(endpoint, keys, log)
    fallback = LocalWorker(start_timeout_s=START_S)
    try:
        with connect(endpoint, keys, fallback=fallback) as backend:
            running = backend.submit(clip(), RATE, seeds=[1], **LONG)  # no deadline: falls back
            expired = backend.submit(clip(0.5), RATE, seeds=[1], deadline_s=0.1, **FAST)  # reported
            roomy = backend.submit(clip(0.5), RATE, seeds=[1], deadline_s=60.0, **FAST)  # falls back
            events = first_progress(backend, running)
            time.sleep(0.3)
            os.kill(process.pid, signal.SIGKILL)
            events += wait_for(backend, [running, expired, roomy], timeout_s=60)
            lost = [e for e in events if isinstance(e, WorkerLost)]
            assert len(lost) == 1 and "dropped" in lost[0].reason
            assert result_of(events, running).status == "ok"
            assert result_of(events, running).worker.pid == fallback.process.pid
            assert result_of(events, roomy).status == "ok"
            late = result_of(events, expired)
            assert late.status == "failed" and "remote worker lost" in late.error
            assert "deadline leaves 0.00 s" in late.error
            assert backend.fallbacks == 2 and not backend.connected
            while_away = backend.submit(clip(0.5), RATE, seeds=[1], **FAST)
            assert result_of(wait_for(backend, [while_away]), while_away).worker.pid == fallback.process.pid
            process = spawn_worker(endpoint, keys, log)  # the GPU box comes back on the same address
            deadline = time.monotonic() + 20
            while not backend.connected:
                assert time.monotonic() < deadline, "never reconnected"
                backend.events(0.1)
            assert backend.restarts == 1
            back = backend.submit(clip(0.5), RATE, seeds=[1], **FAST)
            assert result_of(wait_for(backend, [back]), back).worker.pid == process.pid
    finally:
        stop(process)
    assert fallback.process.poll() is not None, "closing the remote backend closes its fallback"


def test_the_engine_keeps_playing_when_the_remote_dies(keys, tmp_path):
    endpoint, log = f"tcp://127.0.0.1:{free_port()}", tmp_path / "worker.log"
    process = spawn_worker(endpoint, keys, log)
    backend = make_backend(endpoint, keys=keys)
    assert isinstance(backend, RemoteWorker) and isinstance(backend.fallback, LocalWorker)
    backend.heartbeat_timeout_s = SILENCE_S
    backend.start()
    bar = 2 * RATE
    try:
        with Engine(backend, EngineConfig(), threaded=False) as engine:
            x = np.repeat(groove(bars=6, bpm=120)[:, None], 2, axis=1)
            s, out = engine.scheduler, np.zeros_like(x)
            s.record(Quantize.BAR)
            for start in range(0, x.shape[0], 256):
                if start <= bar + 1024 < start + 256:
                    s.stop_record(Quantize.BAR)
                if start <= 2 * bar + 1024 < start + 256:
                    s.trigger(Trigger("input", bars=1, params=VampParams(steps=400)))
                    first_progress(backend, s.jobs[1].backend_id)
                    os.kill(process.pid, signal.SIGKILL)
                s.poll(timeout_s=0.002)
                engine.process(x[start:start + 256], out[start:start + 256], start)
            deadline = time.monotonic() + 60
            while s.jobs[1].status == "running" and time.monotonic() < deadline:
                s.poll(timeout_s=0.05)
            assert s.jobs[1].status == "ok", s.jobs[1].error  # finished by the local fallback
            assert any("worker lost" in m for m in s.messages)
            assert backend.fallbacks == 1
            assert np.abs(out[3 * bar:]).max() > 0.01, "the loop keeps playing"
            job = s.trigger(Trigger("loop", bars=1, params=VampParams(steps="fast")))
            while job.status == "running" and time.monotonic() < deadline + 30:
                s.poll(timeout_s=0.05)
            assert job.status == "ok"
    finally:
        stop(process)


def test_the_scale_out_commands(tmp_path, capsys):
    import argparse

    from rtvamp.engine.remote_cli import register_cli

    parser = argparse.ArgumentParser(prog="rtvamp")
    register_cli(parser.add_subparsers(dest="command", required=True))

    def run(*argv: str) -> None:
        args = parser.parse_args(list(argv))
        args.func(args)

    run("keys", "--dir", str(tmp_path))  # no sub-command: init
    assert load_keys(tmp_path, SERVER).authorized == (load_keys(tmp_path, CLIENT).own.public,)
    run("keys", "--dir", str(tmp_path), "new", "laptop-2")
    run("keys", "--dir", str(tmp_path), "authorize", str(tmp_path / "laptop-2.key"))
    assert len(load_keys(tmp_path, SERVER).authorized) == 2
    assert capsys.readouterr().out.splitlines()[-1].endswith("authorized/laptop-2.key")
    with pytest.raises(SystemExit) as refused:
        run("worker", "--bind", f"tcp://0.0.0.0:{free_port()}")
    assert refused.value.code == 2
    with pytest.raises(ValueError, match="unknown backend"):
        make_backend("udp://127.0.0.1:5555")
    with pytest.raises(KeysError, match="no keys folder"):
        make_backend("tcp://192.168.1.20:5555", keys=tmp_path / "missing")
