"""The LV2 plugin (bridge/lv2) built with make and run in a real LV2 host (lv2file, offline
over a WAV file) against a running bridge server; and its C wire format against the
protocol's test vectors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from rtvamp.bridge import ControlClient, wire
from rtvamp.bridge.server import BridgeServer, ServeOptions
from rtvamp.engine.backend import LocalWorker
from rtvamp.engine.core import CoreConfig
from rtvamp.engine.engine import Engine, EngineConfig

from test_bridge import free_base_port

ROOT = Path(__file__).resolve().parent.parent
LV2_SOURCE = ROOT / "bridge" / "lv2"
VECTORS = ROOT / "bridge" / "vectors"
URI = "urn:rtvamp:bridge"
SR = 44100
BLOCK = 256
INSTALL = "apt-get install -y lv2-dev libzmq3-dev lilv-utils lv2file pkg-config"


def _missing() -> str | None:
    for tool in ("make", "cc", "pkg-config", "lv2file"):
        if shutil.which(tool) is None:
            return tool
    for pkg in ("lv2", "libzmq"):
        if subprocess.run(["pkg-config", "--exists", pkg]).returncode != 0:
            return f"pkg-config {pkg}"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=f"{_missing()} is missing: {INSTALL}")


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lv2build")
    proc = subprocess.run(["make", "-C", str(LV2_SOURCE), f"OUT={out}"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


# -- the C wire format against the vectors --------------------------------------------------------

def wire_test(build: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(build / "wire_test"), *args], capture_output=True, timeout=30)


@pytest.mark.parametrize("name", sorted(p.stem for p in VECTORS.glob("frame_*.json")) +
                         sorted(p.stem for p in VECTORS.glob("bad_*.json")))
def test_c_decodes_frames_like_the_vectors(build, name):
    meaning = json.loads((VECTORS / f"{name}.json").read_text())
    got = json.loads(wire_test(build, "frame", str(VECTORS / f"{name}.bin")).stdout)
    if "error" in meaning:
        assert got["status"] == meaning["error"]
        return
    assert got["status"] == "ok" and got["reencoded"]
    assert got["header"] == {k: meaning["header"][k] for k in got["header"]}
    assert got["samples"] == np.array(meaning["samples"], np.float32).ravel().tolist()


@pytest.mark.parametrize("name", ["session_welcome", "session_reject_version", "session_notice", "session_bye"])
def test_c_reads_session_messages_like_the_vectors(build, name):
    meaning = json.loads((VECTORS / f"{name}.json").read_text())["message"]
    got = json.loads(wire_test(build, "session", str(VECTORS / f"{name}.bin")).stdout)
    assert got["status"] == "ok"
    assert {k: got[k] for k in meaning if k in got} == {k: v for k, v in meaning.items() if k in got}


def test_c_writes_hello_and_bye_byte_for_byte(build):
    hello = wire.decode_session((VECTORS / "session_hello.bin").read_bytes())
    out = wire_test(build, "hello", str(hello.sample_rate), str(hello.channels), str(hello.block_frames),
                    str(hello.jitter_blocks), hello.client)
    assert out.stdout == (VECTORS / "session_hello.bin").read_bytes()
    bye = wire.decode_session((VECTORS / "session_bye.bin").read_bytes())
    assert wire_test(build, "bye", str(bye.stream_id), bye.reason).stdout == (VECTORS / "session_bye.bin").read_bytes()


# -- the plugin in lv2file ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    """A bridge server at 44.1 kHz with the engine's monitor at 0.5: its output is 0.5 × input
    (after a 10 ms glide), so the engine's audio is told from the plugin's dry signal."""
    with LocalWorker(max_batch=1) as worker:
        engine = Engine(worker, EngineConfig(core=CoreConfig(sample_rate=SR, crossfade_ms=10)))
        endpoint = f"tcp://127.0.0.1:{free_base_port()}"
        with BridgeServer(engine, ServeOptions(bind=endpoint)) as srv:
            welcomes: list[wire.Welcome] = []
            send = srv.audio._send

            def spy(peer: bytes, data: bytes) -> None:  # what the engine states in each handshake
                if not wire.is_frame(data) and isinstance(message := wire.decode_session(data), wire.Welcome):
                    welcomes.append(message)
                send(peer, data)

            srv.audio._send = spy
            with ControlClient(endpoint) as ctl:
                ctl.set("dry", 0.5)
            yield srv, endpoint, welcomes
        engine.close()


def render(build: Path, endpoint: str, x: np.ndarray, tmp_path: Path, **controls: float) -> np.ndarray:
    src, dst = tmp_path / "in.wav", tmp_path / "out.wav"
    sf.write(src, x, SR, subtype="FLOAT")
    params = [a for k, v in controls.items() for a in ("-p", f"{k}:{v}")]
    proc = subprocess.run(["lv2file", "-i", str(src), "-o", str(dst), "-b", str(BLOCK), *params, URI],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "LV2_PATH": str(build / "lv2"), "RTVAMP_ENDPOINT": endpoint})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    y, rate = sf.read(dst, dtype="float32", always_2d=True)
    assert rate == SR and y.shape == x.shape
    return y


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    return (0.2 * np.random.default_rng(seed).standard_normal((int(seconds * SR), 2))).astype(np.float32)


FADE = int(0.01 * SR)


def test_the_render_is_the_engines_output_at_exactly_the_stated_latency(build, server, tmp_path):
    srv, endpoint, welcomes = server
    before = dict(srv.stats)
    x = noise(3.0)
    y = render(build, endpoint, x, tmp_path, freewheel=1, trigger=1, bars=1)
    latency = welcomes[-1].latency_samples
    assert latency == 2 * BLOCK  # the plugin's default jitter buffer: 2 blocks of the host's 256
    assert not y[:latency].any()
    engine_out = 0.5 * x[:-latency]
    np.testing.assert_array_equal(y[latency + FADE:], engine_out[FADE:])  # bit for bit, no other lag fits
    for lag in (latency - 1, latency + 1):
        assert not np.array_equal(y[lag + FADE:lag + FADE + BLOCK], engine_out[FADE:FADE + BLOCK])
    stats = srv.stats
    assert stats["processed"] - before["processed"] == -(-x.shape[0] // BLOCK)
    assert stats["concealed"] == before["concealed"]
    deadline = time.monotonic() + 3
    while stats["triggers"] == before["triggers"] and time.monotonic() < deadline:  # the trigger port
        time.sleep(0.05)
    assert stats["triggers"] == before["triggers"] + 1


def test_with_the_engine_stopped_the_output_is_the_input(build, tmp_path):
    x = noise(1.0, seed=1)
    y = render(build, f"tcp://127.0.0.1:{free_base_port()}", x, tmp_path, freewheel=1)
    latency = 2 * BLOCK  # the plugin keeps its latency, so a host's compensation stays right
    assert not y[:latency].any()
    np.testing.assert_array_equal(y[latency:], x[:-latency])


def test_in_real_time_a_late_engine_never_leaves_silence(build, server, tmp_path):
    """Without freewheeling the plugin never waits: blocks whose reply is late play dry."""
    srv, endpoint, _ = server
    x = noise(2.0, seed=2)
    y = render(build, endpoint, x, tmp_path, drywet=1)
    latency = 2 * BLOCK
    n = (x.shape[0] - latency) // BLOCK * BLOCK
    got = y[latency:latency + n].reshape(-1, BLOCK, 2)
    want = x[:n].reshape(-1, BLOCK, 2)
    dry = np.all(got == want, axis=(1, 2))
    wet = np.all(got == 0.5 * want, axis=(1, 2))
    assert np.all(dry | wet)
