"""The DAW bridge over real ZeroMQ sockets on loopback: wire format and test vectors, the
engine endpoint (DAW-clocked processing, jitter buffer, loss, reordering, transport sync),
control and MIDI learn, sessions that vanish or are replaced, CURVE, and a fuzz of ≥ 100k
random and mutated messages at a running `rtvamp serve`."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest
import zmq

from rtvamp.bridge import AudioStream, BridgeRefused, ClientKeys, ControlClient, ControlError, DawTransport
from rtvamp.bridge import wire
from rtvamp.bridge.cli import generate_keys
from rtvamp.bridge.server import BridgeError, BridgeServer, ServeOptions, ServerKeys
from rtvamp.bridge.wire import Flag, FrameHeader, WireError
from rtvamp.engine.backend import LocalWorker
from rtvamp.engine.core import CoreConfig
from rtvamp.engine.engine import Engine, EngineConfig
from conftest import SharedBackend

VECTORS = Path(__file__).resolve().parent.parent / "bridge" / "vectors"
SR = 44100
BLOCK = 256


def free_base_port() -> int:
    """A port P with P, P + 1 and P + 2 free on loopback."""
    rng = np.random.default_rng()
    for _ in range(100):
        port = int(rng.integers(20000, 60000))
        socks = []
        try:
            for k in range(3):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port + k))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def noise(n: int, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal((n, 2))).astype(np.float32)


# -- wire format and vectors ---------------------------------------------------------------------

def vectors() -> list[str]:
    return sorted(p.stem for p in VECTORS.glob("*.json"))


@pytest.mark.parametrize("name", vectors())
def test_vectors_decode_and_reencode(name):
    data = (VECTORS / f"{name}.bin").read_bytes()
    meaning = json.loads((VECTORS / f"{name}.json").read_text())
    assert meaning["bytes"] == len(data)
    if meaning["kind"] == "frame" and "error" in meaning:
        with pytest.raises(WireError) as exc:
            wire.decode_frame(data)
        assert exc.value.reason == meaning["error"]
    elif meaning["kind"] == "frame":
        header, samples = wire.decode_frame(data)
        assert {k: getattr(header, k) for k in meaning["header"]} == meaning["header"]
        np.testing.assert_array_equal(samples, np.array(meaning["samples"], np.float32))
        assert wire.encode_frame(header, samples) == data
    else:
        decode = wire.decode_session if meaning["kind"] == "session" else wire.decode_request
        message = decode(data)
        assert json.loads(msgspec.json.encode(message)) == meaning["message"]
        assert wire.encode_message(message) == data


def test_header_is_68_bytes_and_frames_round_trip():
    assert wire.HEADER_BYTES == 68
    x = noise(BLOCK)
    h = FrameHeader(3, 9, 1000, BLOCK, 2, SR, flags=Flag.TRANSPORT | Flag.PLAYING, tempo=90.0, bar=2, beat=1.5,
                    beats_per_bar=4.0)
    back, samples = wire.decode_frame(wire.encode_frame(h, x))
    assert back == h
    np.testing.assert_array_equal(samples, x)
    assert not wire.is_frame(wire.encode_message(wire.GetState()))


# -- an engine served in this process ------------------------------------------------------------

@pytest.fixture(scope="module")
def worker():
    with LocalWorker(max_batch=2) as w:
        yield w


def make_engine(worker) -> Engine:
    engine = Engine(SharedBackend(worker), EngineConfig(core=CoreConfig(sample_rate=SR, crossfade_ms=10)))
    engine.core.post("gains", 0.0, 1.0)
    return engine


@pytest.fixture
def served(worker):
    """(engine, server, endpoint) on a fresh port, a stream silent for 1 s ends."""
    engine = make_engine(worker)
    endpoint = f"tcp://127.0.0.1:{free_base_port()}"
    server = BridgeServer(engine, ServeOptions(bind=endpoint, session_timeout_s=1.0)).start()
    yield engine, server, endpoint
    server.close()
    engine.close()


FADE = int(0.01 * SR)  # the engine's gain glide after `set dry`


def test_blocks_come_back_processed_with_the_stated_latency(served):
    engine, server, endpoint = served
    with ControlClient(endpoint) as ctl, AudioStream(endpoint, block_frames=BLOCK, jitter_blocks=2) as stream:
        assert stream.latency_samples == 2 * BLOCK
        assert ctl.set("dry", 0.5) == 0.5
        x = noise(BLOCK * 40)
        out = np.concatenate([stream.process(x[k:k + BLOCK], transport=DawTransport.at(k, SR, 100.0))
                              for k in range(0, x.shape[0], BLOCK)])
        np.testing.assert_array_equal(out[FADE:], 0.5 * x[FADE:])  # the engine's output, exactly
        state = ctl.state()
    assert state.synced and state.bpm == pytest.approx(100.0)
    assert state.stream.latency_samples == 2 * BLOCK and state.stream.jitter_blocks == 2
    bar, beat = engine.transport.position(engine.core.now)
    daw = DawTransport.at(x.shape[0], SR, 100.0)
    assert (bar, beat) == (daw.bar, pytest.approx(daw.beat, abs=1e-3))
    assert state.stats["processed"] == 40 and state.stats["concealed"] == 0


def test_daw_locate_resyncs_the_grid(served):
    engine, server, endpoint = served
    with AudioStream(endpoint, block_frames=BLOCK) as stream:
        for k in range(4):
            stream.process(noise(BLOCK), transport=DawTransport(120.0, 0, k * BLOCK * 2 / SR))
        stream.process(noise(BLOCK), sample_time=10 * SR, transport=DawTransport(90.0, 7, 1.0, 3.0))
    assert engine.transport.bpm == 90.0 and engine.transport.beats_per_bar == 3
    bar, beat = engine.transport.position(engine.core.now - BLOCK)
    assert (bar, beat) == (7, pytest.approx(1.0))


def raw_frame(stream: AudioStream, seq: int, x: np.ndarray, **fields) -> bytes:
    w = stream.welcome
    return wire.encode_frame(FrameHeader(w.stream_id, seq, seq * BLOCK, x.shape[0], 2, SR, **fields), x)


def replies(stream: AudioStream, count: int) -> dict[int, tuple[FrameHeader, np.ndarray]]:
    got = {}
    while len(got) < count:
        item = stream.receive(2.0)
        assert item is not None, f"only {len(got)} of {count} replies"
        got[item[0].sequence] = (item[0], item[1].copy())
    return got


def test_jitter_buffer_reorders_conceals_and_counts(served):
    engine, server, endpoint = served
    with ControlClient(endpoint) as ctl, AudioStream(endpoint, block_frames=BLOCK, jitter_blocks=2) as stream:
        ctl.set("dry", 1.0)
        x = noise(BLOCK * 12, seed=4)
        block = {k: x[k * BLOCK:(k + 1) * BLOCK] for k in range(12)}
        # 0 1 | 3 2 (swapped: reordered in time) | 5 6 (4 lost: concealed once 6 arrives) | 4 (late) | 7 7 (dup)
        order = [0, 1, 3, 2, 5, 6, 4, 7, 7, 8, 9, 10, 11]
        for seq in order:
            stream.socket.send(raw_frame(stream, seq, block[seq]))
        got = replies(stream, 12)
        stats = ctl.state().stats
    assert sorted(got) == list(range(12))
    assert got[4][0].has(Flag.CONCEALED) and not got[3][0].has(Flag.CONCEALED)
    for seq in (9, 10, 11):  # the glide from the fixture's dry 0 has ended: exactly the input
        np.testing.assert_array_equal(got[seq][1], block[seq])
    np.testing.assert_array_equal(got[4][1], np.zeros((BLOCK, 2), np.float32))  # silence processed
    assert (stats["reordered"], stats["concealed"], stats["late"], stats["duplicate"]) == (1, 1, 1, 1)
    assert engine.core.now == 12 * BLOCK  # the engine's clock stayed on the DAW's timeline


def test_refusals_are_counted_and_the_stream_survives(served):
    engine, server, endpoint = served
    with AudioStream(endpoint, block_frames=BLOCK) as stream:
        bad = AudioStream(endpoint, block_frames=BLOCK, context=stream.context)
        bad.hello = msgspec.structs.replace(bad.hello, versions=[2])
        with pytest.raises(BridgeRefused) as refused:
            bad.open()
        assert refused.value.code == "version"
        bad.close()
        bad = AudioStream(endpoint, sample_rate=48000, context=stream.context)
        with pytest.raises(BridgeRefused) as refused:
            bad.open()
        assert refused.value.code == "rate"
        bad.close()
        good = stream.process(noise(BLOCK))  # still the open stream (the refusals replaced nothing)
        frame = bytearray(raw_frame(stream, stream.sequence, noise(BLOCK)))
        frame[4] = 2
        stream.socket.send(bytes(frame))                                          # wrong version
        stream.socket.send(raw_frame(stream, stream.sequence, noise(2 * BLOCK)))  # over the session's block
        stream.socket.send(b"RTVB\x01" + bytes(99))                              # garbage after the magic
        stream.socket.send(b"\x81\xa4type\xa5hello")                             # a hello missing its fields
        stream.socket.send(bytes(2 << 20))                                        # over ZMQ_MAXMSGSIZE: cut
        time.sleep(0.3)
        stream.open()                                                             # ZeroMQ reconnects
        out = stream.process(noise(BLOCK, seed=9))
        assert out.shape == good.shape
        stats = server.stats
    assert stats["version"] >= 2 and stats["rejected"] >= 1 and stats["oversized"] == 1 and stats["malformed"] >= 2


def test_a_vanished_client_times_out_and_a_new_one_takes_over(served):
    engine, server, endpoint = served
    first = AudioStream(endpoint, block_frames=BLOCK)
    first.open()
    first.process(noise(BLOCK))
    first.socket.close(linger=0)  # vanish without Bye
    first.socket = None
    time.sleep(1.3)
    assert server.stats["sessions_timed_out"] == 1 and server.audio.session is None
    with AudioStream(endpoint, block_frames=BLOCK) as second:
        second.process(noise(BLOCK))
        third = AudioStream(endpoint, block_frames=BLOCK, context=second.context)
        with pytest.raises(BridgeRefused) as busy:  # second is streaming: no takeover
            third.open(timeout_s=0.05)
        assert busy.value.code == "busy"
        time.sleep(0.6)  # second pauses longer than takeover_s: a new client may take over
        third.open()
        with pytest.raises(BridgeRefused):  # replaced: the engine said Bye
            second.process(noise(BLOCK), timeout_s=0.5)
        third.process(noise(BLOCK))
        third_id = third.welcome.stream_id
        second.open()  # reconnect mid-stream: waits while third streams, then a new stream
        assert second.welcome.stream_id != third_id
        second.process(noise(BLOCK))
        third.close()
    first.close()
    assert server.stats["sessions_replaced"] == 2 and server.stats["rejected"] >= 1


def test_frames_for_an_unknown_stream_get_a_notice(served):
    engine, server, endpoint = served
    with AudioStream(endpoint, block_frames=BLOCK) as stream:
        stream.welcome = msgspec.structs.replace(stream.welcome, stream_id=stream.welcome.stream_id + 1)
        stream.send(noise(BLOCK))
        with pytest.raises(BridgeRefused) as exc:
            stream.receive(1.0)
        assert exc.value.code == "no_session"
    assert server.stats["unknown_stream"] == 1


def test_control_parameters_midi_learn_and_state_push(served):
    engine, server, endpoint = served
    with ControlClient(endpoint) as ctl:
        feed = ctl.subscribe()
        time.sleep(0.2)  # the SUB joins
        assert ctl.set("temperature", 0.8) == 0.8
        assert ctl.set("preset", "small-variation") == "small-variation"
        with pytest.raises(ControlError, match="temperature"):
            ctl.set("temperature", -1)
        with pytest.raises(ControlError, match="unknown parameter"):
            ctl.set("volume", 1)
        with pytest.raises(ControlError, match="nothing to vamp"):
            ctl.trigger(bars=2)
        assert ctl.learn("temperature", min=0.5, max=1.5) == "armed"
        assert ctl.midi(bytes([0xB3, 74, 0])) == ["learned temperature"]
        assert ctl.midi(bytes([0xB3, 74, 127])) == ["temperature"]
        assert ctl.learn("mute", kind="note", number=60, mode="toggle") == "bound"
        assert ctl.midi(bytes([0x90, 60, 100])) == ["mute"]
        state = ctl.state()
        assert state.params["temperature"] == pytest.approx(1.5) and state.params["preset"] == "small-variation"
        assert [(m.target, m.number, m.channel) for m in state.mappings] == [("temperature", 74, 3),
                                                                              ("mute", 60, None)]
        assert ctl.forget("*") == 2
        assert ctl.command("undo") is None
        bad = ctl.socket
        bad.send(wire.encode_message(wire.GetState(v=9)))
        assert isinstance(wire.decode_reply(bad.recv()), wire.Failed)
        latest = None
        while (pushed := feed.next(0.5)) is not None:  # pushed ~10 Hz while anything changes
            latest = pushed
        assert latest is not None and latest.params["temperature"] == pytest.approx(1.5)
        feed.close()
    assert not engine.core.muted  # DAW-clocked: the mute waits for the DAW's next block
    with AudioStream(endpoint, block_frames=BLOCK) as stream:
        stream.process(noise(BLOCK))
    assert engine.core.muted


def test_a_vamp_through_the_bridge_lands_on_the_daw_grid(served):
    """Four bars of groove from the 'DAW' at 120 BPM; a trigger vamps the last bar; the
    result swaps in on a bar line of the DAW's grid and comes back over the bridge."""
    from rtvamp.synth import groove

    engine, server, endpoint = served
    bar = 2 * SR
    x = np.repeat(groove(bars=12, bpm=120, seed=2)[:, None], 2, axis=1).astype(np.float32)
    with ControlClient(endpoint) as ctl, AudioStream(endpoint, block_frames=BLOCK) as stream:
        out = np.zeros_like(x)
        job_id = None
        for k in range(0, x.shape[0] - BLOCK, BLOCK):
            out[k:k + BLOCK] = stream.process(x[k:k + BLOCK], transport=DawTransport.at(k, SR, 120.0))
            if job_id is None and k >= 2 * bar:
                job_id = ctl.trigger(source="input", bars=1, steps="fast", variations=1)
            if job_id is not None and engine.scheduler.jobs[job_id].status == "running":
                time.sleep(0.01)  # a DAW plays in real time: give the worker some
        job = engine.scheduler.jobs[job_id]
    assert job.status == "ok" and job.swap_at % bar == 0
    take = engine.scheduler.history.current
    start = job.swap_at + FADE
    np.testing.assert_array_equal(out[start:start + BLOCK], take.audio[FADE:FADE + BLOCK])
    assert not out[:job.swap_at].any()  # dry 0: silence before the first loop


# -- CURVE ---------------------------------------------------------------------------------------

def test_a_non_loopback_bind_needs_keys():
    with pytest.raises(BridgeError, match="without CURVE keys"):
        BridgeServer.check(ServeOptions(bind="tcp://0.0.0.0:47800"))
    proc = subprocess.run([sys.executable, "-m", "rtvamp.bridge.cli", "serve", "--bind", "tcp://0.0.0.0:47800"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "without CURVE keys" in proc.stderr


def test_curve_admits_authorised_clients_only(worker, tmp_path):
    keys = generate_keys(tmp_path / "keys")
    other = generate_keys(tmp_path / "other")
    engine = make_engine(worker)
    endpoint = f"tcp://127.0.0.1:{free_base_port()}"
    try:
        with BridgeServer(engine, ServeOptions(bind=endpoint, keys=ServerKeys.load(keys))) as server:
            with AudioStream(endpoint, keys=ClientKeys.load(keys)) as stream:
                assert stream.process(noise(BLOCK)).shape == (BLOCK, 2)
            with ControlClient(endpoint, keys=ClientKeys.load(keys)) as ctl:
                assert ctl.state().stats["processed"] == 1
            for intruder in (None, ClientKeys.load(other)):
                stranger = AudioStream(endpoint, keys=intruder)
                with pytest.raises(TimeoutError):
                    stranger.open(timeout_s=0.5)
                stranger.close()
            deadline = time.monotonic() + 3
            while server.stats["unauthenticated"] < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert server.stats["unauthenticated"] >= 2
    finally:
        engine.close()


# -- a running `rtvamp serve` under fuzz ---------------------------------------------------------

@pytest.fixture(scope="module")
def serve_process(tmp_path_factory):
    """A real `rtvamp serve` (its own worker process); its log in serve.log."""
    endpoint = f"tcp://127.0.0.1:{free_base_port()}"
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "rtvamp.bridge.cli", "serve", "--bind", endpoint,
                                 "--session-timeout", "30"], stdout=subprocess.PIPE, stderr=err, text=True)
    line = proc.stdout.readline()
    assert line.startswith("serving"), log.read_text()
    yield proc, endpoint, log
    proc.terminate()
    assert proc.wait(timeout=30) == 0, log.read_text()


REJECTIONS = ("malformed", "oversized", "version", "rejected", "unknown_stream")


def fuzz_messages(n: int, good: bytes, hello: bytes, seed: int) -> list[bytes]:
    """n messages: random bytes, bit-flipped and field-mutated frames, truncated and extended
    frames, random and mutated msgpack maps."""
    rng = np.random.default_rng(seed)
    base = np.frombuffer(good, np.uint8)
    out: list[bytes] = []
    kinds = rng.choice(6, n, p=[0.2, 0.25, 0.25, 0.15, 0.1, 0.05])
    for kind in kinds:
        if kind == 0:
            out.append(rng.bytes(int(rng.integers(0, 700))))
        elif kind == 1:  # flip 1–8 bytes anywhere
            b = base.copy()
            idx = rng.integers(0, b.size, int(rng.integers(1, 9)))
            b[idx] ^= rng.integers(1, 256, idx.size).astype(np.uint8)
            out.append(b.tobytes())
        elif kind == 2:  # one header field set to a random value
            b = bytearray(good)
            offset, fmt = [(4, "B"), (5, "B"), (6, "B"), (7, "B"), (8, "I"), (12, "I"), (16, "Q"), (24, "Q"),
                           (40, "I"), (44, "i"), (48, "d"), (56, "d"), (64, "f")][int(rng.integers(0, 13))]
            raw = rng.bytes(struct.calcsize("<" + fmt))
            b[offset:offset + len(raw)] = raw
            out.append(bytes(b))
        elif kind == 3:  # truncated or extended
            cut = int(rng.integers(0, len(good) + 64))
            out.append(good[:cut] if cut < len(good) else good + rng.bytes(cut - len(good) + 1))
        elif kind == 4:  # msgpack maps with a real tag and junk fields
            tag = ["hello", "bye", "welcome", "reject", "notice", "getstate", "x"][int(rng.integers(0, 7))]
            junk = {f"f{int(rng.integers(0, 5))}": [int(rng.integers(-9, 9)), "s", 1.5, None][int(rng.integers(0, 4))]}
            out.append(msgspec.msgpack.encode({"type": tag, "versions": [int(rng.integers(0, 4))],
                                               "sample_rate": int(rng.integers(0, 100000)), **junk}))
        else:  # a valid hello with a few bytes flipped
            b = bytearray(hello)
            for i in rng.integers(0, len(b), int(rng.integers(1, 4))):
                b[i] ^= int(rng.integers(1, 256))
            out.append(bytes(b))
    return out


@pytest.mark.slow
def test_fuzz_100k_messages_and_the_engine_keeps_processing(serve_process):
    proc, endpoint, log = serve_process
    n_fuzz, chunk = 100_000, 2_000
    with ControlClient(endpoint) as ctl, AudioStream(endpoint, block_frames=64, jitter_blocks=2,
                                                     client="legit") as stream:
        ctl.set("dry", 1.0)
        good = raw_frame(stream, 5, noise(64))
        hello = wire.encode_message(msgspec.structs.replace(stream.hello, client="intruder"))
        fuzzer = stream.context.socket(zmq.DEALER)
        fuzzer.setsockopt(zmq.LINGER, 0)
        fuzzer.connect(stream.endpoints.audio)
        before = ctl.state().stats
        sent, replaced, processed = 0, 0, 0
        t0 = time.monotonic()
        for start in range(0, n_fuzz, chunk):
            for message in fuzz_messages(chunk, good, hello, seed=start):
                fuzzer.send(message)
            sent += chunk
            for _ in range(3):  # the legit stream keeps playing between the bursts
                try:
                    stream.process(noise(64, seed=start), timeout_s=10.0)
                    processed += 1
                    break
                except BridgeRefused:  # a mutated hello that stayed valid replaced it: say Hello again
                    replaced += 1
                    stream.open()
        # the legit peer itself sends junk in its own stream: NaN samples, transport junk, bad sizes
        w = stream.welcome
        for k in range(2000):
            x = noise(64, seed=k)
            x[k % 64, k % 2] = [np.nan, np.inf, -np.inf, 1e30][k % 4]
            h = FrameHeader(w.stream_id, stream.sequence, stream.sample_time, 64, 2, SR,
                            flags=int(Flag.TRANSPORT | Flag.PLAYING), tempo=[5.0, 120.0, 999.0][k % 3],
                            bar=k - 1000, beat=float(k % 8), beats_per_bar=[1.0, 4.0, 64.0][k % 3])
            stream.socket.send(wire.encode_frame(h, x))
            stream.sequence += 1
            stream.sample_time += 64
        elapsed = time.monotonic() - t0
        deadline = time.monotonic() + 60
        while True:  # every message is accounted for once the engine has drained its queue
            stats = ctl.state().stats
            handled = sum(stats[k] - before[k] for k in (*REJECTIONS, "sessions"))
            if handled >= sent or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert handled >= sent  # (plus the legit stream's frames to a replaced session)
        stream.open()
        x = noise(64 * 20, seed=99)
        out = np.concatenate([stream.process(x[k:k + 64]) for k in range(0, x.shape[0], 64)])
        np.testing.assert_array_equal(out, x)
        stats = ctl.state().stats
    assert proc.poll() is None and "Traceback" not in log.read_text()
    assert processed == n_fuzz // chunk
    assert stats["nonfinite"] == 1500 and stats["processed"] >= 2000 + processed
    assert elapsed < 90, f"the fuzz took {elapsed:.0f} s"


def test_ctl_from_a_shell(serve_process):
    proc, endpoint, log = serve_process

    def ctl(*args):
        return subprocess.run([sys.executable, "-m", "rtvamp.bridge.cli", "ctl", "--connect", endpoint, *args],
                              capture_output=True, text=True, timeout=60)
    assert json.loads(ctl("set", "temperature", "0.7").stdout) == 0.7
    assert json.loads(ctl("learn", "dry", "--cc", "7", "--max", "2").stdout) == "bound"
    assert json.loads(ctl("midi", "b0", "07", "7f").stdout) == ["dry"]
    state = json.loads(ctl("state").stdout)
    assert state["params"]["temperature"] == 0.7 and state["params"]["dry"] == 2.0
    bad = ctl("set", "preset", "nope")
    assert bad.returncode == 2 and "preset takes one of" in bad.stderr
