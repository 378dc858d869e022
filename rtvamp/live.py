"""`rtvamp live`: the instrument — sound card + engine + worker, a live view and keyboard control.

Keys (SooperLooper vocabulary): r record / stop recording, o overdub, space play / stop,
m mute, 1 2 4 vamp the last 1/2/4 bars of the input, l vamp the loop, f vamp the output
(feedback), n / p next / previous candidate, u undo, y redo, [ / ] recall the previous / next
take, s save the current take, t tap tempo, c clear, q quit.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .engine.backends import make_backend
from .engine.core import CoreConfig
from .engine.engine import Engine, EngineConfig
from .engine.recorder import LoopLibrary, SessionRecorder
from .engine.scheduler import Trigger, VampParams
from .engine.transport import Quantize
from .io.audio import SoundCardDriver
from .midi.control import ParamState


@dataclass(frozen=True)
class LiveOptions:
    sample_rate: int = 44100
    block_frames: int = 256
    channels: int = 2
    input_device: str | None = None
    output_device: str | None = None
    bpm: float = 120.0
    bundle: str | None = None
    params: VampParams = VampParams()
    crossfade_ms: float = 20.0
    dry: float = 1.0
    """input monitoring level"""
    record_dir: Path | None = None
    auto_every_loops: int | None = None
    loops_dir: Path = Path("rtvamp-loops")
    """where `s` saves takes (FLAC + JSON sidecar)"""
    midi_in: str | None = None
    midi_out: str | None = None
    midi_map: Path | None = None
    midi_clock: bool = False
    """follow MIDI clock on midi_in (else rtvamp sends clock on midi_out)"""
    midi_api: str | None = None
    backend: str = "local"
    """where vamps run (rtvamp.engine.backends.make_backend): local, tcp://…, ray, http://…"""
    keys: Path | None = None
    """CURVE keys folder for a tcp:// backend"""
    precision: str = "auto"
    """the local worker's transformer precision: auto, fp32 or int8 (rtvamp.vamp.Vamper)"""


GIL_SWITCH_INTERVAL_S = 0.0005
"""Python hands the GIL between threads every 5 ms by default — nearly a whole 256-frame block.
A live session shortens it so the audio callback never waits long behind the control threads."""


class LiveSession:
    """Everything a live performance runs: worker process, engine, sound card, recorder."""

    def __init__(self, options: LiveOptions) -> None:
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self.options = o = options
        core = CoreConfig(sample_rate=o.sample_rate, channels=o.channels, crossfade_ms=o.crossfade_ms,
                          max_block_frames=max(4096, o.block_frames))
        self.worker = make_backend(o.backend, bundle=o.bundle, max_batch=o.params.variations, keys=o.keys,
                                   precision=o.precision)
        self.worker.start()
        self.engine = Engine(self.worker, EngineConfig(core=core, bpm=o.bpm))
        self.engine.core.post("gains", o.dry, 1.0)
        self.scheduler = self.engine.scheduler
        self.scheduler.auto_every_loops = o.auto_every_loops
        self.params = ParamState(o.params, dry=o.dry, wet=1.0, crossfade_ms=o.crossfade_ms)
        """the performer's current vamp parameters (keyboard and MIDI knobs share them)"""
        self.midi = None
        try:
            self.driver = SoundCardDriver(self.engine, o.sample_rate, o.block_frames, o.channels,
                                          o.input_device, o.output_device)
            self.recorder = None if o.record_dir is None else SessionRecorder(
                o.record_dir, o.sample_rate, {"input": self.engine.core.input_ring,
                                              "output": self.engine.core.output_ring})
        except BaseException:
            self.engine.close()
            raise
        self._logged = 0

    def start(self) -> None:
        gc.collect()
        gc.freeze()  # startup objects never trigger a long collection in the audio callback
        self.driver.start()
        self.scheduler.latency = self.driver.latency_samples
        if self.recorder is not None:
            self.recorder.start()
        o = self.options
        if o.midi_in or o.midi_out:
            from .midi import attach

            self.midi = attach(self, o.midi_in, o.midi_map, o.midi_out, o.midi_clock, api=o.midi_api)

    def close(self) -> None:
        if self.midi is not None:
            self.midi.close()
        with contextlib.suppress(Exception):
            self.driver.stop()
        if self.recorder is not None:
            self.sync_log()
            self.recorder.stop()
        self.engine.close()

    def sync_log(self) -> None:
        """Copy new scheduler events (triggers, swaps, records) into the session log."""
        if self.recorder is None:
            return
        events = self.scheduler.events_log
        for kind, sample, info in events[self._logged:]:
            self.recorder.log_event(kind, sample, **info)
        self._logged = len(events)

    # -- performer actions ----------------------------------------------------------------

    def vamp(self, source: str, bars: int = 2) -> None:
        self.scheduler.trigger(Trigger(source, bars=bars, params=self.params.current))

    def key(self, ch: str) -> bool:
        """Apply one key; False means quit."""
        s, core = self.scheduler, self.engine.core
        actions = {
            "r": lambda: s.stop_record() if core.recording else s.record(),
            "o": lambda: core.post("overdub", not core.overdubbing),
            " ": lambda: core.post("play", not core.playing),
            "m": lambda: core.post("mute", not core.muted),
            "1": lambda: self.vamp("input", 1), "2": lambda: self.vamp("input", 2),
            "4": lambda: self.vamp("input", 4), "l": lambda: self.vamp("loop"),
            "f": lambda: self.vamp("output", 2), "n": lambda: s.next_candidate(1),
            "p": lambda: s.next_candidate(-1), "u": s.undo, "y": s.redo,
            "t": lambda: self.engine.transport.tap(core.now), "c": s.clear,
            "[": lambda: self.recall_step(-1), "]": lambda: self.recall_step(1), "s": self.save_take,
        }
        if ch == "q":
            return False
        action = actions.get(ch)
        if action is not None:
            try:
                action()
            except Exception as exc:  # a refused action is a message, never the end of the session
                s.note(f"{ch!r}: {exc}")
        return True

    def recall_step(self, step: int) -> None:
        """Recall the take before/after the current one (by take id) at the next boundary."""
        ids = sorted(self.scheduler.history.takes)
        current = self.scheduler.history.current
        if not ids or current is None:
            return
        index = min(max(ids.index(current.id) + step, 0), len(ids) - 1)
        self.scheduler.recall(ids[index])

    def save_take(self) -> Path | None:
        """Save the current take into the loop library (`loops_dir`)."""
        take = self.scheduler.history.current
        if take is None:
            return None
        meta = {"source": take.source, "bars": take.bars, "bpm": self.engine.transport.bpm, "seed": take.seed,
                "preset": take.preset if isinstance(take.preset, str) or take.preset is None else str(take.preset),
                "candidate": take.candidate, "parent": take.parent}
        path = LoopLibrary(self.options.loops_dir).save(f"take-{take.id}-{int(time.time())}", take.audio,
                                                          self.options.sample_rate, meta)
        self.scheduler.note(f"saved {path}")
        return path

    # -- the live view --------------------------------------------------------------------

    def view(self) -> Panel:
        core, s, t = self.engine.core, self.scheduler, self.engine.transport
        bar, beat = t.position(core.now)
        stats = self.driver.stats()
        xruns = sum(stats["xruns"].values())
        state = "recording" if core.recording else ("overdub" if core.overdubbing else
                                                    ("muted" if core.muted else ("playing" if core.playing else "stopped")))
        take = s.history.current
        grid = Table.grid(padding=(0, 2))
        grid.add_row("tempo", f"{t.bpm:6.2f} BPM", "position", f"bar {bar + 1}  beat {int(beat) + 1}")
        grid.add_row("loop", f"{state}, " + (f"{take.n_samples / core.config.sample_rate:.2f} s take {take.id}"
                                               if take else "empty"),
                     "xruns", f"{xruns}  (callback p99 {stats['callback_p99']:.0%} of a block)")
        job = s.active
        if job is not None:
            progress = f"{job.stage} {job.fraction:.0%}" if job.status == "running" else job.status
            grid.add_row("vamp", f"#{job.id} {job.trigger.source} {progress}",
                         "last vamp", (f"sound after {job.first_piece_s:.2f} s, " if job.first_piece_s else "")
                         + (f"whole {job.wall_latency_s:.2f} s" if job.wall_latency_s else "–"))
        info = self.worker.info
        precision = f", {info.precision}" if info and info.precision else ""
        encoding = f", encoding {info.encode_seconds_per_second:.2f} s/s" if info and info.encode_seconds_per_second else ""
        grid.add_row("worker", f"{self.options.backend}{precision}{encoding}, restarts {self.worker.restarts}",
                     "latency comp.", f"{s.latency} samples")
        if self.midi is not None:
            grid.add_row("midi", self.midi.status(), "", "")
        notes = Text("\n".join(s.messages[-3:]), style="yellow")
        keys = Text(__doc__.split("\n\n")[1].replace("\n", " "), style="dim")
        return Panel(Group(grid, notes, keys), title="rtvamp live")


def _read_keys(session: LiveSession, stop: threading.Event) -> None:
    import termios
    import tty

    fd = sys.stdin.fileno()
    old = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        while not stop.is_set():
            ch = sys.stdin.read(1)
            if not ch or not session.key(ch.lower() if ch != " " else ch):
                stop.set()
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)


def run_live(options: LiveOptions, duration_s: float | None = None, loop_file: Path | None = None) -> dict:
    """Run until `q` (or for duration_s seconds, headless when stdin is not a terminal).
    Returns the driver's stats."""
    session = LiveSession(options)
    stop = threading.Event()
    try:
        session.start()
        if loop_file is not None:
            from .audio import resample
            from .files import read_audio

            audio, rate = read_audio(loop_file, max_seconds=CoreConfig().max_loop_seconds)
            audio = resample(audio, rate, options.sample_rate)
            if audio.shape[1] != options.channels:
                audio = audio.mean(axis=1, keepdims=True).repeat(options.channels, axis=1)
            session.scheduler.load_loop(audio, quantize=Quantize.BAR)
        interactive = sys.stdin.isatty() and duration_s is None
        if interactive:
            threading.Thread(target=_read_keys, args=(session, stop), daemon=True).start()
        end = None if duration_s is None else time.monotonic() + duration_s
        with Live(session.view(), refresh_per_second=10, transient=False) as live:
            while not stop.is_set() and (end is None or time.monotonic() < end):
                time.sleep(0.1)
                session.sync_log()
                live.update(session.view())
        return session.driver.stats()
    finally:
        session.close()
