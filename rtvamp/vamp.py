"""The Vamper: an audio window in, vamped variations out (VampNet's `Interface`, faithfully).

audio (any rate, mono/stereo) → 44.1 kHz mono, −24 LUFS, peak ≤ 1 → encode → mask →
coarse generation in ≤ coarse-chunk windows (seam rule) → coarse-to-fine in c2f chunks
(conditioning codebooks fixed) → decode all codebooks → back to the input loudness and rate.
It never imports torch. Sampling buffers are allocated once per Vamper (the transformers for
their chunk length, the samplers for `max_batch` candidates).

`vamp` is that whole pipeline. The live worker uses its stages: `prepare` (the trigger-path
encode) or `prepare_from_stream` (codes a continuous encoder made before the trigger,
rtvamp.code_stream), `generate` (mask, coarse, C2F), and `stream_audio` (the decoder in pieces
with their context, each handed on as soon as it is ready).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from . import audio as audio_ops
from . import masks
from .bundle import Bundle, load_bundle
from .code_stream import CodeStream
from .codec import Codec, CodecReach
from .sampler import MaskedSampler, SamplingParams
from .transformer import Transformer

Progress = Callable[[str, float], None]
"""(stage name, fraction done of that stage in [0, 1])."""

STEP_PRESETS: dict[str, tuple[int, int]] = {
    "fast": (4, 1),
    "balanced": (8, 2),
    "quality": (12, 2),
    "upstream": (36, 2),
}
"""Named (coarse steps, c2f steps). `quality` is upstream's programmatic default (12 + 2);
`upstream` the web app's 36 + 2."""


def resolve_steps(steps: str | int, c2f_steps: int | None = None) -> tuple[int, int]:
    """(coarse steps, c2f steps) from a step preset name or a coarse step count (C2F default 2)."""
    if isinstance(steps, str):
        if steps not in STEP_PRESETS:
            raise ValueError(f"unknown step preset {steps!r}; choose from {', '.join(STEP_PRESETS)}")
        coarse, c2f = STEP_PRESETS[steps]
    else:
        coarse, c2f = steps, 2
    return coarse, c2f_steps or c2f


@dataclass(frozen=True)
class VampSettings:
    """What a vamp does. Mask recipe by preset name (see rtvamp.masks.PRESETS) unless `mask` is
    given explicitly to `Vamper.vamp`; sampling per stage; one seed per candidate."""

    preset: str | masks.MaskPreset = masks.DEFAULT_PRESET
    coarse: SamplingParams = field(default_factory=lambda: SamplingParams(steps=12))
    c2f: SamplingParams = field(default_factory=lambda: SamplingParams(steps=2))
    seeds: tuple[int, ...] = (0,)

    @classmethod
    def make(cls, preset: str = masks.DEFAULT_PRESET, steps: str | int = "quality", c2f_steps: int | None = None,
             temperature: float = 1.0, top_p: float | None = None, seed: int = 0, variations: int = 1,
             periodic_prompt: int | None = None, upper_codebook_mask: int | None = None,
             mask_density: float | None = None) -> VampSettings:
        """Settings from performer-level knobs (step preset name or coarse step count); the mask
        preset's periodic prompt, upper codebook mask and density can be overridden."""
        coarse_steps, c2f_steps = resolve_steps(steps, c2f_steps)
        if preset not in masks.PRESETS:
            raise ValueError(f"unknown mask preset {preset!r}; choose from {', '.join(masks.PRESETS)}")
        if variations < 1:
            raise ValueError("variations must be ≥ 1")
        overrides = {k: v for k, v in (("periodic_prompt", periodic_prompt), ("upper_codebook_mask", upper_codebook_mask),
                                       ("rand_mask_intensity", mask_density)) if v is not None}
        if overrides:
            preset = replace(masks.PRESETS[preset], **overrides)
        return cls(preset=preset,
                   coarse=SamplingParams(steps=coarse_steps, temperature=temperature, top_p=top_p),
                   c2f=SamplingParams(steps=c2f_steps, temperature=temperature, top_p=top_p),
                   seeds=tuple(seed + i for i in range(variations)))


@dataclass
class VampResult:
    audio: np.ndarray
    """float32 [candidates, n_samples, n_channels] at the input rate and loudness"""
    sample_rate: int
    codes: np.ndarray
    """int64 [candidates, n_codebooks, n_frames] generated tokens"""
    mask: np.ndarray
    """int64 [1, n_codebooks, n_frames] the mask used (1 = generated)"""
    seconds: dict[str, float]
    """wall time per stage: preprocess, encode, coarse, c2f, decode, postprocess"""


@dataclass
class Prepared:
    """A window ready for generation: its codes and what it takes to put the output back."""

    codes: np.ndarray
    """int64 [1, n_codebooks, n_frames]"""
    mono: np.ndarray
    """float32 [≥ n_samples] the normalised mono audio from the first frame's start (masks)"""
    offset: int
    """samples (bundle rate) from the first frame's start to the window's first sample"""
    n_samples: int
    """the window's length in samples at the bundle rate"""
    level: float
    """the input's loudness, LUFS (the output is brought back to it)"""
    source: str
    """"window" (encoded on the trigger path) or "stream" (from the code stream)"""
    seconds: dict[str, float] = field(default_factory=dict)
    """wall seconds of the preparing stages (preprocess, encode)"""


GROWING_PIECES = (16, 32, 64, 128)
"""frames per streamed decode piece when the decoder is fast: the first pieces small (the first
sample early), then larger (each piece also decodes the decoder's reach on both sides)"""


def plan_pieces(n_frames: int, reach: CodecReach, seconds_per_frame: float | None, frame_s: float) -> list[int]:
    """Frames per streamed decode piece: of growing pieces and 1–4 equal ones, the plan from
    which playback can start soonest (`playback_lead`) given the decoder's measured seconds per
    decoded frame. A decoder faster than playback gets small first pieces; a slow one (each
    piece pays for its context frames) few large ones, down to one whole decode."""
    growing, done, k = [], 0, 0
    while done < n_frames:
        size = min(GROWING_PIECES[min(k, len(GROWING_PIECES) - 1)], n_frames - done)
        growing.append(size)
        done, k = done + size, k + 1
    if seconds_per_frame is None:
        return growing
    plans = [growing] + [[len(part) for part in np.array_split(np.arange(n_frames), k)] for k in (1, 2, 3, 4)
                         if k <= n_frames]
    return min(plans, key=lambda sizes: playback_lead(sizes, reach, seconds_per_frame, frame_s))


def decoded_frames(sizes: Sequence[int], reach: CodecReach) -> list[int]:
    """Frames each streamed piece decodes: its own and its context (the decoder's reach)."""
    n_frames, start, out = sum(sizes), 0, []
    for size in sizes:
        out.append(min(n_frames, start + size + reach.decoder_right) - max(0, start - reach.decoder_left))
        start += size
    return out


def playback_lead(sizes: Sequence[int], reach: CodecReach, seconds_per_frame: float, frame_s: float) -> float:
    """Seconds from the start of a streamed decode until playback may start and never overtake
    the decoder: the worst of (piece ready − piece's place in the window)."""
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    ready = np.cumsum(decoded_frames(sizes, reach)) * seconds_per_frame
    return float(max(0.0, (ready - starts * frame_s).max()))


def _chunk_seeds(seeds: Sequence[int], stage: int, chunk: int) -> list[int]:
    """Independent, reproducible seeds for one chunk of one stage of every candidate."""
    return [int(np.random.SeedSequence([s, stage, chunk]).generate_state(1)[0]) for s in seeds]


class Vamper:
    """VampNet inference on a bundle. `max_batch` = the most candidates per call."""

    def __init__(self, bundle: Bundle | str | None = None, max_batch: int = 2, threads: int = 0,
                 precision: str = "auto") -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        m = self.manifest = self.bundle.manifest
        self.max_batch = max_batch
        self.codec = Codec(self.bundle, threads)
        self.coarse = Transformer(self.bundle, "coarse", max_batch, m.coarse_chunk_frames, threads, precision)
        self.c2f = Transformer(self.bundle, "c2f", max_batch, m.c2f_chunk_frames, threads, precision)
        self.precision = (self.coarse.precision if self.coarse.precision == self.c2f.precision
                          else f"coarse {self.coarse.precision}, c2f {self.c2f.precision}")
        """what `precision` (auto, fp32, int8) picked: "fp32", "int8", or "coarse int8, c2f fp32" when they differ"""
        self._coarse_sampler = MaskedSampler(m.coarse_codebooks, 0, m.vocab_size, m.mask_id,
                                             max_batch, m.coarse_chunk_frames)
        self._c2f_sampler = MaskedSampler(m.c2f_codebooks, m.c2f_conditioning_codebooks, m.vocab_size,
                                          m.mask_id, max_batch, m.c2f_chunk_frames)
        self.step_seconds: dict[str, float] = {}
        """measured seconds of one step per stage and chunk length (`coarse/575`, `c2f/173`),
        exponentially averaged; the deadline mode plans with it"""

    @property
    def sessions(self) -> list:
        """Every onnxruntime session of the Vamper: encoder, decoder, coarse, c2f."""
        return [*self.codec.sessions, self.coarse.session, self.c2f.session]

    # -- stages -------------------------------------------------------------------------------

    def encode(self, mono: np.ndarray) -> np.ndarray:
        """mono float32 [n] at the bundle rate → codes int64 [1, n_codebooks, ⌈n/hop⌉]."""
        return self.codec.encode(mono[None, None, :])

    def _measure(self, key: str, seconds: float) -> None:
        old = self.step_seconds.get(key)
        self.step_seconds[key] = seconds if old is None else 0.7 * old + 0.3 * seconds

    def _run_sampler(self, sampler: MaskedSampler, model: Transformer, key: str, codes: np.ndarray,
                     mask: np.ndarray, params: SamplingParams, seeds: Sequence[int],
                     noise: Sequence[np.ndarray] | None, finish_by: float | None,
                     on_step: Callable[[int, int], None] | None) -> np.ndarray:
        start, steps = time.perf_counter(), [0]

        def count(i: int, total: int) -> None:
            steps[0] += 1
            if on_step is not None:
                on_step(i, total)

        out = sampler.generate(model.logits, codes, mask, params, noise=noise, seeds=seeds,
                               finish_by=finish_by, step_seconds=self.step_seconds.get(key),
                               on_step=count)
        self._measure(key, (time.perf_counter() - start) / max(steps[0], 1))
        return out

    def coarse_vamp(self, codes: np.ndarray, mask: np.ndarray, params: SamplingParams,
                    seeds: Sequence[int], noise: Sequence[np.ndarray] | None = None,
                    finish_by: float | None = None, progress: Progress | None = None) -> np.ndarray:
        """Upstream `Interface.coarse_vamp`: codes/mask [B, n_cb, T] → codes [B, n_cb, T] with the
        coarse codebooks generated in chunks of `coarse_chunk_frames` and the fine ones passed
        through. Seam rule: in a chunk with any kept token, the chunk's first and last frames
        are kept. `noise`: recorded Gumbel noise, `params.steps` arrays per chunk in order."""
        m = self.manifest
        n_cb, n_frames, chunk = m.coarse_codebooks, codes.shape[-1], m.coarse_chunk_frames
        out = codes.copy()
        starts = range(0, n_frames, chunk)
        for k, start in enumerate(starts):
            stop = min(start + chunk, n_frames)
            cmask = mask[:, :n_cb, start:stop].copy()
            if (cmask == 0).any():
                cmask[:, :, 0] = 0
                cmask[:, :, -1] = 0
            chunk_noise = None if noise is None else noise[k * params.steps:(k + 1) * params.steps]
            on_step = None if progress is None else (
                lambda i, s, k=k: progress("coarse", (k + (i + 1) / s) / len(starts)))
            out[:, :n_cb, start:stop] = self._run_sampler(
                self._coarse_sampler, self.coarse, f"coarse/{stop - start}", codes[:, :n_cb, start:stop],
                cmask, params, _chunk_seeds(seeds, 0, k), chunk_noise, finish_by, on_step)
        return out

    def coarse_to_fine(self, codes: np.ndarray, mask: np.ndarray, params: SamplingParams,
                       seeds: Sequence[int], noise: Sequence[np.ndarray] | None = None,
                       finish_by: float | None = None, progress: Progress | None = None) -> np.ndarray:
        """Upstream `Interface.coarse_to_fine`: codes/mask [B, n_cb, T] → all codebooks. Time is
        right-padded to a multiple of `c2f_chunk_frames` (token 0, mask 1); the conditioning
        codebooks are always kept; fine tokens are regenerated only where mask = 1."""
        m = self.manifest
        chunk, n_frames = m.c2f_chunk_frames, codes.shape[-1]
        pad = (-n_frames) % chunk
        padded = np.pad(codes, ((0, 0), (0, 0), (0, pad)))
        pmask = np.pad(mask, ((0, 0), (0, 0), (0, pad)), constant_values=1)
        pmask[:, :m.c2f_conditioning_codebooks] = 0
        n_chunks = padded.shape[-1] // chunk
        for k in range(n_chunks):
            sl = slice(k * chunk, (k + 1) * chunk)
            chunk_noise = None if noise is None else noise[k * params.steps:(k + 1) * params.steps]
            on_step = None if progress is None else (
                lambda i, s, k=k: progress("c2f", (k + (i + 1) / s) / n_chunks))
            padded[:, :, sl] = self._run_sampler(
                self._c2f_sampler, self.c2f, f"c2f/{chunk}", padded[:, :, sl], pmask[:, :, sl],
                params, _chunk_seeds(seeds, 1, k), chunk_noise, finish_by, on_step)
        return padded[:, :, :n_frames]

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """codes [B, K, T] → audio float32 [B, 1, T·hop] at the bundle rate."""
        return self.codec.decode(codes)

    # -- the whole vamp -----------------------------------------------------------------------

    def build_mask(self, mono: np.ndarray, n_frames: int, settings: VampSettings,
                   beat_times_s: Sequence[float] | None = None) -> np.ndarray:
        """The preset's mask [1, n_codebooks, n_frames] for this audio (seeded by the first seed)."""
        return masks.preset_mask(settings.preset, (1, self.manifest.n_codebooks, n_frames), audio=mono,
                                 beat_times_s=beat_times_s, rng=settings.seeds[0],
                                 sample_rate=self.manifest.sample_rate, hop_length=self.manifest.hop_length)

    def vamp(self, audio: np.ndarray, sample_rate: int, settings: VampSettings | None = None,
             mask: np.ndarray | None = None, beat_times_s: Sequence[float] | None = None,
             finish_by: float | None = None, progress: Progress | None = None) -> VampResult:
        """Vamp a window: audio [n] or [n, ch] at `sample_rate` → one variation per seed.

        `mask` [1, n_codebooks, ⌈n'/hop⌉] (1 = generate) overrides the preset. `finish_by`
        (time.perf_counter() deadline): the coarse stage commits early so that C2F and decode
        (planned from measured costs) still end in time."""
        frames = audio_ops.as_frames_by_channels(audio)
        prepared = self.prepare(frames, sample_rate)
        fine, mask, seconds = self.generate(prepared, settings, mask, beat_times_s, finish_by, progress)
        t4 = time.perf_counter()
        decoded = self.decode(fine)[:, 0, :prepared.n_samples]
        t5 = time.perf_counter()
        self._measure("decode/frame", (t5 - t4) / fine.shape[-1])
        out = np.stack([self._postprocess(x, prepared.level, sample_rate, frames.shape) for x in decoded])
        seconds.update(decode=t5 - t4, postprocess=time.perf_counter() - t5)
        return VampResult(out, sample_rate, fine, mask, seconds)

    def prepare(self, audio: np.ndarray, sample_rate: int) -> Prepared:
        """The trigger-path encode (upstream's): audio [n, ch] → normalised mono → codes."""
        t0 = time.perf_counter()
        frames = audio_ops.as_frames_by_channels(audio)
        mono = audio_ops.resample(audio_ops.to_mono(frames), sample_rate, self.manifest.sample_rate)
        level = audio_ops.loudness_lufs(mono, self.manifest.sample_rate)
        if not np.isfinite(level) or np.abs(mono).max() < 1e-6:
            raise audio_ops.AudioInputError("the audio is silent: there is nothing to vamp")
        mono = audio_ops.normalise(mono, self.manifest.sample_rate, audio_ops.TARGET_LUFS)
        t1 = time.perf_counter()
        codes = self.encode(mono)
        seconds = {"preprocess": t1 - t0, "encode": time.perf_counter() - t1}
        return Prepared(codes, mono, 0, mono.shape[0], level, "window", seconds)

    def prepare_from_stream(self, stream: CodeStream, engine_start: int, n_samples: int) -> Prepared | None:
        """The window [engine_start, engine_start + n_samples) from continuously encoded codes
        (None when the stream does not hold it; see rtvamp.code_stream)."""
        t0 = time.perf_counter()
        window = stream.window(engine_start, engine_start + n_samples)
        if window is None:
            return None
        return Prepared(window.codes, window.audio, window.offset, n_samples, window.level, "stream",
                        {"preprocess": 0.0, "encode": time.perf_counter() - t0})

    def generate(self, prepared: Prepared, settings: VampSettings | None = None, mask: np.ndarray | None = None,
                 beat_times_s: Sequence[float] | None = None, finish_by: float | None = None,
                 progress: Progress | None = None, streamed: bool = False
                 ) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        """Mask, coarse and C2F over prepared codes → (codes [candidates, n_cb, T], the mask,
        seconds per stage so far). `beat_times_s` count from the window's first sample.
        `streamed`: the result will be decoded by `stream_audio` (the deadline then plans for
        playback to start, not for the whole decode)."""
        settings = settings or VampSettings()
        n_cand = len(settings.seeds)
        if not 1 <= n_cand <= self.max_batch:
            raise ValueError(f"{n_cand} candidates requested; this Vamper was built for 1–{self.max_batch}")
        seconds = dict(prepared.seconds)
        t2 = time.perf_counter()
        codes, n_frames = prepared.codes, prepared.codes.shape[-1]
        if mask is None:
            shift = prepared.offset / self.manifest.sample_rate
            beats = None if beat_times_s is None else [b + shift for b in beat_times_s]
            mask = self.build_mask(prepared.mono, n_frames, settings, beats)
        elif mask.shape != (1, self.manifest.n_codebooks, n_frames):
            raise ValueError(f"mask must be [1, {self.manifest.n_codebooks}, {n_frames}], got {mask.shape}")
        batch_codes = np.repeat(codes, n_cand, axis=0)
        batch_mask = np.repeat(mask.astype(np.int64), n_cand, axis=0)
        coarse_deadline = None if finish_by is None else \
            finish_by - self._rest_after_coarse(n_frames, settings, streamed)
        coarse = self.coarse_vamp(batch_codes, batch_mask, settings.coarse, settings.seeds,
                                  finish_by=coarse_deadline, progress=progress)
        t3 = time.perf_counter()
        fine = self.coarse_to_fine(coarse, batch_mask, settings.c2f, settings.seeds, progress=progress)
        seconds.update(coarse=t3 - t2, c2f=time.perf_counter() - t3)
        return fine, mask, seconds

    def stream_audio(self, fine: np.ndarray, prepared: Prepared, n_channels: int, reach: CodecReach
                     ) -> Iterator[tuple[int, np.ndarray, float]]:
        """Streamed decode of generated codes → (first window sample, audio float32 [candidates,
        n, n_channels] at the bundle rate, estimated seconds until the last piece) in order,
        covering the window [0, n_samples), brought to the input's loudness as they go
        (audio.StreamLevel), in pieces planned from the decoder's measured speed
        (`plan_pieces`)."""
        hop, n_frames = self.manifest.hop_length, fine.shape[-1]
        sizes = plan_pieces(n_frames, reach, self.step_seconds.get("decode/frame"), hop / self.manifest.sample_rate)
        work = decoded_frames(sizes, reach)
        level = audio_ops.StreamLevel(fine.shape[0], self.manifest.sample_rate, prepared.level)
        start = 0
        for i, size in enumerate(sizes):
            t0, stop = time.perf_counter(), start + size
            lo, hi = max(0, start - reach.decoder_left), min(n_frames, stop + reach.decoder_right)
            audio = self.codec.decode(fine[..., lo:hi])[:, 0, (start - lo) * hop:(stop - lo) * hop]
            self._measure("decode/frame", (time.perf_counter() - t0) / (hi - lo))
            first = max(0, start * hop - prepared.offset)              # window samples
            last = min(prepared.n_samples, stop * hop - prepared.offset)
            if last > first:
                piece = audio[:, first + prepared.offset - start * hop:last + prepared.offset - start * hop]
                eta = self.step_seconds["decode/frame"] * sum(work[i + 1:])
                yield first, np.repeat(level.apply(piece)[:, :, None], n_channels, axis=2), eta
            start = stop

    def _rest_after_coarse(self, n_frames: int, settings: VampSettings, streamed: bool = False) -> float:
        """Planned seconds after the coarse stage, from measured costs (0 until measured): C2F,
        then the whole decode — or, streamed, until playback may start (`playback_lead`)."""
        chunk = self.manifest.c2f_chunk_frames
        c2f = self.step_seconds.get(f"c2f/{chunk}", 0.0) * settings.c2f.steps * -(-n_frames // chunk)
        per_frame = self.step_seconds.get("decode/frame", 0.0)
        if not streamed or not per_frame:
            return c2f + per_frame * n_frames
        reach = CodecReach.of(self.manifest)
        frame_s = self.manifest.hop_length / self.manifest.sample_rate
        return c2f + playback_lead(plan_pieces(n_frames, reach, per_frame, frame_s), reach, per_frame, frame_s)

    def _postprocess(self, mono: np.ndarray, level: float, sample_rate: int, shape: tuple[int, int]) -> np.ndarray:
        """Bundle-rate mono → input loudness, input rate and length, input channel count."""
        out = audio_ops.normalise(mono, self.manifest.sample_rate, level)
        out = audio_ops.resample(out, self.manifest.sample_rate, sample_rate)
        n = shape[0]
        out = np.pad(out, (0, max(0, n - out.shape[0])))[:n]
        return np.repeat(out[:, None], shape[1], axis=1)
