"""Reading and writing audio files (soundfile) with clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile

from .audio import AudioInputError, as_frames_by_channels

WRITABLE = {".wav": "WAV", ".flac": "FLAC"}


def read_audio(path: str | Path, max_seconds: float) -> tuple[np.ndarray, int]:
    """(float32 [n_samples, n_channels], sample rate) of a file; refuses what cannot be vamped."""
    path = Path(path)
    if not path.is_file():
        raise AudioInputError(f"{path}: no such file")
    try:
        info = soundfile.info(str(path))
    except Exception as exc:  # soundfile raises LibsndfileError / RuntimeError for foreign files
        raise AudioInputError(f"{path}: not a readable audio file ({exc})") from None
    if info.frames == 0:
        raise AudioInputError(f"{path}: the file holds no audio")
    if info.frames / info.samplerate > max_seconds:
        raise AudioInputError(f"{path}: {info.frames / info.samplerate:.1f} s is longer than the "
                              f"{max_seconds:g} s limit (raise it with --max-seconds, or cut the file)")
    data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    try:
        return as_frames_by_channels(data), rate
    except AudioInputError as exc:
        raise AudioInputError(f"{path}: {exc}") from None


def write_audio(path: str | Path, audio: np.ndarray, sample_rate: int) -> Path:
    """Write float32 [n, ch] as WAV (float) or FLAC (24-bit) by the file's suffix."""
    path = Path(path)
    fmt = WRITABLE.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: output must end in {' or '.join(WRITABLE)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    subtype = "FLOAT" if fmt == "WAV" else "PCM_24"
    soundfile.write(str(path), np.clip(audio, -1.0, 1.0), sample_rate, format=fmt, subtype=subtype)
    return path
