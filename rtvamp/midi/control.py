"""MidiControl: MIDI in → looper actions, vamp parameters, gains and tempo; pad lights and clock out.

Runs on the control side only: rtmidi's thread queues what arrives (rtvamp.midi.ports), and
`poll` — from MidiControl's own thread every `poll_s` (about 5 ms) in a live session, or from the
file driver's actions in offline renders — drains the queue and applies each message in order. Each
message is placed on the engine's sample clock (rtvamp.midi.clock.TimeMap): triggers and tap
tempo use that sample, not the poll's, so a pad hit is not moved by poll jitter. A message older
than `stale_s` when polled (nobody polled in between, e.g. an offline render) counts as "now".
Nothing here runs on, or waits for, the audio thread; the audio core gets `post` commands.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from time import perf_counter

from ..engine.core import fade_curves
from ..engine.scheduler import Trigger, VampParams, raise_thread_priority
from .clock import CONTINUE, SONG_POSITION, START, STOP, ClockIn, ClockOut, TimeMap
from .mapping import (ACTIONS, PARAMS, ActionBinding, Binding, Incoming, Mapping, MappingError, ParamBinding,
                      default_mapping, incoming, load_mapping)
from .ports import MidiError, MidiInput, MidiOutput, describe

log = logging.getLogger(__name__)

VAMPS: dict[str, tuple[str, int]] = {
    "vamp_1": ("input", 1), "vamp_2": ("input", 2), "vamp_4": ("input", 4),
    "vamp_loop": ("loop", 2), "vamp_feedback": ("output", 2),
}
"""vamp action → (trigger source, bars)"""
PAD_PENDING, PAD_READY, PAD_PLAYING, PAD_ON = 32, 64, 127, 127
"""note-on velocities that light a pad: a vamp queued/generating, done and waiting for its bar
line, playing; an on/off action that is on (velocity 0: off)"""
VAMP_PARAMS = ("temperature", "periodic_prompt", "upper_codebook_mask", "steps", "mask_density")


class ParamState:
    """The performer's current vamp parameters and mix, shared by MIDI, keyboard and UI.

    `VampParams` is frozen: an update swaps in a new copy (`dataclasses.replace`), so a reader
    always gets a consistent set. dry/wet are the engine's gains (linear); a crossfade_ms change
    applies from the engine's next swap."""

    def __init__(self, params: VampParams | None = None, dry: float = 1.0, wet: float = 1.0,
                 crossfade_ms: float = 20.0) -> None:
        self._params = params or VampParams()
        self._lock = threading.Lock()
        self.dry, self.wet = dry, wet
        self.crossfade_ms = crossfade_ms

    @property
    def current(self) -> VampParams:
        return self._params

    def update(self, **changes) -> VampParams:
        """Replace some fields (VampParams field names); returns the new parameters."""
        with self._lock:
            self._params = replace(self._params, **changes)
            return self._params


@dataclass(frozen=True)
class Applied:
    """One message MidiControl acted on (for the UI, tests and the latency benchmark)."""

    stamped_s: float
    """perf_counter seconds of the MIDI API's timestamp (when the message arrived)"""
    applied_s: float
    """perf_counter seconds when the action was done"""
    sample: int
    """the message's engine sample (what triggers and taps use)"""
    what: str


class MidiControl:
    """MIDI control of one engine (rtvamp.engine.Engine: core, scheduler, transport).

    midi_in / midi_out: opened or not (a port that is missing now is opened when it appears;
    ports are checked every `port_check_s`). clock_in: follow MIDI clock and Start/Stop/Continue/
    Song Position from midi_in; clock_out: send clock (24 PPQN) and Start/Stop on midi_out — not
    both. map_path: where MIDI learn saves the map.
    """

    def __init__(self, engine, mapping: Mapping | None = None, params: ParamState | None = None,
                 midi_in: MidiInput | None = None, midi_out: MidiOutput | None = None, clock_in: bool = False,
                 clock_out: bool = False, map_path: str | Path | None = None, poll_s: float = 0.005,
                 port_check_s: float = 1.0, stale_s: float = 0.1) -> None:
        if clock_in and clock_out:
            raise MidiError("MIDI clock in and out at once would loop: choose one")
        self.engine = engine
        self.core, self.scheduler, self.transport = engine.core, engine.scheduler, engine.transport
        self.sample_rate = engine.core.config.sample_rate
        self.mapping = mapping or default_mapping()
        self.params = params or ParamState()
        self.midi_in, self.midi_out = midi_in, midi_out
        self.map_path = Path(map_path) if map_path else None
        self.poll_s, self.port_check_s = poll_s, port_check_s
        self.stale = int(stale_s * self.sample_rate)
        self.time_map = TimeMap(self.sample_rate)
        self.clock_in = ClockIn(self.transport, self.time_map, dropout_s=self.mapping.clock.dropout_ms / 1000) \
            if clock_in else None
        self.clock_out = ClockOut(midi_out, self.transport, self.time_map) if clock_out and midi_out else None
        self.messages: list[str] = []
        """MIDI notices for the performer, newest last (also given to `scheduler.note`)"""
        self.applied: deque[Applied] = deque(maxlen=4096)
        self.learned: Binding | None = None
        """the last binding MIDI learn made"""
        self._learn: str | None = None
        self._cc_pressed: dict[tuple[int, int], bool] = {}
        self._posted: dict[str, tuple[bool, int]] = {}  # on/off action → (value, core.blocks at post)
        self._rec_wanted, self._rec_at = False, -1
        self._rec_deferred: bool | None = None
        self._lit: dict[tuple[int, int], int] = {}
        self._clock_playing: bool | None = None
        self._next_port_check = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Poll from a thread of our own every `poll_s` (live sessions); starts clock out."""
        self._thread = threading.Thread(target=self._run, name="rtvamp-midi", daemon=True)
        self._thread.start()
        if self.clock_out is not None:
            self.clock_out.start()

    def _run(self) -> None:
        raise_thread_priority()  # like the scheduler: short bursts, never preempted holding the GIL
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception as exc:  # the control thread must outlive any single bad message
                log.exception("MIDI control error")
                self._note(f"MIDI error: {exc}")
                self._stop.wait(0.5)
            self._stop.wait(self.poll_s)

    def close(self) -> None:
        """Stop polling and clock out, turn the pad lights off, close the ports."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self.clock_out is not None:
            self.clock_out.close()
        if self.midi_out is not None:
            for (channel, note), velocity in self._lit.items():
                if velocity:
                    self.midi_out.send([0x90 | channel, note, 0])
            self.midi_out.close()
        if self.midi_in is not None:
            self.midi_in.close()

    # -- polling ----------------------------------------------------------------------------

    def poll(self, now_sample: int | None = None) -> None:
        """Apply everything received since the last poll. now_sample: the engine's current
        sample (default core.now; the file driver passes the block start)."""
        perf = perf_counter()
        now = self.core.now if now_sample is None else now_sample
        self.time_map.observe_engine(perf, now)
        if self.midi_in is not None:
            for taken_s, midi_s, message in self.midi_in.drain():
                self.time_map.observe_midi(taken_s, midi_s)
                sample = round(self.time_map.sample_of_midi(midi_s))
                if sample > now or now - sample > self.stale:
                    sample = now
                try:
                    self._handle(message, taken_s, midi_s, sample)
                except Exception as exc:  # one bad message (say, taps at 500 BPM) never drops the rest
                    log.exception("MIDI message %s", message)
                    self._note(f"MIDI {describe(message)}: {exc}")
        if self.clock_in is not None:
            self._note(self.clock_in.check(perf))
        if self._rec_deferred is not None and not self._record_pending():
            on, self._rec_deferred = self._rec_deferred, None
            self._set_record(on)
        if perf >= self._next_port_check:
            self._next_port_check = perf + self.port_check_s
            self._check_ports()
        self._feedback()

    def _check_ports(self) -> None:
        for port in (self.midi_in, self.midi_out):
            if port is not None:
                notice = port.check()
                if notice and port is self.midi_out:
                    self._lit.clear()  # a returning device needs its lights and a Start again
                    self._clock_playing = None
                self._note(notice)

    def _note(self, text: str | None) -> None:
        if text:
            self.messages.append(text)
            del self.messages[:-20]
            self.scheduler.note(text)  # the live view shows the scheduler's notices

    def _done(self, midi_s: float, sample: int, what: str) -> None:
        self.applied.append(Applied(self.time_map.perf_of_midi(midi_s), perf_counter(), sample, what))

    # -- messages ---------------------------------------------------------------------------

    def _handle(self, message: list[int], taken_s: float, midi_s: float, sample: int) -> None:
        status = message[0]
        if status >= 0xF0:
            if self.clock_in is not None:
                self._clock_message(status, message[1:], taken_s, midi_s, sample)
            return
        event = incoming(message)
        if event is None:
            return
        if self._learn is not None and event.learnable:
            self._bind(event)
            return
        binding = self.mapping.lookup(event.kind, event.number, event.channel)
        if isinstance(binding, ParamBinding):
            if event.kind == "cc":
                self._set_param(binding, event.value)
                self._done(midi_s, sample, f"{binding.param}={binding.value(event.value)}")
        elif isinstance(binding, ActionBinding):
            if event.kind == "cc":  # a CC button: act on edges only
                key = (event.channel, event.number)
                if self._cc_pressed.get(key, False) == event.pressed:
                    return
                self._cc_pressed[key] = event.pressed
            if self._action(binding, event.pressed, sample):
                self._done(midi_s, sample, binding.action + ("" if event.pressed else " off"))

    def _clock_message(self, status: int, data: list[int], taken_s: float, midi_s: float, sample: int) -> None:
        self._note(self.clock_in.message(status, data, midi_s, taken_s, sample))
        self.scheduler.tempo_locked = True  # the master sets the tempo, not the first recorded loop
        if status not in (START, CONTINUE, STOP, SONG_POSITION):
            return
        if status != SONG_POSITION and self.mapping.clock.follow_start_stop:
            self._set_state("play", status != STOP)
        names = {START: "clock start", CONTINUE: "clock continue", STOP: "clock stop", SONG_POSITION: "song position"}
        self._done(midi_s, sample, names[status])

    # -- MIDI learn -------------------------------------------------------------------------

    def learn(self, target: str) -> None:
        """Arm MIDI learn: the next note-on or CC binds `target` (an action or parameter name;
        a parameter needs a CC), replacing older bindings of that control; the map is saved to
        map_path. Raises MappingError for an unknown target."""
        if target not in ACTIONS and target not in PARAMS:
            raise MappingError(f"unknown learn target {target!r}; actions: {', '.join(ACTIONS)}; "
                               f"parameters: {', '.join(PARAMS)}")
        self._learn = target
        self._note(f"MIDI learn: move or press the control for {target}")

    def _bind(self, event: Incoming) -> None:
        try:
            binding = self.mapping.bind(self._learn, event.kind, event.number)
        except MappingError as exc:  # a note for a parameter: keep waiting for a CC
            self._note(str(exc))
            return
        self._learn, self.learned = None, binding
        saved = ""
        if self.map_path is not None:
            try:
                saved = f"; saved to {self.mapping.save(self.map_path)}"
            except OSError as exc:
                saved = f"; NOT saved ({exc})"
        self._note(f"MIDI learn: {binding.control} → {getattr(binding, 'action', None) or binding.param}{saved}")

    # -- actions ----------------------------------------------------------------------------

    def _action(self, binding: ActionBinding, pressed: bool, sample: int) -> bool:
        """Do what a press/release of an action control means; True if something was done."""
        name = binding.action
        if not ACTIONS[name].stateful:
            if pressed:
                self._one_shot(name, sample)
            return pressed
        if binding.mode == "toggle":
            if pressed:
                self._set_state(name, not self._state(name))
            return pressed
        self._set_state(name, pressed)
        return True

    def _one_shot(self, name: str, sample: int) -> None:
        s = self.scheduler
        if name in VAMPS:
            source, bars = VAMPS[name]
            s.trigger(Trigger(source, bars=bars, params=self.params.current), now=sample)
        elif name in ("next", "previous"):
            s.next_candidate(1 if name == "next" else -1)
        elif name == "undo":
            s.undo()
        elif name == "redo":
            s.redo()
        elif name == "clear":
            s.clear()
        elif name == "tap":
            if self.clock_in is not None and self.clock_in.following:
                self._note("tap tempo ignored: following the MIDI clock")
            else:
                self.transport.tap(sample)

    def _state(self, name: str) -> bool:
        """An on/off action's state as the performer sees it (including requests the audio
        thread has not applied yet)."""
        core = self.core
        if name == "record":
            if self._rec_deferred is not None:
                return self._rec_deferred
            return self._rec_wanted if self._record_pending() else core.recording
        posted = self._posted.get(name)
        if posted is not None and posted[1] == core.blocks:
            return posted[0]
        return {"play": core.playing, "mute": core.muted, "overdub": core.overdubbing}[name]

    def _set_state(self, name: str, on: bool) -> None:
        if name == "record":
            self._set_record(on)
        else:
            self.core.post(name, on)
            self._posted[name] = (on, self.core.blocks)

    def _record_pending(self) -> bool:
        """A record start or stop is waiting for its boundary."""
        return self.core.now <= self._rec_at

    def _set_record(self, on: bool) -> None:
        """Start/stop recording at the next boundary; a request while a start or stop is still
        waiting for its boundary is done right after that boundary (so two quick presses record
        exactly one quantisation unit)."""
        if self._record_pending():
            self._rec_deferred = on if on != self._rec_wanted else None
            return
        if on == self.core.recording:
            return
        s = self.scheduler
        at = s.record() if on else s.stop_record()
        self._rec_wanted, self._rec_at = on, at + s.latency

    def _set_param(self, binding: ParamBinding, cc_value: int) -> None:
        value, name, p = binding.value(cc_value), binding.param, self.params
        if name in VAMP_PARAMS:
            p.update(**{name: value})
        elif name == "crossfade_ms":
            p.crossfade_ms = value
            self.core.post("crossfade", *fade_curves(value, self.sample_rate))
        else:
            if name == "dry_wet":
                p.dry, p.wet = math.cos(0.5 * math.pi * value), math.sin(0.5 * math.pi * value)
            else:
                setattr(p, name, value)
            self.core.post("gains", p.dry, p.wet)

    # -- pad lights -------------------------------------------------------------------------

    def _vamp_light(self) -> tuple[str | None, int]:
        """(vamp action of the newest job, its velocity)."""
        job = self.scheduler.active
        if job is None:
            return None, 0
        source, bars = job.trigger.source, job.trigger.bars
        action = next((a for a, (src, n) in VAMPS.items() if src == source and (n == bars or source == "loop")), None)
        if job.status == "running":
            return action, PAD_PENDING
        if job.status == "ok" and job.swap_at is not None:
            if self.core.now < job.swap_at:
                return action, PAD_READY
            take = self.scheduler.history.current
            if take is not None and take.trigger == job.id:
                return action, PAD_PLAYING
        return action, 0

    def _feedback(self) -> None:
        out = self.midi_out
        if out is None or not out.connected:
            return
        playing = self.core.playing
        if self.clock_out is not None and playing != self._clock_playing:
            self._clock_playing = playing
            self.clock_out.play(playing)
        vamp_action, vamp_velocity = self._vamp_light()
        for b in self.mapping.bindings:
            if not isinstance(b, ActionBinding) or b.control.kind != "note":
                continue
            if ACTIONS[b.action].stateful:
                velocity = PAD_ON if self._state(b.action) else 0
            else:
                velocity = vamp_velocity if b.action == vamp_action else 0
            key = ((b.control.channel or 1) - 1, b.control.number)
            if self._lit.get(key) != velocity:
                self._lit[key] = velocity
                out.send([0x90 | key[0], key[1], velocity])

    def status(self) -> str:
        """One line for the live view."""
        parts = [f"in {self.midi_in.name or 'waiting for ' + repr(self.midi_in.spec)}" if self.midi_in else "no input"]
        if self.midi_out is not None:
            parts.append(f"out {self.midi_out.name or 'waiting for ' + repr(self.midi_out.spec)}")
        if self.clock_in is not None:
            parts.append(f"clock in {self.clock_in.bpm:.2f} BPM" if self.clock_in.following and self.clock_in.bpm
                         else "clock in: none (internal tempo)")
        if self.clock_out is not None:
            parts.append("clock out")
        if self._learn is not None:
            parts.append(f"LEARN {self._learn}")
        return "MIDI " + ", ".join(parts)


def attach(session, port_spec: str | int | None, map_path: str | Path | None = None,
           out_port_spec: str | int | None = None, clock_in: bool = False, api: str | None = None) -> MidiControl:
    """MIDI for a running live session (rtvamp.live.LiveSession: .engine, .params — a ParamState
    the keyboard's vamps read too). port_spec / out_port_spec: index, name substring or
    "virtual[:NAME]" (None: no port). A port that is missing now is reported in the messages and
    opened when it appears. map_path: the map (the default map if None or not there yet; MIDI
    learn saves to it). clock_in: follow MIDI clock on the input; otherwise, with an output,
    rtvamp sends clock. Raises MappingError for an invalid map, MidiError if no MIDI system works.
    Close the returned control before the session."""
    path = Path(map_path) if map_path else None
    mapping = load_mapping(path) if path is not None and path.exists() else default_mapping()
    midi_in = MidiInput(port_spec, api) if port_spec is not None else None
    midi_out = MidiOutput(out_port_spec, api) if out_port_spec is not None else None
    control = MidiControl(session.engine, mapping, session.params, midi_in, midi_out, clock_in=clock_in,
                          clock_out=midi_out is not None and not clock_in, map_path=path)
    for port in (midi_in, midi_out):
        if port is not None:
            try:
                control._note(f"MIDI {port.kind}: {port.open()}")
            except MidiError as exc:
                control._note(f"{exc}".replace("\n", " ") + " — waiting for it")
    control.start()
    return control
