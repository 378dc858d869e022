"""The Python side of the bridge: an audio stream (what a DAW plugin does) and control.

    from rtvamp.bridge import AudioStream, ControlClient

    with AudioStream(block_frames=256) as stream:          # handshake on open
        out = stream.process(block)                         # send one block, wait for its reply
    with ControlClient() as ctl:
        ctl.set("temperature", 0.9)
        ctl.trigger(bars=2)
        print(ctl.state().bpm)

Both connect DEALER sockets to the engine (default tcp://127.0.0.1:47800); pass `keys` for an
engine that requires CURVE. Neither is thread-safe: one owner thread each.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np
import zmq

from . import wire
from .wire import (DEFAULT_ENDPOINT, Bye, Command, Endpoints, Failed, Flag, Forget, FrameHeader, GetState, Hello,
                   Learn, LoadBundle, Midi, Notice, Ok, Reject, Set, State, Subscribe, Subscribed, Trigger, Welcome)


BUSY_RETRY_S = 0.1
"""seconds between two Hellos while the engine serves another client"""


class BridgeRefused(ConnectionError):
    """The engine refused the stream (``reject`` says why) or ended it (``Bye``, ``Notice``)."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class ControlError(ValueError):
    """The engine refused a control request; ``code`` is the protocol's error code."""

    def __init__(self, failed: Failed) -> None:
        super().__init__(f"{failed.code}: {failed.message}")
        self.code = failed.code


@dataclass(frozen=True)
class ClientKeys:
    """CURVE material of a client: its keypair and the engine's public key."""

    public: bytes
    secret: bytes
    server_public: bytes

    @classmethod
    def load(cls, folder: Path) -> ClientKeys:
        """Keys written by `rtvamp keys` (client.key_secret, server.key)."""
        import zmq.auth

        try:
            public, secret = zmq.auth.load_certificate(Path(folder) / "client.key_secret")
            server_public, _ = zmq.auth.load_certificate(Path(folder) / "server.key")
        except (OSError, ValueError) as exc:
            raise ValueError(f"{folder}: no client keys ({exc}); run `rtvamp keys`") from None
        return cls(public, secret, server_public)

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.curve_serverkey = self.server_public


def _dealer(context: zmq.Context, endpoint: str, keys: ClientKeys | None) -> zmq.Socket:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        keys.apply(sock)
    sock.connect(endpoint)
    return sock


@dataclass(frozen=True)
class DawTransport:
    """The host's transport for one block: tempo (BPM), bar index, beat within the bar."""

    tempo: float
    bar: int
    beat: float
    beats_per_bar: float = 4.0
    playing: bool = True

    @classmethod
    def at(cls, sample_time: int, sample_rate: int, tempo: float, beats_per_bar: int = 4) -> DawTransport:
        """The position of `sample_time` on a constant-tempo timeline starting at bar 0."""
        beats = sample_time * tempo / (60.0 * sample_rate)
        bar = int(beats // beats_per_bar)
        return cls(tempo, bar, beats - bar * beats_per_bar, float(beats_per_bar))


class AudioStream:
    """One audio stream to the engine. `open()` handshakes; then `send` blocks and `receive`
    the engine's replies (or `process` for both). Sample times advance by the frames sent
    unless given; sequence numbers start at 0 per stream."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, sample_rate: int = 44100, channels: int = 2,
                 block_frames: int = 256, jitter_blocks: int = 1, client: str = "rtvamp.bridge",
                 keys: ClientKeys | None = None, context: zmq.Context | None = None) -> None:
        self.endpoints = Endpoints.parse(endpoint)
        self.hello = Hello(versions=list(wire.SUPPORTED_VERSIONS), sample_rate=sample_rate, channels=channels,
                           block_frames=block_frames, jitter_blocks=jitter_blocks, client=client)
        self.keys = keys
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.socket: zmq.Socket | None = None
        self.welcome: Welcome | None = None
        self.sequence = 0
        self.sample_time = 0

    @property
    def latency_samples(self) -> int:
        """frames between a block's sample time and where its reply plays (from the handshake)"""
        return self._welcome().latency_samples

    def _welcome(self) -> Welcome:
        if self.welcome is None:
            raise BridgeRefused("the stream is not open")
        return self.welcome

    def open(self, timeout_s: float = 5.0) -> Welcome:
        """Connect (a fresh socket) and handshake, retrying while the engine is busy with
        another client's stream. Raises BridgeRefused or TimeoutError."""
        if self.socket is not None:
            self.socket.close()
        self.socket = _dealer(self.context, self.endpoints.audio, self.keys)
        self.socket.send(wire.encode_message(self.hello))
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not self.socket.poll(left * 1000):
                break
            data = self.socket.recv()
            if wire.is_frame(data):
                continue
            message = wire.decode_session(data)
            if isinstance(message, Welcome):
                self.welcome, self.sequence, self.sample_time = message, 0, 0
                return message
            if isinstance(message, Reject) and message.code == "busy" and left > BUSY_RETRY_S:
                time.sleep(BUSY_RETRY_S)
                self.socket.send(wire.encode_message(self.hello))
            elif isinstance(message, Reject):
                raise BridgeRefused(f"the engine refused the stream: {message.message}", message.code)
        raise TimeoutError(f"no answer from {self.endpoints.audio} within {timeout_s:g} s")

    def send(self, block: np.ndarray, sample_time: int | None = None, transport: DawTransport | None = None,
             flags: int = 0) -> int:
        """Queue one block float32 [frames ≤ block_frames, channels] → its sequence number."""
        w = self._welcome()
        t = self.sample_time if sample_time is None else sample_time
        if transport is not None:
            flags |= Flag.TRANSPORT | (Flag.PLAYING if transport.playing else 0)
        header = FrameHeader(w.stream_id, self.sequence, t, block.shape[0], w.channels, w.sample_rate,
                             wall_ns=time.time_ns(), flags=int(flags),
                             tempo=transport.tempo if transport else 0.0, bar=transport.bar if transport else 0,
                             beat=transport.beat if transport else 0.0,
                             beats_per_bar=transport.beats_per_bar if transport else 0.0)
        self.socket.send(wire.encode_frame(header, np.asarray(block, dtype=np.float32)), copy=False)
        self.sequence += 1
        self.sample_time = t + block.shape[0]
        return header.sequence

    def receive(self, timeout_s: float = 1.0) -> tuple[FrameHeader, np.ndarray] | None:
        """The next reply (header, samples [frames, channels]) within `timeout_s` seconds, or None.
        Raises BridgeRefused when the engine ends the stream (say `open()` again)."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) >= 0:
            if not self.socket.poll(max(0.0, left) * 1000):
                return None
            data = self.socket.recv(copy=False).buffer
            if wire.is_frame(data):
                header, samples = wire.decode_frame(data)
                if header.stream_id == self._welcome().stream_id:
                    return header, samples
                continue
            message = wire.decode_session(data)
            if isinstance(message, (Bye, Notice)):
                self.welcome = None
                raise BridgeRefused(f"the engine ended the stream: {getattr(message, 'reason', '')}"
                                    f"{getattr(message, 'message', '')}", getattr(message, "code", "bye"))
        return None

    def process(self, block: np.ndarray, timeout_s: float = 1.0, **send_args) -> np.ndarray:
        """Send one block and wait for its reply → processed samples (a copy). Raises
        TimeoutError when it does not come back in time."""
        seq = self.send(block, **send_args)
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            got = self.receive(left)
            if got is not None and got[0].sequence == seq:
                return got[1].copy()
        raise TimeoutError(f"block {seq} did not come back within {timeout_s:g} s")

    def close(self) -> None:
        """Say Bye and close (the context and its sockets too, when this stream made it)."""
        if self.socket is not None:
            if self.welcome is not None:
                self.socket.send(wire.encode_message(Bye(stream_id=self.welcome.stream_id, reason="client")),
                                 zmq.NOBLOCK)
            self.socket.close()
            self.socket = None
        self.welcome = None
        if self._own_context:
            self.context.destroy(linger=0)

    def __enter__(self) -> AudioStream:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ControlClient:
    """Requests to the engine's control socket, one at a time, each waited for."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, keys: ClientKeys | None = None,
                 timeout_s: float = 5.0, context: zmq.Context | None = None) -> None:
        self.endpoints = Endpoints.parse(endpoint)
        self.keys = keys
        self.timeout_s = timeout_s
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.socket = _dealer(self.context, self.endpoints.control, keys)
        self._ids = itertools.count(1)

    def request(self, message: msgspec.Struct) -> msgspec.Struct:
        """Send a request (its id is set here) → the reply. Raises ControlError for a refusal,
        TimeoutError when the engine does not answer within `timeout_s`."""
        rid = next(self._ids)
        self.socket.send(wire.encode_message(msgspec.structs.replace(message, id=rid)))
        deadline = time.monotonic() + self.timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not self.socket.poll(left * 1000):
                break
            reply = wire.decode_reply(self.socket.recv())
            if reply.id not in (rid, 0):
                continue  # a late answer to an earlier request that timed out
            if isinstance(reply, Failed):
                raise ControlError(reply)
            return reply
        raise TimeoutError(f"no answer from {self.endpoints.control} within {self.timeout_s:g} s")

    def _result(self, message: msgspec.Struct):
        reply = self.request(message)
        return reply.result if isinstance(reply, Ok) else reply

    def trigger(self, **fields) -> int:
        """Vamp now (fields of wire.Trigger over the engine's defaults) → the job id."""
        return self._result(Trigger(**fields))

    def set(self, name: str, value: wire.Value) -> wire.Value:
        return self._result(Set(name=name, value=value))

    def command(self, name: str) -> wire.Value:
        return self._result(Command(name=name))

    def state(self) -> State:
        return self.request(GetState())

    def learn(self, target: str, **fields) -> str:
        """MIDI learn (fields of wire.Learn): "armed" without `number`, else "bound"."""
        return self._result(Learn(target=target, **fields))

    def forget(self, target: str) -> int:
        return self._result(Forget(target=target))

    def midi(self, data: bytes) -> list[str]:
        return self._result(Midi(data=bytes(data)))

    def load_bundle(self, bundle: str) -> str:
        return self._result(LoadBundle(bundle=bundle))

    def subscribe(self) -> StateFeed:
        """A SUB socket on the engine's state push."""
        reply: Subscribed = self.request(Subscribe())
        return StateFeed(self.context, Endpoints(self.endpoints.host, reply.state_port).audio, reply.topic,
                         self.keys)

    def close(self) -> None:
        self.socket.close()
        if self._own_context:
            self.context.destroy(linger=0)

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StateFeed:
    """States pushed by the engine (~10 Hz while anything changes)."""

    def __init__(self, context: zmq.Context, endpoint: str, topic: bytes, keys: ClientKeys | None) -> None:
        self.socket = context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            keys.apply(self.socket)
        self.socket.setsockopt(zmq.SUBSCRIBE, topic)
        self.socket.connect(endpoint)

    def next(self, timeout_s: float = 1.0) -> State | None:
        if not self.socket.poll(timeout_s * 1000):
            return None
        _, data = self.socket.recv_multipart()
        return wire.decode_reply(data)

    def __iter__(self) -> Iterator[State]:
        while True:
            state = self.next(timeout_s=3600.0)
            if state is not None:
                yield state

    def close(self) -> None:
        self.socket.close()
