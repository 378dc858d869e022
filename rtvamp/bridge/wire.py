"""The bridge wire format (normative text: bridge/PROTOCOL.md).

Two kinds of ZeroMQ message travel between a DAW (plugin, script) and the engine:

- **audio frames** — a fixed 68-byte little-endian header (magic ``RTVB``, version, stream id,
  sequence number, sample time, wall clock, sample rate, channels, frames, format, transport,
  flags) followed by float32 little-endian interleaved samples ``[frames, channels]``;
- **messages** — msgpack maps tagged by ``"type"``: the session handshake on the audio socket
  (:class:`Hello` → :class:`Welcome` / :class:`Reject`, :class:`Bye`) and control requests and
  replies on the control socket, validated by msgspec against the schema below.

A frame is told from a message by its first four bytes (a msgpack map never starts with
``R``). Decoding never raises anything but :class:`WireError` (a ProtocolError), whose
``reason`` names the counter a receiver increments.
"""

from __future__ import annotations

import enum
import ipaddress
import math
import struct
from dataclasses import dataclass
from typing import Annotated, Literal, Union
from urllib.parse import urlsplit

import msgspec
import numpy as np

from ..engine.protocol import ProtocolError

VERSION = 1
"""The version this implementation speaks (audio frames and messages); bumped on any
incompatible change."""

SUPPORTED_VERSIONS = (1,)

MAGIC = b"RTVB"

HEADER = struct.Struct("<4sBBBBIIQQQIiddf")
"""magic, version, format, channels, flags, stream_id, frames, sequence, sample_time, wall_ns,
sample_rate, bar, beat, tempo, beats_per_bar"""

HEADER_BYTES = HEADER.size
"""68 bytes; the samples follow at this offset (4-byte aligned)"""

FORMAT_F32 = 1
"""the one sample format of version 1: float32 little-endian, interleaved"""

MAX_CHANNELS = 8
MAX_FRAMES = 8192
"""largest frame count one audio frame may carry (samples per channel)"""

MAX_FRAME_BYTES = HEADER_BYTES + MAX_FRAMES * MAX_CHANNELS * 4
"""largest valid audio frame; anything longer is counted as oversized"""

MAX_MESSAGE_BYTES = 1 << 20
"""ZeroMQ's per-message limit on the engine's sockets (ZMQ_MAXMSGSIZE, bytes): a peer that
sends more is disconnected by ZeroMQ before the engine sees the message"""

DEFAULT_PORT = 47800
DEFAULT_ENDPOINT = f"tcp://127.0.0.1:{DEFAULT_PORT}"
"""the engine's audio socket; control at port + 1, state at port + 2"""

RATE_RANGE = (8000, 384000)
"""sample rates a frame may declare (Hz)"""


@dataclass(frozen=True)
class Endpoints:
    """The three endpoints derived from one ``tcp://HOST:PORT`` (audio at PORT)."""

    host: str
    port: int

    @classmethod
    def parse(cls, endpoint: str) -> Endpoints:
        parts = urlsplit(endpoint)
        if parts.scheme != "tcp" or not parts.hostname or parts.port is None:
            raise ValueError(f"{endpoint!r}: expected tcp://HOST:PORT")
        return cls(parts.hostname, parts.port)

    def _at(self, port: int) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{port}"

    @property
    def audio(self) -> str:
        return self._at(self.port)

    @property
    def control(self) -> str:
        return self._at(self.port + 1)

    @property
    def state(self) -> str:
        return self._at(self.port + 2)

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


class Flag(enum.IntFlag):
    """Bits of the header's ``flags`` byte. Receivers ignore bits they do not know."""

    PLAYING = 1
    """the DAW's transport is rolling"""
    TRANSPORT = 2
    """tempo, bar, beat and beats_per_bar are valid"""
    DISCONTINUITY = 4
    """the DAW's timeline jumped (locate, loop, tempo change) at this frame"""
    CONCEALED = 8
    """engine → client: this frame's input was missing; the engine processed silence"""


class WireError(ProtocolError):
    """A frame or message that does not follow the protocol; ``reason`` is one of
    "malformed", "oversized" or "version" (the counter it belongs to)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """An audio frame's header. Times: ``sample_time`` in frames of the sender's clock (the
    DAW's timeline position of the first frame), ``wall_ns`` in ns since the Unix epoch."""

    stream_id: int
    sequence: int
    sample_time: int
    frames: int
    channels: int
    sample_rate: int
    wall_ns: int = 0
    flags: int = 0
    tempo: float = 0.0
    """beats per minute (valid with Flag.TRANSPORT)"""
    bar: int = 0
    """bar index, 0 = the DAW's first bar"""
    beat: float = 0.0
    """beat within the bar, 0 ≤ beat < beats_per_bar"""
    beats_per_bar: float = 0.0
    version: int = VERSION
    format: int = FORMAT_F32

    @property
    def payload_bytes(self) -> int:
        return self.frames * self.channels * 4

    def has(self, flag: Flag) -> bool:
        return bool(self.flags & flag)


def encode_frame(header: FrameHeader, samples: np.ndarray) -> bytes:
    """Header + samples float32 [header.frames, header.channels] → one message's bytes."""
    if samples.shape != (header.frames, header.channels):
        raise WireError("malformed", f"samples {samples.shape} do not match the header "
                                     f"({header.frames}, {header.channels})")
    _check_header(header)
    out = bytearray(HEADER_BYTES + header.payload_bytes)
    HEADER.pack_into(out, 0, MAGIC, header.version, header.format, header.channels, header.flags,
                     header.stream_id, header.frames, header.sequence, header.sample_time, header.wall_ns,
                     header.sample_rate, header.bar, header.beat, header.tempo, header.beats_per_bar)
    np.frombuffer(out, dtype="<f4", offset=HEADER_BYTES).reshape(header.frames, header.channels)[...] = samples
    return bytes(out)


def decode_frame(buffer: bytes | bytearray | memoryview) -> tuple[FrameHeader, np.ndarray]:
    """One message's bytes → (header, samples): a read-only float32 view [frames, channels] of
    the buffer (copy it to keep it beyond the buffer's life). Samples may be non-finite: the
    receiver decides what to do with them."""
    view = memoryview(buffer)
    size = view.nbytes
    if size > MAX_FRAME_BYTES:
        raise WireError("oversized", f"frame of {size} bytes exceeds {MAX_FRAME_BYTES}")
    if size < HEADER_BYTES:
        raise WireError("malformed", f"frame of {size} bytes is shorter than the {HEADER_BYTES}-byte header")
    (magic, version, fmt, channels, flags, stream_id, frames, sequence, sample_time, wall_ns, rate, bar, beat,
     tempo, bpb) = HEADER.unpack_from(view)
    if magic != MAGIC:
        raise WireError("malformed", "bad magic")
    if version not in SUPPORTED_VERSIONS:
        raise WireError("version", f"frame version {version}; this end speaks {list(SUPPORTED_VERSIONS)}")
    header = FrameHeader(stream_id, sequence, sample_time, frames, channels, rate, wall_ns, flags, tempo, bar,
                         beat, bpb, version, fmt)
    _check_header(header)
    if size != HEADER_BYTES + header.payload_bytes:
        raise WireError("malformed", f"frame of {size} bytes; the header declares {header.payload_bytes} "
                                     "bytes of samples")
    samples = np.frombuffer(view, dtype="<f4", offset=HEADER_BYTES).reshape(frames, channels)
    return header, samples


def _check_header(h: FrameHeader) -> None:
    if h.format != FORMAT_F32:
        raise WireError("malformed", f"unknown sample format {h.format}")
    if not 1 <= h.channels <= MAX_CHANNELS:
        raise WireError("malformed", f"channels {h.channels} outside 1–{MAX_CHANNELS}")
    if not 1 <= h.frames <= MAX_FRAMES:
        raise WireError("oversized" if h.frames > MAX_FRAMES else "malformed",
                        f"frames {h.frames} outside 1–{MAX_FRAMES}")
    if not RATE_RANGE[0] <= h.sample_rate <= RATE_RANGE[1]:
        raise WireError("malformed", f"sample rate {h.sample_rate} outside {RATE_RANGE[0]}–{RATE_RANGE[1]}")
    if h.flags & Flag.TRANSPORT and not (math.isfinite(h.tempo) and 1.0 <= h.tempo <= 1000.0
                                          and math.isfinite(h.beat) and 0.0 <= h.beat <= 64.0
                                          and math.isfinite(h.beats_per_bar) and 1.0 <= h.beats_per_bar <= 64.0):
        raise WireError("malformed", f"transport out of range (tempo {h.tempo}, beat {h.beat}, "
                                     f"beats per bar {h.beats_per_bar})")


def is_frame(buffer: bytes | memoryview) -> bool:
    """True when a message is an audio frame (starts with the magic), False for msgpack."""
    return bytes(memoryview(buffer)[:4]) == MAGIC


# -- messages (msgpack) -------------------------------------------------------------------------

_U32 = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
_Id = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
_Rate = Annotated[int, msgspec.Meta(ge=RATE_RANGE[0], le=RATE_RANGE[1])]
_Channels = Annotated[int, msgspec.Meta(ge=1, le=MAX_CHANNELS)]
_Frames = Annotated[int, msgspec.Meta(ge=16, le=MAX_FRAMES)]
_Jitter = Annotated[int, msgspec.Meta(ge=1, le=2)]
_Name = Annotated[str, msgspec.Meta(max_length=200)]
_Text = Annotated[str, msgspec.Meta(max_length=2000)]
Value = Union[bool, int, float, str, None]
"""a parameter value (msgspec keeps bool and int apart)"""


class _Message(msgspec.Struct, tag_field="type", tag=str.lower, frozen=True, kw_only=True):
    """Base of every msgpack message: tagged by the lower-case class name."""


class Hello(_Message, kw_only=True):
    """Client → engine, audio socket: open an audio stream. The client will send frames of at
    most ``block_frames`` frames (exactly that many as a rule) at ``sample_rate``."""

    versions: Annotated[list[Annotated[int, msgspec.Meta(ge=0, le=255)]], msgspec.Meta(min_length=1, max_length=16)]
    sample_rate: _Rate
    channels: _Channels
    block_frames: _Frames
    jitter_blocks: _Jitter = 1
    """the jitter buffer the client asks for (blocks): its playout delay"""
    client: _Name = ""


class Welcome(_Message, kw_only=True):
    """Engine → client: the stream is open. ``latency_samples`` is exactly the delay, in
    frames, between a frame sent with sample time t and the processed samples the client
    must play at t + latency_samples (= jitter_blocks × block_frames); a DAW plugin reports
    it to its host."""

    version: int
    stream_id: _U32
    sample_rate: int
    channels: int
    block_frames: int
    jitter_blocks: int
    latency_samples: int
    control_port: int
    state_port: int
    engine: str = ""


class Reject(_Message, kw_only=True):
    """Engine → client: no stream. ``code``: "version", "rate", "channels", "block", "bad"."""

    code: str
    message: str
    versions: list[int] = []
    """the versions the engine speaks (for "version")"""


class Bye(_Message, kw_only=True):
    """Either way: the stream ends (client leaving, or engine: "replaced", "timeout", "shutdown")."""

    stream_id: _U32 = 0
    reason: _Name = ""


class Notice(_Message, kw_only=True):
    """Engine → client, audio socket: a frame was refused. ``code`` "no_session" means the
    stream is unknown (engine restarted, stream replaced or timed out): say Hello again."""

    code: str
    message: str = ""


SessionMessage = Union[Hello, Welcome, Reject, Bye, Notice]


# -- control (control socket) -------------------------------------------------------------------

class _Request(_Message, kw_only=True):
    """Base of control requests: ``id`` is echoed in the reply; ``v`` is the protocol version."""

    id: _Id = 0
    v: int = VERSION


class Trigger(_Request, kw_only=True):
    """Vamp now; unset fields take the engine's current defaults (see :class:`Set`)."""

    source: Literal["input", "loop", "output"] | None = None
    bars: Annotated[int, msgspec.Meta(ge=1, le=16)] | None = None
    quantize: Literal["off", "beat", "bar", "loop"] | None = None
    preset: _Name | None = None
    steps: _Name | Annotated[int, msgspec.Meta(ge=1, le=1000)] | None = None
    temperature: Annotated[float, msgspec.Meta(gt=0.0, le=100.0)] | None = None
    variations: Annotated[int, msgspec.Meta(ge=1, le=64)] | None = None
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**62)] | None = None


class Set(_Request, kw_only=True):
    """Set a parameter (names in bridge/PROTOCOL.md, e.g. temperature, preset, dry, wet)."""

    name: _Name
    value: Value


class Command(_Request, kw_only=True):
    """A looper action."""

    name: Literal["record", "stop_record", "undo", "redo", "next", "previous", "clear", "tap", "cancel"]


class GetState(_Request, kw_only=True):
    """Ask for a :class:`State`."""


class Learn(_Request, kw_only=True):
    """Map a MIDI control to a parameter or command. Without ``number`` the engine arms MIDI
    learn: the next CC or note it receives (:class:`Midi`) is bound."""

    target: _Name
    kind: Literal["cc", "note"] = "cc"
    number: Annotated[int, msgspec.Meta(ge=0, le=127)] | None = None
    channel: Annotated[int, msgspec.Meta(ge=0, le=15)] | None = None
    """None = any channel"""
    mode: Literal["absolute", "toggle", "momentary"] = "absolute"
    min: float = 0.0
    max: float = 1.0
    scale: Literal["linear", "log"] = "linear"


class Forget(_Request, kw_only=True):
    """Remove every MIDI mapping of a target ("*" = all)."""

    target: _Name


class Midi(_Request, kw_only=True):
    """A raw MIDI message (status byte first) for the MIDI-learn mappings."""

    data: Annotated[bytes, msgspec.Meta(min_length=1, max_length=3)]


class LoadBundle(_Request, kw_only=True):
    """Restart generation with another model bundle (folder or installed name)."""

    bundle: _Text


class Subscribe(_Request, kw_only=True):
    """Ask where state is pushed: the reply's ``state_port`` is a PUB socket sending
    [b"state", State] at most ``state_hz`` times per second, whenever it changed."""


ControlRequest = Union[Trigger, Set, Command, GetState, Learn, Forget, Midi, LoadBundle, Subscribe]


class Mapping(msgspec.Struct, frozen=True, kw_only=True):
    """A MIDI-learn binding (see :class:`Learn`)."""

    target: str
    kind: str
    number: int
    channel: int | None
    mode: str
    min: float
    max: float
    scale: str


class JobInfo(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    source: str
    status: str
    stage: str
    fraction: float
    target: int
    """engine sample of the boundary the result should land on"""
    swap_at: int | None


class StreamInfo(msgspec.Struct, frozen=True, kw_only=True):
    stream_id: int
    client: str
    sample_rate: int
    block_frames: int
    jitter_blocks: int
    latency_samples: int


class Ok(_Message, kw_only=True):
    id: int = 0
    result: Value | list[Value] | dict[str, Value] = None


class Failed(_Message, kw_only=True):
    """A refused request; ``code``: "bad", "version", "value", "busy", "internal"."""

    id: int = 0
    code: str
    message: str


class Subscribed(_Message, kw_only=True):
    id: int = 0
    state_port: int
    topic: bytes
    state_hz: float


class State(_Message, kw_only=True):
    """The engine as a performer sees it. Times in engine samples."""

    id: int = 0
    version: int = VERSION
    now: int
    sample_rate: int
    channels: int
    bpm: float
    beats_per_bar: int
    bar: int
    beat: float
    synced: bool
    """the DAW's transport drives the grid"""
    playing: bool
    recording: bool
    overdubbing: bool
    muted: bool
    loop_samples: int
    take: int | None
    takes: int
    job: JobInfo | None
    params: dict[str, Value]
    mappings: list[Mapping]
    learning: str | None
    stream: StreamInfo | None
    stats: dict[str, int]
    messages: list[str]


ControlReply = Union[Ok, Failed, Subscribed, State]

STATE_TOPIC = b"state"

_encoder = msgspec.msgpack.Encoder()
_session_decoder = msgspec.msgpack.Decoder(SessionMessage)
_request_decoder = msgspec.msgpack.Decoder(ControlRequest)
_reply_decoder = msgspec.msgpack.Decoder(ControlReply)


def encode_message(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def _decode(decoder: msgspec.msgpack.Decoder, buffer) -> msgspec.Struct:
    if memoryview(buffer).nbytes > MAX_MESSAGE_BYTES:
        raise WireError("oversized", "message too large")
    try:
        return decoder.decode(buffer)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # msgspec lets invalid UTF-8 in keys through
        raise WireError("malformed", f"bad message: {exc}") from None


def decode_session(buffer) -> SessionMessage:
    return _decode(_session_decoder, buffer)


def decode_request(buffer) -> ControlRequest:
    """A control request; one with another version ``v`` raises WireError("version")."""
    message = _decode(_request_decoder, buffer)
    if message.v not in SUPPORTED_VERSIONS:
        raise WireError("version", f"control version {message.v}; this engine speaks {list(SUPPORTED_VERSIONS)}")
    return message


def decode_reply(buffer) -> ControlReply:
    return _decode(_reply_decoder, buffer)
