"""Write the protocol's test vectors: NAME.bin (the bytes on the wire) + NAME.json (their meaning).

    python bridge/vectors/make_vectors.py      # rewrites the files beside this script

Each .json holds {"kind": "frame" | "session" | "control", "bytes": size, and either "header"
+ "samples" (a valid frame), "message" (a valid msgpack message, as JSON) or "error" (the
counter a receiver increments: malformed, oversized, version)}. tests/test_bridge.py checks
that the Python implementation reproduces and decodes every vector; tests/test_lv2.py checks
the C implementation (bridge/lv2/wire_test) against the same files.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict
from pathlib import Path

import msgspec
import numpy as np

from rtvamp.bridge import wire
from rtvamp.bridge.wire import Flag, FrameHeader

HERE = Path(__file__).parent

WALL_NS = 1_700_000_000_123_456_789


def frame_vectors() -> dict[str, tuple[FrameHeader, np.ndarray]]:
    ramp = (np.arange(8, dtype=np.float32).reshape(4, 2) - 3.5) / 4
    return {
        "frame_stereo_playing": (FrameHeader(
            stream_id=7, sequence=41, sample_time=1_234_567, frames=4, channels=2, sample_rate=44100, wall_ns=WALL_NS,
            flags=Flag.PLAYING | Flag.TRANSPORT, tempo=123.5, bar=12, beat=2.75, beats_per_bar=4.0), ramp),
        "frame_reply_concealed": (FrameHeader(
            stream_id=7, sequence=42, sample_time=1_234_571, frames=4, channels=2, sample_rate=44100,
            wall_ns=WALL_NS + 5_000, flags=Flag.CONCEALED | Flag.TRANSPORT, tempo=120.0, bar=-1, beat=0.5,
            beats_per_bar=3.0), np.zeros((4, 2), np.float32)),
        "frame_mono_discontinuity": (FrameHeader(
            stream_id=0xFFFFFFFF, sequence=2**40 + 3, sample_time=0, frames=3, channels=1, sample_rate=48000,
            wall_ns=0, flags=Flag.DISCONTINUITY), np.array([[1.0], [-1.0], [0.25]], np.float32)),
    }


def bad_frames(good: bytes) -> dict[str, tuple[bytes, str]]:
    """Invalid variants of a valid stereo frame → (bytes, counter)."""
    def patch(offset: int, fmt: str, value) -> bytes:
        b = bytearray(good)
        struct.pack_into(fmt, b, offset, value)
        return bytes(b)
    return {
        "bad_magic": (b"RTVX" + good[4:], "malformed"),
        "bad_version": (patch(4, "<B", 2), "version"),
        "bad_format": (patch(5, "<B", 2), "malformed"),
        "bad_channels": (patch(6, "<B", 0), "malformed"),
        "bad_truncated": (good[:-1], "malformed"),
        "bad_short_header": (good[:40], "malformed"),
        "bad_frames_too_many": (patch(12, "<I", wire.MAX_FRAMES + 1), "oversized"),
        "bad_rate": (patch(40, "<I", 1000), "malformed"),
        "bad_tempo_nan": (patch(56, "<d", float("nan")), "malformed"),
    }


def messages() -> dict[str, tuple[str, msgspec.Struct]]:
    return {
        "session_hello": ("session", wire.Hello(versions=[1], sample_rate=44100, channels=2, block_frames=256,
                                                jitter_blocks=2, client="rtvamp-lv2")),
        "session_welcome": ("session", wire.Welcome(version=1, stream_id=9, sample_rate=44100, channels=2,
                                                    block_frames=256, jitter_blocks=2, latency_samples=512,
                                                    control_port=47801, state_port=47802, engine="rtvamp 0.1.0")),
        "session_reject_version": ("session", wire.Reject(code="version", message="the engine speaks version 1",
                                                          versions=[1])),
        "session_notice": ("session", wire.Notice(code="no_session", message="unknown stream: say Hello")),
        "session_bye": ("session", wire.Bye(stream_id=9, reason="client")),
        "control_trigger": ("control", wire.Trigger(id=3, source="input", bars=2, preset="medium-variation",
                                                    temperature=0.9)),
        "control_set": ("control", wire.Set(id=4, name="dry", value=0.5)),
        "control_learn": ("control", wire.Learn(id=5, target="temperature", number=74, mode="absolute", min=0.5,
                                                max=1.5)),
        "control_midi": ("control", wire.Midi(id=6, data=bytes([0xB0, 74, 64]))),
        "control_get_state": ("control", wire.GetState(id=7)),
    }


def _json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def main() -> None:
    for old in HERE.glob("*.bin"):
        old.unlink()
    for old in HERE.glob("*.json"):
        old.unlink()
    for name, (header, samples) in frame_vectors().items():
        data = wire.encode_frame(header, samples)
        (HERE / f"{name}.bin").write_bytes(data)
        meaning = {k: int(v) if isinstance(v, Flag) else v for k, v in asdict(header).items()}
        (HERE / f"{name}.json").write_text(_json({"kind": "frame", "bytes": len(data), "header": meaning,
                                                   "samples": samples.tolist()}))
    good = (HERE / "frame_stereo_playing.bin").read_bytes()
    for name, (data, counter) in bad_frames(good).items():
        (HERE / f"{name}.bin").write_bytes(data)
        (HERE / f"{name}.json").write_text(_json({"kind": "frame", "bytes": len(data), "error": counter}))
    for name, (kind, message) in messages().items():
        data = wire.encode_message(message)
        (HERE / f"{name}.bin").write_bytes(data)
        (HERE / f"{name}.json").write_text(_json({"kind": kind, "bytes": len(data),
                                                   "message": json.loads(msgspec.json.encode(message))}))


if __name__ == "__main__":
    main()
