"""The job protocol between an engine and a generation worker (ZeroMQ multipart, msgpack headers).

Topology: the worker binds a ROUTER; each engine connects a DEALER. Every message is one
msgpack-encoded header frame (a tagged :class:`msgspec.Struct`, tag field ``"type"``), followed
by one raw audio frame for the two messages that carry audio:

=============  =========  ================================================================
message        frames     audio frame
=============  =========  ================================================================
Connect        1          —                                  (engine → worker)
Feed           2          float32 little-endian [n_samples, 1]: the engine's input, mono
Job            2          float32 little-endian [n_samples, n_channels], C order
Cancel         1          —
Shutdown       1          —
Hello          1          —                                  (worker → engine)
Heartbeat      1          —
Progress       1          —
Chunk          2          float32 little-endian [n_candidates, n_samples, n_channels]: a
                          streamed piece of a job's result, in order
Result         2          float32 little-endian [n_candidates, n_samples, n_channels], C
                          order; empty (0 bytes, n_candidates = 0) unless status is "ok"
                          and the result was not streamed in Chunks
=============  =========  ================================================================

Continuous encoding: an engine that sends :class:`Feed` messages (its input, in order, each
stamped with the engine sample of its first sample) lets the worker keep that stream's codes
(rtvamp.code_stream); a Job with ``window_start`` set is then vamped from those codes when the
stream holds them, and from its own audio otherwise. Streaming: a Job with ``stream`` set is
answered with Chunks (each with the worker's estimate of when the last one will be ready) and
then a Result that carries no audio.

(The ROUTER side sees one more frame first: the peer's routing identity.)

Times on the wire are durations in seconds, never clock readings: the two ends may be on
different machines. Handshake: the engine sends :class:`Connect`; the worker answers
:class:`Hello` with its :data:`PROTOCOL_VERSION`; the engine refuses a worker whose version
differs. Decoding never raises anything but :class:`ProtocolError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal, Union

import msgspec
import numpy as np

PROTOCOL_VERSION = 2
"""Bumped on any incompatible change to the messages below."""

MAX_AUDIO_BYTES = 256 * 1024 * 1024
"""Largest audio frame either side accepts (bytes); also the worker socket's MAXMSGSIZE."""

WIRE_DTYPE = np.dtype("<f4")
"""Sample format of every audio frame: little-endian float32."""

Buffer = Union[bytes, bytearray, memoryview]

_Id = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
_Count = Annotated[int, msgspec.Meta(ge=1, lt=2**40)]
_Channels = Annotated[int, msgspec.Meta(ge=1, le=8)]
_Rate = Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]
_Fraction = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
_Seconds = Annotated[float, msgspec.Meta(ge=0.0)]
_Steps = Annotated[int, msgspec.Meta(ge=1, le=1000)]


class ProtocolError(ValueError):
    """A message that does not follow this protocol (garbage, wrong types, frames or sizes)."""


class _Message(msgspec.Struct, tag_field="type", tag=str.lower, frozen=True):
    """Base of every header: tagged by the lower-case class name. Unknown fields are ignored,
    so that a Hello from another protocol version still decodes and can be refused by version."""


class WorkerInfo(msgspec.Struct, frozen=True):
    """Who is generating, and how fast it has been."""

    host: str
    pid: int
    bundle: str
    """the bundle's manifest name (or folder when unnamed)"""
    providers: list[str]
    """onnxruntime execution providers the worker's sessions use, preferred first"""
    max_batch: int
    """most candidates (seeds) per job"""
    step_seconds: dict[str, float] = {}
    """measured seconds per step, keyed like ``coarse/575``, ``c2f/173``, ``decode/frame``"""
    encode_seconds_per_second: float = 0.0
    """continuous encoding's cost: wall seconds per second of fed audio (0 until fed)"""
    precision: str = ""
    """the transformers' precision the worker runs (``fp32``, ``int8``; "" from older workers)"""


# -- engine → worker ---------------------------------------------------------------------------

class Connect(_Message):
    """First message of an engine: asks for a :class:`Hello`."""

    protocol: int
    client: str = ""


class Feed(_Message):
    """The engine's input continues: mono audio (the frame that follows) at `sample_rate`,
    starting at engine sample `start_sample`. A start that does not continue the previous
    Feed starts the stream anew."""

    start_sample: Annotated[int, msgspec.Meta(ge=0, lt=2**62)]
    n_samples: _Count
    sample_rate: _Rate


class Job(_Message):
    """Vamp the audio frame that follows: one candidate per seed."""

    job_id: _Id
    n_samples: _Count
    n_channels: _Channels
    sample_rate: _Rate
    preset: str
    coarse_steps: _Steps
    c2f_steps: _Steps
    temperature: Annotated[float, msgspec.Meta(gt=0.0, le=100.0)]
    seeds: Annotated[list[Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]], msgspec.Meta(min_length=1, max_length=64)]
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] | None = None
    beat_times_s: list[_Seconds] | None = None
    deadline_s: _Seconds | None = None
    """seconds from the worker's receipt of the job by which the result should be ready"""
    bundle: str | None = None
    """bundle the engine expects (manifest name); None = whatever the worker serves"""
    periodic_prompt: Annotated[int, msgspec.Meta(ge=0, le=128)] | None = None
    upper_codebook_mask: Annotated[int, msgspec.Meta(ge=1, le=14)] | None = None
    mask_density: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    """overrides of the mask preset (None = the preset's value)"""
    window_start: Annotated[int, msgspec.Meta(ge=0, lt=2**62)] | None = None
    """engine sample of the audio's first sample in the fed stream (None: not from the stream)"""
    stream: bool = False
    """answer with Chunks as the decoder goes, then a Result without audio"""


class Cancel(_Message):
    """Drop a queued job or stop a running one (it ends with a "cancelled" Result)."""

    job_id: _Id


class Shutdown(_Message):
    """Ask the worker process to exit."""


# -- worker → engine ---------------------------------------------------------------------------

class Hello(_Message):
    """The worker's answer to :class:`Connect`."""

    protocol: int
    worker: WorkerInfo


class Heartbeat(_Message):
    """Sent every 0.5 s to every connected engine."""

    worker: WorkerInfo
    queued: Annotated[int, msgspec.Meta(ge=0)]
    """jobs waiting (all engines), not counting the running one"""
    busy: bool
    malformed: Annotated[int, msgspec.Meta(ge=0)] = 0
    """messages the worker has dropped because they did not follow this protocol"""
    refused: Annotated[int, msgspec.Meta(ge=0)] = 0
    """connections the worker has refused in the CURVE handshake (unknown or wrong keys)"""


class Progress(_Message):
    """How far a job's stage is (at most 20 per second per job)."""

    job_id: _Id
    stage: str
    fraction: _Fraction


class Chunk(_Message):
    """A piece of a streamed job's result: samples [offset, offset + n_samples) of every
    candidate (the frame that follows), `total_samples` long in all."""

    job_id: _Id
    offset: Annotated[int, msgspec.Meta(ge=0, lt=2**40)]
    n_candidates: Annotated[int, msgspec.Meta(ge=1, le=64)]
    n_samples: _Count
    n_channels: _Channels
    total_samples: _Count
    eta_s: _Seconds
    """the worker's estimate: seconds from now until the last Chunk is sent"""


class Result(_Message):
    """The end of a job; the audio frame that follows holds the candidates when status is ok."""

    job_id: _Id
    status: Literal["ok", "cancelled", "failed"]
    worker: WorkerInfo
    error: str = ""
    n_candidates: Annotated[int, msgspec.Meta(ge=0, le=64)] = 0
    n_samples: Annotated[int, msgspec.Meta(ge=0, lt=2**40)] = 0
    n_channels: Annotated[int, msgspec.Meta(ge=0, le=8)] = 0
    sample_rate: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 0
    seconds: dict[str, float] = {}
    """wall seconds per stage (preprocess, encode, coarse, c2f, decode, postprocess) and
    ``queued`` (receipt → start)"""


Request = Union[Connect, Feed, Job, Cancel, Shutdown]
Reply = Union[Hello, Heartbeat, Progress, Chunk, Result]

_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(Request)
_reply_decoder = msgspec.msgpack.Decoder(Reply)
_checkers = {kind: msgspec.msgpack.Decoder(kind) for kind in (*Request.__args__, *Reply.__args__)}
"""one decoder per message type: `encode` checks its own header with the receiver's constraints"""


# -- encoding ----------------------------------------------------------------------------------

def encode(message: Request | Reply, audio: np.ndarray | None = None) -> list[Buffer]:
    """The frames of a message: [header] or [header, audio bytes] for Feed, Job, Chunk and Result.

    `audio` must match the shape the header declares (Job: [n_samples, n_channels]; Result:
    [n_candidates, n_samples, n_channels]); it is sent as little-endian float32. Raises
    ProtocolError for a message the receiver would refuse (a value out of range, a wrong type).
    """
    header = _encoder.encode(message)
    try:
        _checkers[type(message)].decode(header)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"{type(message).__name__}: {exc}") from None
    shape = _audio_shape(message)
    if shape is None:
        if audio is not None:
            raise ProtocolError(f"{type(message).__name__} carries no audio")
        return [header]
    if audio is None:
        if np.prod(shape) != 0:
            raise ProtocolError(f"{type(message).__name__} needs its audio {shape}")
        audio = np.zeros(shape, WIRE_DTYPE)
    if tuple(audio.shape) != shape:
        raise ProtocolError(f"{type(message).__name__} declares audio {shape}, got {tuple(audio.shape)}")
    return [header, memoryview(np.ascontiguousarray(audio, dtype=WIRE_DTYPE).reshape(-1).view(np.uint8))]


def decode_request(frames: Sequence[Buffer]) -> tuple[Request, np.ndarray | None]:
    """Frames from an engine (routing identity removed) → (message, Job audio [n, ch] or None)."""
    return _decode(frames, _request_decoder)


def decode_reply(frames: Sequence[Buffer]) -> tuple[Reply, np.ndarray | None]:
    """Frames from a worker → (message, Result audio [K, n, ch] or None). The audio is a
    read-only view of the last frame: copy it to keep it beyond the frame's life."""
    return _decode(frames, _reply_decoder)


def _decode(frames: Sequence[Buffer], decoder: msgspec.msgpack.Decoder) -> tuple[Request | Reply, np.ndarray | None]:
    if not frames:
        raise ProtocolError("empty message")
    try:
        message = decoder.decode(frames[0])
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # ValidationError is a DecodeError;
        # invalid UTF-8 in a map key raises UnicodeDecodeError
        raise ProtocolError(f"bad header: {exc}") from None
    shape = _audio_shape(message)
    expected = 1 if shape is None else 2
    if len(frames) != expected:
        raise ProtocolError(f"{type(message).__name__} takes {expected} frame(s), got {len(frames)}")
    if shape is None:
        return message, None
    return message, _audio_from(frames[1], shape)


def _audio_shape(message: Request | Reply) -> tuple[int, ...] | None:
    """The audio shape a header declares, or None for messages without audio."""
    if isinstance(message, Job):
        return (message.n_samples, message.n_channels)
    if isinstance(message, Feed):
        return (message.n_samples, 1)
    if isinstance(message, Chunk):
        if message.offset + message.n_samples > message.total_samples:
            raise ProtocolError("a Chunk beyond its result's length")
        return (message.n_candidates, message.n_samples, message.n_channels)
    if isinstance(message, Result):
        if message.status != "ok" and message.n_candidates:
            raise ProtocolError(f"a {message.status!r} Result carries no candidates")
        return (message.n_candidates, message.n_samples, message.n_channels)
    return None


def _audio_from(frame: Buffer, shape: tuple[int, ...]) -> np.ndarray:
    """A read-only float32 view of an audio frame, checked against the declared shape."""
    expected = int(np.prod(shape)) * WIRE_DTYPE.itemsize
    if expected > MAX_AUDIO_BYTES:
        raise ProtocolError(f"audio of {expected} bytes exceeds the limit of {MAX_AUDIO_BYTES}")
    size = memoryview(frame).nbytes
    if size != expected:
        raise ProtocolError(f"audio frame is {size} bytes; {shape} float32 needs {expected}")
    return np.frombuffer(frame, dtype=WIRE_DTYPE).reshape(shape)
