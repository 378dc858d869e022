"""rtvamp.masks: parity with the original vampnet/mask.py, composition, onsets, beats, presets."""

from pathlib import Path

import numpy as np
import pytest

from rtvamp import masks as m

FIXTURE = Path(__file__).parent / "fixtures/vampnet-reference/masks.npz"
SR, HOP = 44100, 768
SHAPE = (2, 14, 50)


def frame_of(seconds: float, sample_rate: int = SR, hop: int = HOP) -> int:
    """The frame that contains the sample at ``seconds``."""
    return int(seconds * sample_rate) // hop


def kept_frames(mask: np.ndarray, codebook: int = 0) -> np.ndarray:
    return np.flatnonzero(mask[0, codebook] == 0)


def roll_offsets(rolled: np.ndarray, base: np.ndarray) -> list[int]:
    """Every circular shift that turns ``base`` into ``rolled``."""
    return [o for o in range(base.shape[-1]) if np.array_equal(rolled, np.roll(base, o, axis=-1))]


# ---------------------------------------------------------------------------- parity fixtures

RECIPES = {
    "periodic_p0": lambda: m.periodic_mask(SHAPE, 0),
    "periodic_p7_w1": lambda: m.periodic_mask(SHAPE, 7, 1),
    "periodic_p13_w3": lambda: m.periodic_mask(SHAPE, 13, 3),
    "periodic_p3_w2": lambda: m.periodic_mask(SHAPE, 3, 2),
    "inpaint_pre5_suf3": lambda: m.inpaint(SHAPE, 5, 3),
    "codebook_mask_3_of_p7": lambda: m.codebook_mask(m.periodic_mask(SHAPE, 7, 1), 3),
    "codebook_unmask_2_of_full": lambda: m.codebook_unmask(m.full_mask(SHAPE), 2),
    "and_p5_inpaint": lambda: m.mask_and(m.periodic_mask(SHAPE, 5), m.inpaint(SHAPE, 8, 8)),
    "or_p5_inpaint": lambda: m.mask_or(m.periodic_mask(SHAPE, 5), m.inpaint(SHAPE, 8, 8)),
}


def test_fixture_names_all_covered():
    with np.load(FIXTURE) as ref:
        assert set(ref.files) == set(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_reproduces_original_mask(name):
    with np.load(FIXTURE) as ref:
        expected = ref[name]
    got = RECIPES[name]()
    assert got.dtype == np.int64 and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


# ---------------------------------------------------------------------------- primitives


def test_full_empty_linear_random():
    assert m.full_mask(SHAPE).min() == 1 and m.empty_mask(SHAPE).max() == 0
    np.testing.assert_array_equal(m.linear_random(SHAPE, 1.0, 0), m.full_mask(SHAPE))
    np.testing.assert_array_equal(m.linear_random(SHAPE, 0.0, 0), m.empty_mask(SHAPE))
    big = m.linear_random((4, 14, 500), 0.3, np.random.default_rng(0))
    assert big.dtype == np.int64 and abs(big.mean() - 0.3) < 0.02
    with pytest.raises(ValueError):
        m.linear_random(SHAPE, 1.5)


def test_periodic_width_keeps_centred_window():
    # width w keeps [j - w//2, j + w//2] around every multiple j of the period
    np.testing.assert_array_equal(kept_frames(m.periodic_mask((1, 1, 30), 10, 5)),
                                  [0, 1, 2, 8, 9, 10, 11, 12, 18, 19, 20, 21, 22])
    np.testing.assert_array_equal(kept_frames(m.periodic_mask((1, 1, 30), 10, 2)),
                                  [0, 1, 9, 10, 11, 19, 20, 21])


def test_periodic_random_roll_stays_within_period():
    period, base = 7, m.periodic_mask(SHAPE, 7)
    offsets = set()
    for seed in range(200):
        shifts = roll_offsets(m.periodic_mask(SHAPE, period, random_roll=True, rng=seed), base)
        assert len(shifts) == 1 and 0 <= shifts[0] < period
        offsets.add(shifts[0])
    assert offsets == set(range(period))


def test_time_range_mask_regenerates_only_the_range():
    mask = m.time_range_mask(SHAPE, 10, 25)
    assert mask.dtype == np.int64 and mask.shape == SHAPE
    np.testing.assert_array_equal(np.flatnonzero(mask[1, 13]), np.arange(10, 25))
    assert (mask[:, :, 10:25] == 1).all() and mask[:, :, :10].sum() + mask[:, :, 25:].sum() == 0
    assert m.time_range_mask(SHAPE, 5, 5).sum() == 0
    for bad in ((-1, 5), (10, 5), (0, 51)):
        with pytest.raises(ValueError):
            m.time_range_mask(SHAPE, *bad)


def test_onset_mask_windows_clip_at_edges():
    mask = m.onset_mask((1, 2, 20), [1, 10, 19], 2)
    np.testing.assert_array_equal(kept_frames(mask, 1), [0, 1, 2, 8, 9, 10, 11, 17, 18, 19])


def test_dropout_only_adds_whole_masked_frames():
    base = m.periodic_mask((2, 4, 200), 2)
    out = m.dropout(base, 0.25, np.random.default_rng(3))
    assert (out >= base).all()
    added = np.flatnonzero((out != base).any(axis=(0, 1)))
    assert 0 < added.size <= 50  # int(200 * 0.25) draws with replacement, kept frames only change
    assert (out[:, :, added] == 1).all()
    np.testing.assert_array_equal(m.dropout(base, 0.0, 0), base)
    with pytest.raises(ValueError):
        m.dropout(base, 1.5)


def test_codebook_mask_and_unmask():
    mask = m.linear_random(SHAPE, 0.5, 0)
    upper = m.codebook_mask(mask, 5)
    assert (upper[:, 5:] == 1).all()
    np.testing.assert_array_equal(upper[:, :5], mask[:, :5])
    lower = m.codebook_unmask(mask, 3)
    assert (lower[:, :3] == 0).all()
    np.testing.assert_array_equal(lower[:, 3:], mask[:, 3:])
    np.testing.assert_array_equal(m.codebook_unmask(mask, 0), mask)


def test_mask_and_or_semantics():
    a = m.time_range_mask((1, 1, 6), 0, 3)  # keep 3..5
    b = m.time_range_mask((1, 1, 6), 2, 6)  # keep 0..1
    np.testing.assert_array_equal(m.mask_and(a, b)[0, 0], [0, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(m.mask_or(a, b)[0, 0], [1, 1, 1, 1, 1, 1])
    with pytest.raises(ValueError):
        m.mask_and(a, m.full_mask((1, 1, 5)))


def test_apply_mask_writes_mask_id_and_copies():
    codes = np.arange(2 * 14 * 50, dtype=np.int64).reshape(SHAPE) % 1024
    mask = m.periodic_mask(SHAPE, 3)
    out = m.apply_mask(codes, mask, 1024)
    assert out.dtype == codes.dtype and out is not codes
    np.testing.assert_array_equal(out, np.where(mask == 1, 1024, codes))
    assert (codes < 1024).all()
    with pytest.raises(ValueError):
        m.apply_mask(codes[:, :4], mask, 1024)
    with pytest.raises(ValueError):
        m.apply_mask(codes, mask * 2, 1024)


# ---------------------------------------------------------------------------- beats


def test_s2t_rounds_up():
    assert m.s2t(0.0) == 0 and m.s2t(0.05) == 3 and m.s2t(0.08) == 5 and m.s2t(10.0) == 575
    assert m.s2t(1.0, sample_rate=48000, hop_length=512) == 94


def test_beat_mask_keeps_frames_around_beats():
    beats = [0.5, 1.0, 1.5]  # frames ceil(t * 44100 / 768) = 29, 58, 87
    mask = m.beat_mask((1, 3, 120), beats, before_beat_s=0.02, after_beat_s=0.05)
    expected = np.concatenate([np.arange(b - 2, b + 3) for b in (29, 58, 87)])
    for cb in range(3):
        np.testing.assert_array_equal(kept_frames(mask, cb), expected)
    marked = m.beat_mask((1, 3, 120), beats, 0.02, 0.05, invert=False)
    np.testing.assert_array_equal(marked, 1 - mask)


def test_beat_mask_downbeats_and_downsampling():
    beats, downbeats = [0.5, 1.0, 1.5, 2.0], [0.5, 1.5]  # frames 29, 58, 87, 115
    only_down = m.beat_mask((1, 1, 130), beats, 0.0, 0.05, downbeat_times_s=downbeats,
                            mask_upbeats=False)
    np.testing.assert_array_equal(kept_frames(only_down), [29, 30, 31, 87, 88, 89])
    only_up = m.beat_mask((1, 1, 130), beats, 0.0, 0.05, downbeat_times_s=downbeats,
                          mask_downbeats=False)
    np.testing.assert_array_equal(kept_frames(only_up), [58, 59, 60, 115, 116, 117])
    thinned = m.beat_mask((1, 1, 130), beats, 0.0, 0.05, beat_downsample_factor=2)
    np.testing.assert_array_equal(kept_frames(thinned), [29, 30, 31, 87, 88, 89])
    dropped = m.beat_mask((1, 1, 130), beats, 0.0, 0.05, dropout=1.0, rng=0)
    assert dropped.min() == 1
    with pytest.raises(ValueError):
        m.beat_mask((1, 1, 130), beats, beat_downsample_factor=0)


# ---------------------------------------------------------------------------- onsets


def synth_hits(times_s, duration_s, sample_rate=SR, noise=0.0, seed=0):
    """Clicks and exponentially decaying noise bursts / tones starting at ``times_s``."""
    rng = np.random.default_rng(seed)
    n = int(duration_s * sample_rate)
    y = noise * rng.standard_normal(n)
    for k, t in enumerate(times_s):
        start = int(t * sample_rate)
        length = min(int(0.3 * sample_rate), n - start)
        env = np.exp(-np.arange(length) / (0.025 * sample_rate))  # decays to -100 dB
        if k % 3 == 0:
            y[start] += 0.8
        elif k % 3 == 1:
            y[start : start + length] += 0.5 * env * rng.standard_normal(length)
        else:
            tone = np.sin(2 * np.pi * 440 * np.arange(length) / sample_rate)
            y[start : start + length] += 0.5 * env * tone
    return y.astype(np.float32)


@pytest.mark.parametrize("noise", [0.0, 1e-3])
def test_detect_onsets_finds_hits_within_one_frame(noise):
    times = [0.25, 0.61, 0.9, 1.37, 1.7, 2.05, 2.5, 2.83, 3.3]
    onsets = m.detect_onsets(synth_hits(times, 3.6, noise=noise))
    truth = np.array([frame_of(t) for t in times])
    assert onsets.dtype == np.int64
    assert onsets.shape == truth.shape, (onsets, truth)
    assert np.abs(onsets - truth).max() <= 1, (onsets, truth)


def test_detect_onsets_frame_convention_and_parameters():
    # a click at the very start of frame 40 is reported at frame 40
    assert m.detect_onsets(synth_hits([40 * HOP / SR], 1.5)).tolist() == [40]
    # a burst fading in over 40 ms from inside frame 30 peaks in the flux later; backtracking
    # returns the frame where it starts
    y = np.zeros(2 * SR)
    n = np.arange(SR // 2)
    start, ramp = 30 * HOP + 100, int(0.04 * SR)
    envelope = np.minimum(n / ramp, 1.0) * np.exp(-n / (0.1 * SR))
    y[start : start + n.size] = envelope * np.random.default_rng(0).standard_normal(n.size)
    assert m.detect_onsets(y).tolist() == [30]
    # other sample rates / hops: frames follow the given hop
    times = [0.3, 0.8, 1.2]
    got = m.detect_onsets(synth_hits(times, 1.5, sample_rate=48000), sample_rate=48000,
                          hop_length=512, n_fft=1024)
    truth = np.array([frame_of(t, 48000, 512) for t in times])
    assert got.shape == truth.shape and np.abs(got - truth).max() <= 1


def test_detect_onsets_silence_and_steady_noise():
    assert m.detect_onsets(np.zeros(SR, dtype=np.float32)).size == 0
    assert m.detect_onsets(1e-6 * np.random.default_rng(0).standard_normal(SR)).size == 0
    assert m.detect_onsets(np.zeros(0)).size == 0
    # steady noise: one onset where it starts (frame 0), none from its fluctuations
    for seed in range(5):
        noise = 0.1 * np.random.default_rng(seed).standard_normal(10 * SR)
        assert m.detect_onsets(noise).tolist() == [0]


# ---------------------------------------------------------------------------- build_mask


def test_build_mask_defaults_match_upstream_recipe():
    mask = m.build_mask(SHAPE, rng=5)
    assert mask.dtype == np.int64 and mask.shape == SHAPE
    assert (mask[:, 3:] == 1).all()  # upper_codebook_mask = 3
    shifts = roll_offsets(mask[:, :3], m.periodic_mask((2, 3, 50), 7))
    assert len(shifts) == 1 and 0 <= shifts[0] < 7


def test_build_mask_is_reproducible_per_seed():
    kw = dict(rand_mask_intensity=0.7, dropout=0.3, periodic_prompt=5)
    a = m.build_mask(SHAPE, rng=1, **kw)
    np.testing.assert_array_equal(a, m.build_mask(SHAPE, rng=1, **kw))
    np.testing.assert_array_equal(a, m.build_mask(SHAPE, rng=np.random.default_rng(1), **kw))
    assert not np.array_equal(a, m.build_mask(SHAPE, rng=2, **kw))


def test_build_mask_prompt_from_any_component_survives():
    shape = (1, 14, 100)
    mask = m.build_mask(shape, rng=0, prefix_s=0.1, suffix_s=0.05, periodic_prompt=10,
                        upper_codebook_mask=14)
    kept = kept_frames(mask)
    prefix, suffix = m.s2t(0.1), m.s2t(0.05)  # 6 and 3 frames
    assert set(range(prefix)) <= set(kept) and set(range(100 - suffix, 100)) <= set(kept)
    offset = int(kept[prefix:][0]) % 10
    periodic = np.roll(m.periodic_mask(shape, 10), offset, -1)
    np.testing.assert_array_equal(mask, m.mask_and(m.inpaint(shape, prefix, suffix), periodic))


def test_build_mask_dropout_only_adds_masked_frames():
    kw = dict(periodic_prompt=2, upper_codebook_mask=14)
    base = m.build_mask(SHAPE, rng=4, **kw)
    dropped = m.build_mask(SHAPE, rng=4, dropout=0.5, **kw)
    assert (dropped >= base).all() and dropped.sum() > base.sum()


def test_build_mask_codebook_unmask_and_upper():
    mask = m.build_mask(SHAPE, rng=0, ncc=2, upper_codebook_mask=6, dropout=1.0)
    assert (mask[:, :2] == 0).all() and (mask[:, 6:] == 1).all()


def test_build_mask_onset_prompt_from_audio():
    times = [0.3, 0.7, 1.1]
    audio = synth_hits(times, 1.5)
    shape = (1, 4, m.s2t(1.5))
    mask = m.build_mask(shape, audio=audio, rng=0, periodic_prompt=0, onset_mask_width=2,
                        upper_codebook_mask=4)
    onsets = m.detect_onsets(audio)
    np.testing.assert_array_equal(mask, m.onset_mask(shape, onsets, 2))
    assert onsets.size == len(times)
    with pytest.raises(ValueError):
        m.build_mask(shape, onset_mask_width=2)


# ---------------------------------------------------------------------------- presets

BEATS = [0.5 * k for k in range(20)]  # 120 bpm from t = 0


@pytest.mark.parametrize("name", sorted(m.PRESETS))
def test_every_preset_builds(name):
    preset = m.PRESETS[name]
    shape = (2, 14, 575)
    mask = m.preset_mask(name, shape, beat_times_s=BEATS, rng=0)
    assert mask.dtype == np.int64 and mask.shape == shape
    assert set(np.unique(mask)) <= {0, 1}
    assert (mask[:, preset.upper_codebook_mask:] == 1).all()


def test_preset_table():
    p = m.PRESETS
    assert p[m.DEFAULT_PRESET] == m.MaskPreset(7, 4)
    assert p["timbre-transfer"] == m.MaskPreset(2, 1)
    assert p["large-variation"].dropout == 0.2
    assert p["large-variation-follow-beat"] == m.MaskPreset(0, 4, beat_mask_ms=80)
    assert m.preset_mask("unconditional", SHAPE, rng=0).min() == 1
    timbre = m.preset_mask("timbre-transfer", SHAPE, rng=0)
    assert len(kept_frames(timbre)) == 25 and (timbre[:, 1:] == 1).all()


def test_follow_beat_presets_keep_frames_after_beats():
    shape = (1, 14, 575)
    frames = [m.s2t(t) for t in BEATS]
    mask = m.preset_mask("large-variation-follow-beat", shape, beat_times_s=BEATS, rng=0)
    expected = np.concatenate([np.arange(f, f + m.s2t(0.08)) for f in frames])
    np.testing.assert_array_equal(kept_frames(mask), expected)
    # with a periodic prompt, beats add prompts (mask_and keeps prompts from either)
    beat_only = m.beat_mask(shape, BEATS, 0.0, 0.05)
    both = m.preset_mask("small-variation-follow-beat", shape, beat_times_s=BEATS, rng=0)
    plain = m.preset_mask("medium-variation", shape, rng=0)  # same P and seed: same roll
    np.testing.assert_array_equal(both, m.codebook_mask(m.mask_and(plain, beat_only), 4))


def test_preset_errors():
    with pytest.raises(ValueError, match="beat_times_s"):
        m.preset_mask("small-variation-follow-beat", SHAPE, rng=0)
    with pytest.raises(KeyError, match="unknown mask preset"):
        m.preset_mask("huge-variation", SHAPE)
