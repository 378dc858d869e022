"""Audio conditioning shared by the Vamper and the file commands: checks, mono, resampling, loudness."""

from __future__ import annotations

import math

import numpy as np
import pyloudnorm
import soxr

TARGET_LUFS = -24.0
"""VampNet normalises the model input to −24 LUFS (then peak ≤ 1)."""


class AudioInputError(ValueError):
    """Audio that cannot be vamped, with a message for the user."""


def as_frames_by_channels(audio: np.ndarray) -> np.ndarray:
    """float32 [n_samples, n_channels] from a 1-D or 2-D ([n, ch]) array; refuses bad input."""
    audio = np.asarray(audio)
    if audio.ndim == 1:
        audio = audio[:, None]
    if audio.ndim != 2 or audio.shape[1] > 8:
        raise AudioInputError(f"expected audio shaped [samples] or [samples, channels], got {audio.shape}")
    if audio.shape[0] == 0:
        raise AudioInputError("the audio is empty")
    if not np.isfinite(audio).all():
        raise AudioInputError("the audio contains NaN or infinite samples")
    return np.ascontiguousarray(audio, dtype=np.float32)


def to_mono(audio: np.ndarray) -> np.ndarray:
    """[n, ch] → [n] (mean of the channels)."""
    return audio.mean(axis=1, dtype=np.float32) if audio.shape[1] > 1 else audio[:, 0].copy()


def resample(audio: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """soxr (high quality) resampling of [n] or [n, ch] float32."""
    if rate_in == rate_out:
        return audio
    if rate_in <= 0:
        raise AudioInputError(f"sample rate must be positive, got {rate_in}")
    return soxr.resample(audio, rate_in, rate_out).astype(np.float32, copy=False)


def loudness_lufs(audio: np.ndarray, rate: int) -> float:
    """Integrated loudness (ITU-R BS.1770) of mono audio; −inf for silence.

    Clips shorter than one 400 ms gating block are measured on a looped copy (their loudness
    is that of the repeated material).
    """
    block = int(0.4 * rate) + 1
    if audio.shape[0] < block:
        audio = np.resize(audio, block)
    with np.errstate(divide="ignore"):
        return float(pyloudnorm.Meter(rate).integrated_loudness(audio.astype(np.float64)))


def normalise(audio: np.ndarray, rate: int, target_lufs: float) -> np.ndarray:
    """Gain to `target_lufs` (no change for silence), then scale down so |peak| ≤ 1."""
    level = loudness_lufs(audio, rate)
    if math.isfinite(level):
        audio = audio * np.float32(10 ** ((target_lufs - level) / 20))
    peak = float(np.abs(audio).max(initial=0.0))
    return audio / np.float32(peak) if peak > 1 else audio


class StreamLevel:
    """Brings a streamed result to the input's loudness as it goes. Upstream normalises the whole
    output to the input's loudness, which a stream cannot measure first; here each piece of each
    candidate is scaled by a gain that glides, across the piece, from the previous piece's gain
    to the one that brings everything decoded so far to `target_lufs` (capped so that the peak
    so far stays ≤ 1). It converges on upstream's gain as the pieces come; no step, no click."""

    def __init__(self, n_candidates: int, rate: int, target_lufs: float) -> None:
        self.rate, self.target_lufs = rate, target_lufs
        self._heard: list[list[np.ndarray]] = [[] for _ in range(n_candidates)]
        self._gains: list[float | None] = [None] * n_candidates

    def apply(self, piece: np.ndarray) -> np.ndarray:
        """piece float32 [candidates, n] (the next samples of each) → the same, level-matched."""
        out = np.empty_like(piece)
        for k, samples in enumerate(piece):
            self._heard[k].append(samples)
            so_far = np.concatenate(self._heard[k])
            level = loudness_lufs(so_far, self.rate)
            previous = self._gains[k]
            gain = 10 ** ((self.target_lufs - level) / 20) if math.isfinite(level) else (previous or 1.0)
            peak = float(np.abs(so_far).max(initial=0.0))
            if peak * gain > 1:
                gain = 1 / peak
            out[k] = samples * np.linspace(gain if previous is None else previous, gain, len(samples),
                                           dtype=np.float32)
            self._gains[k] = gain
        return out
