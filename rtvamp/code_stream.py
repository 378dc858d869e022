"""Continuous encoding: a rolling buffer of codes for a live audio stream, so that a trigger
reads its window's codes instead of encoding them.

The engine feeds the worker its input as it arrives (mono, at the bundle's rate, stamped with
the engine sample of its first sample). `CodeStream` keeps the last `capacity_s` seconds of
that audio and of its codes, frame t covering stream samples [t·hop, (t+1)·hop). A frame is
encoded once (final) when the encoder's whole reach around it has arrived (CodecReach: the
reach is derived from the bundle's architecture); frames nearer the live edge are encoded on
demand with the audio there is, zero-padded after the live edge as a one-shot encode pads a
window's end, and encoded again, for good, when their right context arrives. So a window's
codes equal a one-shot encode of the same gained stream over any stretch that holds the
window plus the encoder's reach on both sides (or up to the live edge / stream start).

Loudness. Upstream normalises each window to −24 LUFS before encoding it. A stream encoded
ahead of the trigger cannot know the window, so every frame gets a gain when its first sample
arrives: the gain that brings the last `LOUDNESS_WINDOW_S` seconds to −24 LUFS, changed only
when it moves by more than `GAIN_HYSTERESIS_DB` (steady music keeps one gain, so codes do not
flicker). At a trigger, `window` compares the stream's gain over the window with the gain
upstream would give the window itself; beyond `GAIN_TOLERANCE_DB` it answers None and the
window is encoded on the trigger path exactly as upstream does.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from . import audio as audio_ops
from .codec import Codec, CodecReach

LOUDNESS_WINDOW_S = 3.0
"""seconds of the latest audio whose loudness sets the gain of new frames"""
GAIN_HYSTERESIS_DB = 1.0
"""the gain of new frames changes only when the target moves by more than this"""
GAIN_TOLERANCE_DB = 1.5
"""a window whose own −24 LUFS gain differs from the stream's by more is encoded on its own"""


@dataclass(frozen=True)
class WindowCodes:
    """A window's codes from the stream."""

    codes: np.ndarray
    """int64 [1, n_codebooks, n_frames]: the frames that cover the window"""
    audio: np.ndarray
    """float32 [n_frames·hop]: the gained audio of those frames (for audio-dependent masks)"""
    offset: int
    """samples from the first frame's start to the window's first sample"""
    level: float
    """the window's own loudness before any gain, LUFS (the output is brought back to it)"""


class CodeStream:
    """Rolling audio and codes of one engine's input (see the module docstring). Not
    thread-safe: one thread feeds and reads."""

    def __init__(self, codec: Codec, reach: CodecReach, n_codebooks: int, capacity_s: float = 60.0) -> None:
        self.codec = codec
        self.reach = reach
        self.hop = codec.hop_length
        self.rate = codec.manifest.sample_rate
        self.n_codebooks = n_codebooks
        self.left_frames, self.right_frames = reach.encoder_context_frames
        self.capacity_frames = math.ceil(capacity_s * self.rate / self.hop)
        self._raw = np.zeros(self.capacity_frames * self.hop, np.float32)
        self._gain = np.ones(self.capacity_frames, np.float32)
        self._codes = np.zeros((n_codebooks, self.capacity_frames), np.int64)
        self.encode_seconds = 0.0
        """wall seconds spent encoding so far"""
        self.fed_seconds = 0.0
        """seconds of audio fed so far"""
        self.reset(0)

    def reset(self, origin: int) -> None:
        """Forget everything; the next fed sample is engine sample `origin`."""
        self.origin = origin
        self.end = 0
        """stream samples received (stream sample 0 = engine sample `origin`)"""
        self.final = 0
        """frames [.., final) are encoded for good"""
        self._current_gain_db: float | None = None

    # -- feeding --------------------------------------------------------------------------------

    @property
    def engine_end(self) -> int:
        """The engine sample after the last one fed."""
        return self.origin + self.end

    @property
    def oldest(self) -> int:
        """The first stream sample still held."""
        return max(0, self.end - (self.capacity_frames - self.left_frames - self.right_frames - 1) * self.hop)

    def feed(self, engine_start: int, mono: np.ndarray) -> None:
        """Append mono float32 audio at the bundle rate that starts at engine sample
        `engine_start`; a jump (a stalled engine, a restarted stream) starts the stream anew
        there. Encodes every frame whose reach has now arrived."""
        if engine_start != self.engine_end or self.end == 0:
            self.reset(engine_start)
        mono = np.asarray(mono, np.float32)
        if not np.isfinite(mono).all():
            mono = np.nan_to_num(mono, nan=0.0, posinf=0.0, neginf=0.0)
        n = mono.shape[0]
        first_new_frame = -(-self.end // self.hop)  # frames whose first sample is in this block
        self._write_raw(self.end, mono)
        self.end += n
        last_frame = -(-self.end // self.hop)
        if last_frame > first_new_frame:
            gain_db = self._gain_db_for_new_frames()
            idx = np.arange(first_new_frame, last_frame) % self.capacity_frames
            self._gain[idx] = np.float32(10 ** (gain_db / 20))
        self.fed_seconds += n / self.rate
        stable = self.end // self.hop - self.right_frames
        if stable > self.final:
            start = max(self.final, self.end // self.hop - self.capacity_frames + self.left_frames + self.right_frames + 1)
            self._store(start, self._encode(start, stable, (stable + self.right_frames) * self.hop))
            self.final = stable

    def _gain_db_for_new_frames(self) -> float:
        n = min(self.end, int(LOUDNESS_WINDOW_S * self.rate))
        level = audio_ops.loudness_lufs(self._read_raw(self.end - n, self.end), self.rate)
        if math.isfinite(level):
            target = audio_ops.TARGET_LUFS - level
            if self._current_gain_db is None or abs(target - self._current_gain_db) > GAIN_HYSTERESIS_DB:
                self._current_gain_db = target
        return 0.0 if self._current_gain_db is None else self._current_gain_db

    # -- reading --------------------------------------------------------------------------------

    def window(self, engine_start: int, engine_stop: int) -> WindowCodes | None:
        """The codes of engine samples [engine_start, engine_stop), or None when the stream
        does not hold them all or their gain is too far from upstream's for this window."""
        start, stop = engine_start - self.origin, engine_stop - self.origin
        if start < self.oldest or stop > self.end or stop <= start:
            return None
        f0, f1 = start // self.hop, -(-stop // self.hop)
        gains_db = 20 * np.log10(self._gain[np.arange(f0, f1) % self.capacity_frames])
        raw = self._read_raw(start, stop)
        own_db = self._upstream_gain_db(raw * self._gains_per_sample(start, stop))
        if own_db is None or np.abs(gains_db + own_db - gains_db.mean()).max() > GAIN_TOLERANCE_DB:
            return None  # (own_db: the further gain upstream would apply to the gained window)
        codes = np.empty((1, self.n_codebooks, f1 - f0), np.int64)
        held = min(f1, self.final)
        if held > f0:
            codes[0, :, :held - f0] = self._codes[:, np.arange(f0, held) % self.capacity_frames]
        if f1 > held:  # near the live edge: encoded now with the context there is
            codes[0, :, held - f0:] = self._encode(max(held, f0), f1, self.end)
        audio = self.gained(f0 * self.hop, min(f1 * self.hop, self.end))
        audio = np.pad(audio, (0, (f1 - f0) * self.hop - audio.shape[0]))
        return WindowCodes(codes, audio, start - f0 * self.hop, audio_ops.loudness_lufs(raw, self.rate))

    def _upstream_gain_db(self, window: np.ndarray) -> float | None:
        """dB that upstream's −24 LUFS + peak ≤ 1 would apply to `window` (None: silence)."""
        level = audio_ops.loudness_lufs(window, self.rate)
        if not math.isfinite(level):
            return None
        gain_db = audio_ops.TARGET_LUFS - level
        peak = float(np.abs(window).max()) * 10 ** (gain_db / 20)
        return gain_db - 20 * math.log10(peak) if peak > 1 else gain_db

    # -- internals ------------------------------------------------------------------------------

    def _encode(self, f0: int, f1: int, audio_end: int) -> np.ndarray:
        """Codes [n_codebooks, f1 − f0] of frames [f0, f1), from gained audio [(f0 − left)·hop,
        audio_end) (zeros before the stream's start, like a one-shot encode from there)."""
        t = time.perf_counter()
        lo = max(0, f0 - self.left_frames)
        codes = self.codec.encode(self.gained(lo * self.hop, audio_end)[None, None, :])[0]
        self.encode_seconds += time.perf_counter() - t
        return codes[:, f0 - lo:f1 - lo]

    def _store(self, f0: int, codes: np.ndarray) -> None:
        self._codes[:, np.arange(f0, f0 + codes.shape[1]) % self.capacity_frames] = codes

    def gained(self, start: int, stop: int) -> np.ndarray:
        """The audio the encoder sees: stream samples [start, stop) times their frames' gain."""
        return self._read_raw(start, stop) * self._gains_per_sample(start, stop)

    def _gains_per_sample(self, start: int, stop: int) -> np.ndarray:
        return self._gain[(np.arange(start, stop) // self.hop) % self.capacity_frames]

    def _write_raw(self, start: int, samples: np.ndarray) -> None:
        n = self._raw.shape[0]
        if samples.shape[0] > n:
            start, samples = start + samples.shape[0] - n, samples[-n:]
        idx = np.arange(start, start + samples.shape[0]) % n
        self._raw[idx] = samples

    def _read_raw(self, start: int, stop: int) -> np.ndarray:
        return self._raw[np.arange(start, stop) % self._raw.shape[0]]

    @property
    def seconds_per_second(self) -> float:
        """Encoding cost: wall seconds per second of audio fed."""
        return self.encode_seconds / self.fed_seconds if self.fed_seconds else 0.0
