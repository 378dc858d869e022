"""A synthesized groove (kick, snare, hats, bass, chord stabs) for the demo, tests and benchmarks.

Deterministic for a seed; no sample files needed. Bars are 4/4; each event starts at
round(beat_index · 60/bpm · rate) samples, so the grid does not drift.
"""

from __future__ import annotations

import numpy as np


def _env(n: int, decay_s: float, rate: int) -> np.ndarray:
    return np.exp(-np.arange(n) / (decay_s * rate)).astype(np.float32)


def groove(bars: int = 2, bpm: float = 120.0, sample_rate: int = 44100, seed: int = 0) -> np.ndarray:
    """Mono float32 [round(bars · 4 · 60/bpm · rate)] at −24 dBFS RMS."""
    rng = np.random.default_rng(seed)
    beat = 60.0 / bpm
    n = int(round(bars * 4 * beat * sample_rate))
    out = np.zeros(n + sample_rate, dtype=np.float32)

    def place(start_beat: float, sound: np.ndarray) -> None:
        i = int(round(start_beat * beat * sample_rate))
        out[i:i + sound.shape[0]] += sound[: out.shape[0] - i]

    t = np.arange(int(0.35 * sample_rate)) / sample_rate
    kick = (np.sin(2 * np.pi * (50 * t + 60 * (1 - np.exp(-t * 30)) / 30)) * _env(t.size, 0.12, sample_rate)).astype(np.float32)
    snare = (rng.standard_normal(int(0.2 * sample_rate)) * _env(int(0.2 * sample_rate), 0.05, sample_rate)).astype(np.float32) * 0.5
    hat_noise = rng.standard_normal(int(0.05 * sample_rate)).astype(np.float32)
    hat = np.diff(hat_noise, prepend=0).astype(np.float32) * _env(hat_noise.size, 0.01, sample_rate) * 0.25
    bass_notes = [41.2, 41.2, 49.0, 55.0, 41.2, 61.7, 55.0, 49.0]  # E1 G1 A1 B1 (Hz)
    tb = np.arange(int(beat * sample_rate)) / sample_rate
    for b in range(bars * 4):
        place(b, hat)
        place(b + 0.5, hat)
        if b % 2 == 0:
            place(b, kick)
        else:
            place(b, snare)
        f = bass_notes[b % len(bass_notes)]
        bass = np.tanh(2.5 * np.sin(2 * np.pi * f * tb)) * _env(tb.size, 0.35, sample_rate) * 0.35
        place(b, bass.astype(np.float32))
        if b % 4 == 1:
            stab = sum(np.sin(2 * np.pi * f0 * tb) for f0 in (329.6, 392.0, 493.9)) / 3
            place(b + 0.5, (stab * _env(tb.size, 0.15, sample_rate) * 0.2).astype(np.float32))
    out = out[:n]
    return (out / np.sqrt(np.mean(out ** 2)) * 10 ** (-24 / 20)).astype(np.float32)
