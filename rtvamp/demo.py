"""`rtvamp demo`: a scripted, headless performance through the real engine.

A synthesized groove is "played" into the engine through the file driver; the script records a
loop, vamps the last bars of the input (retrospective capture), vamps the loop (several
candidates, then auditions the next one) and vamps the output (feedback). Vamps run in the
worker process; the render waits for each job so the result is sample-exact and reproducible.
Writes the output WAV, a report PNG (waveform and spectrogram with record, trigger and swap
markers) and returns per-vamp timings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .engine.backend import LocalWorker
from .engine.core import CoreConfig
from .engine.engine import Engine, EngineConfig
from .engine.scheduler import JobState, Trigger, VampParams
from .engine.transport import Quantize
from .files import write_audio
from .io.file_driver import Action, render
from .synth import groove

SAMPLE_RATE = 44100
PLAYED_BARS = 4
"""the performer plays the groove for this many bars, then only the loop sounds"""


@dataclass
class DemoResult:
    audio: np.ndarray
    """float32 [n, 2] the engine's output"""
    jobs: list[JobState]
    events: list[tuple]
    bar_samples: int
    wav: Path
    png: Path | None


def script(bar: int, params: VampParams) -> list[Action]:
    """The performance, as (engine sample, action) pairs; bar = samples per bar."""
    return [
        (0, lambda e: e.scheduler.record(Quantize.BAR)),                           # loop = bars 1–2
        (2 * bar + 100, lambda e: e.scheduler.stop_record(Quantize.BAR)),
        (4 * bar + 100, lambda e: e.scheduler.trigger(Trigger("input", bars=2, params=params))),
        (7 * bar + 100, lambda e: e.scheduler.trigger(Trigger("loop", bars=2, params=params))),
        (9 * bar + 100, lambda e: e.scheduler.next_candidate()),
        (11 * bar + 100, lambda e: e.scheduler.trigger(Trigger("output", bars=2, params=params))),
    ]


def run_demo(output: Path, bpm: float = 120.0, bars: int = 14, steps: str = "balanced", variations: int = 2,
             seed: int = 1, bundle: str | None = None, report: bool = True, precision: str = "auto") -> DemoResult:
    bar = int(round(4 * 60 / bpm * SAMPLE_RATE))
    played = groove(bars=PLAYED_BARS, bpm=bpm, sample_rate=SAMPLE_RATE, seed=seed)
    x = np.zeros((bars * bar, 2), np.float32)
    x[:played.shape[0]] = played[:, None]
    params = VampParams(steps=steps, variations=variations, seed=seed)
    with LocalWorker(bundle=bundle, max_batch=variations, precision=precision) as worker:
        engine = Engine(worker, EngineConfig(core=CoreConfig(), bpm=bpm, deadline_mode=False), threaded=False)
        engine.core.post("gains", 0.6, 0.8)
        out = render(engine, x, actions=script(bar, params))
    sched = engine.scheduler
    wav = write_audio(output, out, SAMPLE_RATE)
    png = plot_report(out, sched.events_log, output.with_suffix(".png"), bar) if report else None
    return DemoResult(out, list(sched.jobs.values()), list(sched.events_log), bar, wav, png)


def plot_report(audio: np.ndarray, events: list[tuple], path: Path, bar: int) -> Path:
    """Waveform and spectrogram of the output with record, trigger and swap markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mono = audio.mean(axis=1)
    t = np.arange(mono.shape[0]) / SAMPLE_RATE
    fig, (ax_wave, ax_spec) = plt.subplots(2, 1, figsize=(13, 6), sharex=True)
    ax_wave.plot(t[::16], mono[::16], lw=0.4, color="0.25")
    ax_wave.set_ylabel("output")
    ax_spec.specgram(mono, NFFT=2048, Fs=SAMPLE_RATE, noverlap=1024, cmap="magma")
    ax_spec.set_ylim(0, 8000)
    ax_spec.set_ylabel("Hz")
    ax_spec.set_xlabel("seconds")
    styles = {"record": ("tab:green", "record"), "recorded": ("tab:green", "loop recorded"),
              "trigger": ("tab:orange", "trigger"), "swapped": ("tab:red", "swap")}
    seen = set()
    for kind, sample, _info in events:
        if kind not in styles:
            continue
        color, label = styles[kind]
        for ax in (ax_wave, ax_spec):
            ax.axvline(sample / SAMPLE_RATE, color=color, lw=1.2, ls="--" if kind == "trigger" else "-",
                       label=label if (ax is ax_wave and kind not in seen) else None)
        seen.add(kind)
    for b in range(0, mono.shape[0] // bar + 1):
        ax_wave.axvline(b * bar / SAMPLE_RATE, color="0.85", lw=0.5, zorder=0)
    ax_wave.legend(loc="upper right", fontsize=8, ncol=4)
    ax_wave.set_title("rtvamp demo: record, retrospective vamp, loop vamp + candidate, feedback vamp")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
