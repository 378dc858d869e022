"""Token masks for VampNet: which tokens to regenerate and which to keep as the prompt.

A mask is an integer array shaped ``(batch, n_codebooks, n_frames)`` with **1 = generate** and
**0 = keep** (the prompt). One frame is one codec hop (``hop_length`` samples, 768 at 44.1 kHz:
about 57.4 frames per second). Every function here returns a new ``np.int64`` array.

The primitives follow ``vampnet/mask.py`` (main branch) and :func:`build_mask` composes them in the
order of ``Interface.build_mask``; see ``docs/vampnet.md`` §3.7. Masks are combined with
:func:`mask_and` (elementwise minimum: a prompt from any component survives). Randomness comes from
an explicit :class:`numpy.random.Generator` (or a seed), so every mask is reproducible.

Deliberate deviations from upstream: windows that would start before frame 0 (onset and beat
prompts) are clipped to frame 0, where upstream's negative slice start silently drops them; onsets
come from our own spectral-flux detector (:func:`detect_onsets`) instead of librosa; beat times are
given by the caller (the live engine's tempo grid) instead of WaveBeat.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SAMPLE_RATE = 44100
"""Codec sample rate in Hz."""
HOP_LENGTH = 768
"""Codec hop in samples: one token frame."""
_FLUX_FMIN_HZ = 30.0  # lowest band edge of the onset detector's log-frequency bands

Shape = tuple[int, int, int]
RngLike = np.random.Generator | int | None

__all__ = [
    "DEFAULT_PRESET", "HOP_LENGTH", "PRESETS", "SAMPLE_RATE", "MaskPreset",
    "apply_mask", "beat_mask", "build_mask", "codebook_mask", "codebook_unmask", "detect_onsets",
    "dropout", "empty_mask", "full_mask", "inpaint", "linear_random", "mask_and", "mask_or",
    "onset_mask", "periodic_mask", "preset_mask", "s2t", "time_range_mask",
]


def s2t(seconds: float, sample_rate: int = SAMPLE_RATE, hop_length: int = HOP_LENGTH) -> int:
    """Seconds to a number of frames, rounded up: ``ceil(seconds * sample_rate / hop_length)``."""
    return math.ceil(seconds * sample_rate / hop_length)


def _shape(shape: Sequence[int]) -> Shape:
    if len(shape) != 3 or min(shape) < 0:
        raise ValueError(f"mask shape must be (batch, n_codebooks, n_frames), got {tuple(shape)}")
    return int(shape[0]), int(shape[1]), int(shape[2])


def _check_binary(mask: np.ndarray, name: str = "mask") -> None:
    if mask.ndim != 3:
        raise ValueError(f"{name} must be (batch, n_codebooks, n_frames), got shape {mask.shape}")
    if mask.size and (mask.min() < 0 or mask.max() > 1):
        raise ValueError(f"{name} must be binary (0 = keep, 1 = generate)")


def _frame_windows(n_frames: int, centres: np.ndarray, before: int, after: int) -> np.ndarray:
    """Boolean (n_frames,): [c - before, c + after) for every centre c, clipped to the grid."""
    marks = np.zeros(n_frames + 1, dtype=np.int64)
    lo = np.clip(np.asarray(centres, dtype=np.int64) - before, 0, n_frames)
    hi = np.clip(np.asarray(centres, dtype=np.int64) + after, 0, n_frames)
    ok = hi > lo
    np.add.at(marks, lo[ok], 1)
    np.add.at(marks, hi[ok], -1)
    return np.cumsum(marks[:-1]) > 0


# --------------------------------------------------------------------------------------------
# primitives (vampnet/mask.py)
# --------------------------------------------------------------------------------------------


def full_mask(shape: Sequence[int]) -> np.ndarray:
    """All ones: regenerate every token."""
    return np.ones(_shape(shape), dtype=np.int64)


def empty_mask(shape: Sequence[int]) -> np.ndarray:
    """All zeros: keep every token."""
    return np.zeros(_shape(shape), dtype=np.int64)


def linear_random(shape: Sequence[int], intensity: float, rng: RngLike = None) -> np.ndarray:
    """Bernoulli(``intensity``) per token: 1.0 masks everything, lower values scatter prompts."""
    if not 0.0 <= intensity <= 1.0:
        raise ValueError(f"intensity must be in [0, 1], got {intensity}")
    rng = np.random.default_rng(rng)
    return (rng.random(_shape(shape)) < intensity).astype(np.int64)


def inpaint(shape: Sequence[int], prefix_frames: int, suffix_frames: int) -> np.ndarray:
    """Keep the first ``prefix_frames`` and the last ``suffix_frames`` frames (all codebooks)."""
    if prefix_frames < 0 or suffix_frames < 0:
        raise ValueError("prefix_frames and suffix_frames must be >= 0")
    mask = full_mask(shape)
    mask[..., :prefix_frames] = 0
    if suffix_frames > 0:
        mask[..., -suffix_frames:] = 0
    return mask


def time_range_mask(shape: Sequence[int], start_frame: int, end_frame: int) -> np.ndarray:
    """Explicit inpainting: regenerate frames ``[start_frame, end_frame)`` only, keep the rest."""
    n_frames = _shape(shape)[2]
    if not 0 <= start_frame <= end_frame <= n_frames:
        raise ValueError(
            f"need 0 <= start_frame <= end_frame <= {n_frames}, got [{start_frame}, {end_frame})"
        )
    mask = empty_mask(shape)
    mask[..., start_frame:end_frame] = 1
    return mask


def periodic_mask(
    shape: Sequence[int],
    period: int,
    width: int = 1,
    random_roll: bool = False,
    rng: RngLike = None,
) -> np.ndarray:
    """Keep every ``period``-th frame: frames j with j % period == 0, widened to
    ``[j - width // 2, j + width // 2]`` (so widths 2 and 3 both keep three frames).

    ``period == 0`` means no periodic prompt (everything masked). With ``random_roll`` the whole
    mask is rolled right (circularly) by one offset drawn uniformly from ``[0, period)``.
    """
    if period < 0:
        raise ValueError(f"period must be >= 0, got {period}")
    mask = full_mask(shape)
    if period == 0:
        return mask
    n_frames = mask.shape[-1]
    half = width // 2
    kept = _frame_windows(n_frames, np.arange(0, n_frames, period), half, half + 1)
    mask[..., kept] = 0
    if random_roll:
        mask = np.roll(mask, int(np.random.default_rng(rng).integers(0, period)), axis=-1)
    return mask


def onset_mask(shape: Sequence[int], onset_frames: Sequence[int], width: int) -> np.ndarray:
    """Keep ``[idx - width, idx + width)`` around every onset frame idx (all codebooks)."""
    mask = full_mask(shape)
    mask[..., _frame_windows(mask.shape[-1], np.asarray(onset_frames), width, width)] = 0
    return mask


def beat_mask(
    shape: Sequence[int],
    beat_times_s: Sequence[float],
    before_beat_s: float = 0.0,
    after_beat_s: float = 0.02,
    downbeat_times_s: Sequence[float] | None = None,
    mask_downbeats: bool = True,
    mask_upbeats: bool = True,
    downbeat_downsample_factor: int | None = None,
    beat_downsample_factor: int | None = None,
    dropout: float = 0.0,
    invert: bool = True,
    rng: RngLike = None,
    sample_rate: int = SAMPLE_RATE,
    hop_length: int = HOP_LENGTH,
) -> np.ndarray:
    """Beat-synchronous mask, as upstream ``Interface.make_beat_mask``.

    Beat and downbeat times (seconds from the first frame) become frames with :func:`s2t`; beats
    that coincide with a downbeat count as downbeats. Around each selected beat, frames
    ``[beat - s2t(before_beat_s), beat + s2t(after_beat_s))`` are marked; ``*_downsample_factor``
    keeps every k-th (down)beat only, and ``dropout`` drops each marked frame with that
    probability (drawn from ``rng``). Upbeats are marked first, then downbeats, each window
    overwriting earlier marks. With ``invert`` (the default) the marked frames are kept (0) and
    everything else is generated (1); otherwise the marks themselves are generated.
    """
    batch, n_codebooks, n_frames = _shape(shape)
    factors = {"beat": beat_downsample_factor, "downbeat": downbeat_downsample_factor}
    for name, factor in factors.items():
        if factor is not None and factor < 1:
            raise ValueError(f"{name}_downsample_factor must be >= 1 or None, got {factor}")
    if not 0.0 <= dropout <= 1.0:
        raise ValueError(f"dropout must be in [0, 1], got {dropout}")
    fps = sample_rate / hop_length
    beats = np.ceil(np.asarray(beat_times_s, dtype=np.float64) * fps).astype(np.int64)
    downbeat_times = np.asarray(downbeat_times_s if downbeat_times_s is not None else [], float)
    downbeats = np.ceil(downbeat_times * fps).astype(np.int64)
    beats = beats[~np.isin(beats, downbeats)][:: beat_downsample_factor or 1]
    downbeats = downbeats[:: downbeat_downsample_factor or 1]
    before = s2t(before_beat_s, sample_rate, hop_length)
    after = s2t(after_beat_s, sample_rate, hop_length)

    rng = np.random.default_rng(rng) if dropout > 0 else None
    marks = np.zeros(n_frames, dtype=np.int64)
    selected = [beats if mask_upbeats else [], downbeats if mask_downbeats else []]
    for frame in (int(f) for group in selected for f in group):
        lo, hi = max(frame - before, 0), min(max(frame + after, 0), n_frames)
        if hi > lo:
            marks[lo:hi] = 1 if rng is None else rng.random(hi - lo) >= dropout
    if invert:
        marks = 1 - marks
    return np.broadcast_to(marks, (batch, n_codebooks, n_frames)).copy()


def dropout(mask: np.ndarray, p: float, rng: RngLike = None) -> np.ndarray:
    """Mask ``int(n_frames * p)`` frames drawn uniformly with replacement (all batch items and
    codebooks): only ever turns prompt tokens into generated ones."""
    _check_binary(mask)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    n_frames = mask.shape[-1]
    out = mask.astype(np.int64, copy=True)
    out[..., np.random.default_rng(rng).integers(0, n_frames, int(n_frames * p))] = 1
    return out


_frame_dropout = dropout  # build_mask's `dropout` parameter (upstream's name) shadows the function


def codebook_unmask(mask: np.ndarray, ncc: int | None) -> np.ndarray:
    """Keep codebooks ``< ncc`` entirely (conditioning codebooks); 0 or None is a no-op."""
    out = mask.astype(np.int64, copy=True)
    if ncc:
        out[:, :ncc, :] = 0
    return out


def codebook_mask(mask: np.ndarray, upper: int) -> np.ndarray:
    """Generate codebooks ``>= upper`` entirely (the "compression prompt")."""
    out = mask.astype(np.int64, copy=True)
    out[:, upper:, :] = 1
    return out


def mask_and(mask1: np.ndarray, mask2: np.ndarray) -> np.ndarray:
    """Elementwise minimum: a token is kept if either mask keeps it."""
    if mask1.shape != mask2.shape:
        raise ValueError(f"masks must have the same shape, got {mask1.shape} and {mask2.shape}")
    return np.minimum(mask1, mask2).astype(np.int64)


def mask_or(mask1: np.ndarray, mask2: np.ndarray) -> np.ndarray:
    """``clip(mask1 + mask2, 0, 1)``: a token is kept only if both masks keep it."""
    if mask1.shape != mask2.shape:
        raise ValueError(f"masks must have the same shape, got {mask1.shape} and {mask2.shape}")
    _check_binary(mask1, "mask1")
    _check_binary(mask2, "mask2")
    return np.clip(mask1.astype(np.int64) + mask2, 0, 1)


def apply_mask(codes: np.ndarray, mask: np.ndarray, mask_id: int) -> np.ndarray:
    """Return a copy of ``codes`` with ``mask_id`` written wherever ``mask == 1``."""
    if mask.shape != codes.shape:
        raise ValueError(f"mask {mask.shape} and codes {codes.shape} must have the same shape")
    _check_binary(mask)
    return np.where(mask == 1, np.asarray(mask_id, dtype=codes.dtype), codes)


# --------------------------------------------------------------------------------------------
# onset detection (spectral flux)
# --------------------------------------------------------------------------------------------


def _spectral_flux(
    audio: np.ndarray, sample_rate: int, hop_length: int, n_fft: int, log_gain: float,
    bands_per_octave: int,
) -> np.ndarray:
    """Half-wave rectified log-magnitude flux, one value per frame (``ceil(len / hop)`` frames).

    Frame t analyses the ``n_fft`` samples that end where frame t ends, ``(t + 1) * hop_length``,
    so energy that starts inside frame t first shows up at flux[t]. STFT magnitudes are summed
    into log-spaced bands (``bands_per_octave``, at least one bin wide) before the log, so a tone
    weighs about as much as a broadband hit.
    """
    n_frames = -(-audio.shape[0] // hop_length)
    padded = np.zeros(n_fft - hop_length + n_frames * hop_length, dtype=np.float64)
    padded[n_fft - hop_length : n_fft - hop_length + audio.shape[0]] = audio
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop_length]
    window = np.hanning(n_fft + 1)[:-1]
    mag = np.abs(np.fft.rfft(frames * window, axis=-1)) / window.sum()
    n_octaves = math.log2(sample_rate / 2 / _FLUX_FMIN_HZ)
    edges_hz = _FLUX_FMIN_HZ * 2.0 ** np.linspace(0, n_octaves, round(n_octaves * bands_per_octave))
    edges = np.unique(np.round(edges_hz * n_fft / sample_rate).astype(np.int64))
    bands = np.log1p(log_gain * np.add.reduceat(mag, edges[edges < mag.shape[1]], axis=-1))
    diff = np.diff(bands, axis=0, prepend=0.0)  # the frame before the audio is silence
    return np.maximum(diff, 0.0).sum(axis=1)


def _backtrack(peaks: np.ndarray, flux: np.ndarray, tolerance: float) -> np.ndarray:
    """Move each peak back to the start of its rise: the frame after the preceding local minimum
    of the flux, where dips shallower than ``tolerance`` times the peak's flux (noise) do not
    count as minima and the frame before the audio counts as flux 0."""
    e = np.concatenate(([0.0], flux))  # e[i] = flux[i - 1]: index i is the frame after i - 1
    starts = np.empty_like(peaks)
    for k, peak in enumerate(peaks):
        i, tol = peak + 1, tolerance * flux[peak]
        while i > 0 and e[i - 1] < e[i] - tol:
            i -= 1
        starts[k] = min(i, peak)
    return starts


def detect_onsets(
    audio: np.ndarray,
    sample_rate: int = SAMPLE_RATE,
    hop_length: int = HOP_LENGTH,
    n_fft: int = 2048,
    delta: float = 0.07,
    wait_s: float = 0.03,
    max_window_s: float = 0.03,
    mean_window_s: float = 0.1,
    log_gain: float = 1000.0,
    bands_per_octave: int = 12,
    silence_db: float = -70.0,
    backtrack_tolerance: float = 0.02,
) -> np.ndarray:
    """Onset frames of mono ``audio`` (float samples at ``sample_rate``), on the token grid.

    Spectral flux: STFT magnitude (``n_fft``-sample Hann windows, one per hop) summed into
    log-spaced frequency bands (``bands_per_octave`` from 30 Hz, each at least one bin wide),
    compressed as ``log(1 + log_gain * |X|)``; the half-wave rectified frame difference summed
    over the bands, normalised to a maximum of 1. Peak picking as librosa's ``peak_pick``: a frame
    is an onset when it is the maximum within ``max_window_s`` on both sides, exceeds the mean
    within ``mean_window_s`` by ``delta``, and comes more than ``wait_s`` after the previous one.
    Each onset is then backtracked to the start of its rise, the frame after the preceding local
    minimum of the flux (librosa ``backtrack=True``; dips shallower than ``backtrack_tolerance``
    times the peak are ignored). The returned index is thus the frame (``hop_length`` samples) in
    which the onset begins: exact, or one frame late for an onset in the last samples of a frame.
    Audio whose peak stays below ``silence_db`` dBFS (digital silence, faint noise) has no onsets.

    Returns sorted unique int64 frame indices in ``[0, ceil(len(audio) / hop_length))``.
    """
    audio = np.asarray(audio, dtype=np.float64)
    if audio.ndim != 1:
        raise ValueError(f"audio must be mono (n_samples,), got shape {audio.shape}")
    if n_fft < hop_length:
        raise ValueError(f"n_fft ({n_fft}) must be >= hop_length ({hop_length})")
    if audio.size == 0 or np.abs(audio).max() < 10.0 ** (silence_db / 20.0):
        return np.zeros(0, dtype=np.int64)
    flux = _spectral_flux(audio, sample_rate, hop_length, n_fft, log_gain, bands_per_octave)
    env = flux / flux.max()

    fps = sample_rate / hop_length
    w_max, w_mean, wait = (max(1, round(s * fps)) for s in (max_window_s, mean_window_s, wait_s))
    local_max = np.lib.stride_tricks.sliding_window_view(
        np.pad(env, w_max, constant_values=-np.inf), 2 * w_max + 1
    ).max(axis=1)
    csum = np.concatenate(([0.0], np.cumsum(env)))
    idx = np.arange(env.size)
    lo, hi = np.maximum(idx - w_mean, 0), np.minimum(idx + w_mean + 1, env.size)
    local_mean = (csum[hi] - csum[lo]) / (hi - lo)
    candidates = np.flatnonzero((env >= local_max) & (env >= local_mean + delta))

    peaks: list[int] = []
    for c in candidates:
        if not peaks or c - peaks[-1] > wait:
            peaks.append(int(c))
    return np.unique(_backtrack(np.asarray(peaks, dtype=np.int64), flux, backtrack_tolerance))


# --------------------------------------------------------------------------------------------
# composition (Interface.build_mask) and app presets
# --------------------------------------------------------------------------------------------


def build_mask(
    shape: Sequence[int],
    *,
    audio: np.ndarray | None = None,
    rng: RngLike = None,
    rand_mask_intensity: float = 1.0,
    prefix_s: float = 0.0,
    suffix_s: float = 0.0,
    periodic_prompt: int = 7,
    periodic_prompt_width: int = 1,
    onset_mask_width: int = 0,
    dropout: float = 0.0,
    upper_codebook_mask: int = 3,
    ncc: int = 0,
    beat_times_s: Sequence[float] | None = None,
    downbeat_times_s: Sequence[float] | None = None,
    beat_before_s: float = 0.0,
    beat_after_s: float = 0.02,
    sample_rate: int = SAMPLE_RATE,
    hop_length: int = HOP_LENGTH,
) -> np.ndarray:
    """Compose a mask like upstream ``Interface.build_mask``, plus the app's beat step.

    Order: ``linear_random(rand_mask_intensity)`` AND ``inpaint(s2t(prefix_s), s2t(suffix_s))``
    AND ``periodic_mask(periodic_prompt, periodic_prompt_width, random_roll=True)`` AND (if
    ``onset_mask_width`` > 0 frames) ``onset_mask`` around :func:`detect_onsets` of ``audio``
    (mono float samples at ``sample_rate``, aligned with frame 0), then :func:`dropout` of
    ``int(n_frames * dropout)`` frames, ``codebook_unmask(ncc)`` and
    ``codebook_mask(upper_codebook_mask)``. If ``beat_times_s`` (seconds) is given, the result is
    ANDed with ``beat_mask(before_beat_s=beat_before_s, after_beat_s=beat_after_s)`` and
    ``codebook_mask`` is applied again, as the app does.

    ``rng`` (a Generator or a seed) drives every random draw, so equal seeds give equal masks.
    Returns int64 ``(batch, n_codebooks, n_frames)``.
    """
    shape = _shape(shape)
    rng = np.random.default_rng(rng)
    mask = linear_random(shape, rand_mask_intensity, rng)
    prefix, suffix = (s2t(s, sample_rate, hop_length) for s in (prefix_s, suffix_s))
    mask = mask_and(mask, inpaint(shape, prefix, suffix))
    periodic = periodic_mask(shape, periodic_prompt, periodic_prompt_width, True, rng)
    mask = mask_and(mask, periodic)
    if onset_mask_width > 0:
        if audio is None:
            raise ValueError("onset_mask_width > 0 needs the audio to detect onsets in")
        onsets = detect_onsets(audio, sample_rate, hop_length)
        mask = mask_and(mask, onset_mask(shape, onsets, onset_mask_width))
    mask = _frame_dropout(mask, dropout, rng)
    mask = codebook_unmask(mask, ncc)
    mask = codebook_mask(mask, upper_codebook_mask)
    if beat_times_s is not None:
        beats = beat_mask(
            shape, beat_times_s, beat_before_s, beat_after_s, downbeat_times_s,
            sample_rate=sample_rate, hop_length=hop_length,
        )
        mask = codebook_mask(mask_and(mask, beats), upper_codebook_mask)
    return mask


@dataclass(frozen=True)
class MaskPreset:
    """One preset of the VampNet main app (``docs/vampnet.md`` §3.8).

    ``beat_mask_ms`` > 0 means "follow beat": keep ``s2t(beat_mask_ms / 1000)`` frames after
    every beat, which needs beat times.
    """

    periodic_prompt: int
    upper_codebook_mask: int
    onset_mask_width: int = 0
    dropout: float = 0.0
    beat_mask_ms: float = 0.0
    rand_mask_intensity: float = 1.0
    """mask density: the probability that a token is regenerated before the prompts are added"""


PRESETS: dict[str, MaskPreset] = {
    "timbre-transfer": MaskPreset(2, 1),
    "small-variation": MaskPreset(5, 4),
    "small-variation-follow-beat": MaskPreset(7, 4, beat_mask_ms=50),
    "medium-variation": MaskPreset(7, 4),
    "medium-variation-follow-beat": MaskPreset(13, 4, beat_mask_ms=50),
    "large-variation": MaskPreset(13, 4, dropout=0.2),
    "large-variation-follow-beat": MaskPreset(0, 4, beat_mask_ms=80),
    "unconditional": MaskPreset(0, 1),
}
DEFAULT_PRESET = "medium-variation"


def preset_mask(
    preset: str | MaskPreset,
    shape: Sequence[int],
    audio: np.ndarray | None = None,
    beat_times_s: Sequence[float] | None = None,
    downbeat_times_s: Sequence[float] | None = None,
    rng: RngLike = None,
    sample_rate: int = SAMPLE_RATE,
    hop_length: int = HOP_LENGTH,
) -> np.ndarray:
    """The mask of an app preset (a :data:`PRESETS` name or a :class:`MaskPreset`).

    "Follow beat" presets need ``beat_times_s`` (seconds from frame 0, e.g. from the live
    engine's tempo grid; ``downbeat_times_s`` optional): the :func:`build_mask` result is ANDed
    with a beat mask keeping ``beat_mask_ms`` after each beat, then ``codebook_mask`` is
    re-applied, as the app does. Raises KeyError for an unknown name and ValueError when a
    follow-beat preset gets no beat times.
    """
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise KeyError(f"unknown mask preset {preset!r}; choose one of {', '.join(PRESETS)}")
        preset = PRESETS[preset]
    follow_beat = preset.beat_mask_ms > 0
    if follow_beat and beat_times_s is None:
        raise ValueError(
            f"this preset follows the beat (beat_mask_ms={preset.beat_mask_ms}): pass "
            "beat_times_s (beat times in seconds, e.g. from the live engine's tempo grid)"
        )
    return build_mask(
        shape,
        audio=audio,
        rng=rng,
        rand_mask_intensity=preset.rand_mask_intensity,
        periodic_prompt=preset.periodic_prompt,
        onset_mask_width=preset.onset_mask_width,
        dropout=preset.dropout,
        upper_codebook_mask=preset.upper_codebook_mask,
        beat_times_s=beat_times_s if follow_beat else None,
        downbeat_times_s=downbeat_times_s,
        beat_after_s=preset.beat_mask_ms / 1000.0,
        sample_rate=sample_rate,
        hop_length=hop_length,
    )
