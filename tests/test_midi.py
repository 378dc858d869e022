"""MIDI control over real ports: a private `jackd -d dummy` and python-rtmidi's JACK MIDI API.

A sender subprocess (python-rtmidi on JACK, a virtual output port) plays notes, CCs, clock and
transport messages into rtvamp's MIDI input, as a controller or drum machine would.
- Vamping (pads land on the quantised frames, pad lights): the real engine and worker, driven
  sample-exactly by the file driver; MidiControl is polled from the render's actions.
- Mapping, learn, clock and ports: an engine whose backend never vamps (`NoVamps`) — these tests
  are about MIDI mapping and timing, not vamping; clock tests run the engine in real time on the
  JACK server through the sound-card driver, so the sample clock is JACK's.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

rtmidi = pytest.importorskip("rtmidi")
if rtmidi.API_UNIX_JACK not in rtmidi.get_compiled_api():
    pytest.skip("this python-rtmidi has no JACK MIDI API", allow_module_level=True)

from rtvamp.engine.backend import LocalWorker  # noqa: E402
from rtvamp.engine.core import CoreConfig  # noqa: E402
from rtvamp.engine.engine import Engine, EngineConfig  # noqa: E402
from rtvamp.engine.scheduler import VampParams  # noqa: E402
from rtvamp.io.file_driver import render  # noqa: E402
from rtvamp.midi import (MappingError, MidiControl, MidiError, MidiInput, MidiOutput, ParamState,  # noqa: E402
                         default_mapping, list_ports, load_mapping, parse_mapping)
from rtvamp.midi.clock import PPQN  # noqa: E402
from rtvamp.synth import groove  # noqa: E402

from conftest import SharedBackend  # noqa: E402
from jack_server import jack_dummy  # noqa: E402

SR = 44100
BAR = 2 * SR  # 120 BPM, 4/4
SENDER = "rtvamp-test-sender"
_clients = itertools.count()

SENDER_SCRIPT = r"""
import json, os, sys, threading, time, rtmidi
try:  # a hardware master keeps time whatever the load: real-time priority where allowed
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(70))
except (AttributeError, PermissionError):
    pass
out = rtmidi.MidiOut(rtmidi.API_UNIX_JACK, name=sys.argv[1])
out.open_virtual_port("out")
lock = threading.Lock()
state = {"bpm": 0.0, "next": 0.0, "before_tick": []}

def ticker():  # 24 PPQN clock, each tick sent at its perf_counter time
    while True:
        with lock:
            bpm, due = state["bpm"], state["next"]
            now = time.perf_counter()
            if bpm > 0 and now >= due:
                for message in state["before_tick"]:  # Start/Continue go just before a tick
                    out.send_message(message)
                state["before_tick"] = []
                out.send_message([0xF8])
                state["next"] = due + 60.0 / (24 * bpm)  # late ticks catch up, none is dropped
                continue
        time.sleep(min(max(due - now, 0.0), 0.002) if bpm > 0 else 0.002)

threading.Thread(target=ticker, daemon=True).start()
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    sent = []
    with lock:
        if "clock" in cmd:
            if state["bpm"] <= 0:
                state["next"] = time.perf_counter()
            state["bpm"] = cmd["clock"]
        for message in cmd.get("send", []):
            if message[0] in (0xFA, 0xFB) and state["bpm"] > 0:
                state["before_tick"].append(message)
            else:
                sent.append(time.perf_counter())
                out.send_message(message)
    print(json.dumps({"sent": sent}), flush=True)
"""


class Sender:
    """The sender subprocess: a virtual JACK MIDI output named NAME:out."""

    def __init__(self, name: str = SENDER) -> None:
        self.name = name
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-u", "-c", SENDER_SCRIPT, self.name], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def command(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def send(self, *messages: list[int]) -> list[float]:
        """Send now; returns the perf_counter times of the sends."""
        return self.command(send=list(messages))["sent"]

    def clock(self, bpm: float) -> None:
        """Tick at bpm from now on (0: stop ticking)."""
        self.command(clock=bpm)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.proc = None


@pytest.fixture(scope="module")
def jack():
    with jack_dummy(SR, 256) as server:
        yield server


@pytest.fixture(scope="module")
def sender(jack):
    s = Sender()
    s.start()
    yield s
    if s.proc is not None:
        s.stop()


@pytest.fixture(scope="module")
def worker():
    with LocalWorker(max_batch=2) as w:
        yield w


class NoVamps:
    """A backend that never vamps (jobs stay queued): for tests about MIDI mapping, not vamping."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)

    def submit(self, *args, **kwargs) -> int:
        return next(self._ids)

    def cancel(self, job_id: int) -> None:
        pass

    def events(self, timeout_s: float = 0.0) -> list:
        time.sleep(timeout_s)
        return []

    def close(self) -> None:
        pass


def make_engine(backend, threaded: bool = False) -> Engine:
    return Engine(SharedBackend(backend), EngineConfig(core=CoreConfig(crossfade_ms=10), deadline_mode=False), threaded=threaded)


def midi_in(spec: str = SENDER) -> MidiInput:
    port = MidiInput(spec, api="jack", client_name=f"rtvamp-test-{next(_clients)}")
    if not spec.startswith("virtual"):
        port.open()
    return port


def wait_for(condition, timeout_s: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def play(control: MidiControl, sender: Sender, *messages: list[int], now: int | None = None) -> None:
    """Send messages from the sender, wait until they reached rtvamp's input, poll once.

    JACK drops what a client writes in a cycle it did not finish in time ("client was not
    finished" xruns): on this shared 2-core machine other test runs' real-time JACK servers
    sometimes starve ours. Delivery normally takes < 10 ms; what has not arrived after 1 s was
    dropped by JACK, and is sent again (a retry that masks nothing in rtvamp: each message is
    applied once, after its delivery)."""
    for _ in range(3):
        queued = control.midi_in.receive()
        sender.send(*messages)
        deadline = time.monotonic() + 1.0
        while control.midi_in.receive() < queued + len(messages) and time.monotonic() < deadline:
            time.sleep(0.002)
        if control.midi_in.receive() >= queued + len(messages):
            break
        assert control.midi_in.receive() == queued, "part of a batch arrived: cannot resend it"
    else:
        pytest.fail("MIDI messages were not delivered")
    control.poll(now)


def send_until_applied(control: MidiControl, sender: Sender, message: list[int], what: str):
    """With MidiControl polling on its own thread: send until an action `what` is applied (see
    `play` on JACK dropping events); returns that Applied."""
    before = sum(a.what == what for a in control.applied)
    for _ in range(3):
        sender.send(message)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            if sum(a.what == what for a in control.applied) > before:
                return next(a for a in reversed(control.applied) if a.what == what)
            time.sleep(0.002)
    pytest.fail(f"{what!r} was never applied")


def note(n: int, velocity: int = 100, channel: int = 1) -> list[int]:
    return [0x90 | channel - 1, n, velocity]


def cc(n: int, value: int, channel: int = 1) -> list[int]:
    return [0xB0 | channel - 1, n, value]


def blocks(engine: Engine, n: int = 1) -> None:
    """Let the audio core apply posted commands (silent input)."""
    x = np.zeros((256, 2), np.float32)
    for _ in range(n):
        engine.process(x, x.copy(), engine.core.now)


# -- ports ---------------------------------------------------------------------------------------


def test_list_open_by_name_or_index_and_unknown_port_lists_ports(sender):
    names = list_ports("input", api="jack")
    assert f"{SENDER}:out" in names
    index = names.index(f"{SENDER}:out")
    for spec in (SENDER.upper(), str(index)):
        port = midi_in(spec)
        assert port.name == f"{SENDER}:out"
        port.close()
    with pytest.raises(MidiError, match="no MIDI input port matches 'no such synth'") as error:
        midi_in("no such synth")
    assert "available MIDI input ports:" in str(error.value) and f"[{index}] {SENDER}:out" in str(error.value)
    with pytest.raises(MidiError, match="no MIDI output port with index 99"):
        MidiOutput("99", api="jack").open()


def test_virtual_input_port_receives_once_connected(sender):
    client = f"rtvamp-test-{next(_clients)}"
    port = MidiInput("virtual:midi-in", api="jack", client_name=client)
    assert port.open() == "midi-in (virtual)"
    subprocess.run(["jack_connect", f"{SENDER}:out", f"{client}:midi-in"], check=True, timeout=5)
    sender.send(note(60))
    wait_for(lambda: port.receive() == 1, what="a note on the virtual port")
    assert port.drain()[0][2] == [0x90, 60, 100]
    port.close()


def test_vanished_port_reconnects_when_it_returns(sender):
    engine = make_engine(NoVamps())
    control = MidiControl(engine, midi_in=midi_in(), port_check_s=0.1)
    control.start()
    try:
        sender.stop()
        wait_for(lambda: any("vanished" in m for m in control.messages), what="the vanished notice")
        assert not control.midi_in.connected and any("vanished" in m for m in engine.scheduler.messages)
        sender.start()
        wait_for(lambda: control.midi_in.connected, what="the reconnect")
        assert f"MIDI input '{SENDER}:out' connected" in control.messages
        send_until_applied(control, sender, note(48), "mute")  # a pad works again
    finally:
        control.close()


def test_cli_ports_monitor_learn(sender, tmp_path, capsys):
    import argparse

    from rtvamp.midi.cli import register_cli

    parser = argparse.ArgumentParser(prog="rtvamp")
    register_cli(parser.add_subparsers(dest="command", required=True))

    def run(*argv: str) -> threading.Thread:
        args = parser.parse_args(["midi", *argv, "--api", "jack"])
        thread = threading.Thread(target=args.func, args=(args,))
        thread.start()
        return thread

    run("ports").join()
    assert f"{SENDER}:out" in capsys.readouterr().err
    monitor = run("monitor", "--port", SENDER, "--duration", "1.0")
    while monitor.is_alive():
        sender.send(note(60), [0xF2, 8, 0])
        time.sleep(0.1)
    out = capsys.readouterr().out
    assert f"# listening on {SENDER}:out" in out and "note-on ch 1 note 60 vel 100" in out
    assert "song-position 8 sixteenths" in out
    path = tmp_path / "learned.toml"
    learn = run("learn", "dry_wet", "--map", str(path), "--port", SENDER, "--timeout", "5")
    while learn.is_alive():
        sender.send(cc(22, 10))
        time.sleep(0.05)
    assert capsys.readouterr().out.strip() == str(path)
    assert load_mapping(path).lookup("cc", 22, 1).param == "dry_wet"


def test_attach_reports_a_missing_port_and_connects_when_it_appears(jack, tmp_path):
    from types import SimpleNamespace

    from rtvamp.midi import attach

    engine = make_engine(NoVamps())
    session = SimpleNamespace(engine=engine, params=ParamState())  # what attach uses of a LiveSession
    late = Sender("rtvamp-test-late")
    control = attach(session, "test-late", tmp_path / "map.toml", api="jack")
    try:
        assert any("no MIDI input port matches 'test-late'" in m and "waiting for it" in m
                   for m in engine.scheduler.messages)
        late.start()
        wait_for(lambda: control.midi_in.connected, what="the port to appear")
        send_until_applied(control, late, note(48), "mute")
        assert "MIDI in rtvamp-test-late:out" in control.status()
    finally:
        control.close()
        late.stop()


# -- the map -------------------------------------------------------------------------------------


def test_map_errors_name_the_line_and_never_crash(tmp_path):
    with pytest.raises(MappingError, match=r"x\.toml: invalid TOML: .*line 2"):
        parse_mapping('channel = "any"\n[[note]\nnote = 1\n', "x.toml")
    bad = '\n'.join(['channel = "any"', "", "[[note]]", "note = 36", 'action = "vamp_1"', "",
                     "[[cc]]", "cc = 70", 'param = "temperature"', "min = 0", 'scale = "log"'])
    with pytest.raises(MappingError, match=r"x\.toml, line 10: \[\[cc\]\] #1, key 'min': must be a number within "
                                           r"0\.01–10"):
        parse_mapping(bad, "x.toml")
    with pytest.raises(MappingError, match=r"line 5: \[\[note\]\] #1, key 'action': unknown action 'vamp_3'"):
        parse_mapping(bad.replace("vamp_1", "vamp_3"), "x.toml")
    with pytest.raises(MappingError, match=r"line 5: \[\[note\]\] #2, key 'note': note 36 \(channel 3\) is already"):
        parse_mapping('[[note]]\nnote = 36\naction = "undo"\n[[note]]\nnote = 36\naction = "redo"\nchannel = 3\n')
    with pytest.raises(MappingError, match=r"line 4: \[\[note\]\] #1, key 'mode': 'undo' is a one-shot"):
        parse_mapping('channel = 2\n[[note]]\nnote = 36\nmode = "toggle"\naction = "undo"\n')
    with pytest.raises(MappingError, match="cannot read the MIDI map"):
        load_mapping(tmp_path / "missing.toml")
    m = default_mapping()
    assert len([b for b in m.bindings if b.control.kind == "note"]) == 16
    assert len([b for b in m.bindings if b.control.kind == "cc"]) == 8
    assert parse_mapping(m.to_toml()).bindings == m.bindings  # the writer round-trips


def test_cc_values_map_to_parameters_and_gains(sender):
    text = default_mapping().to_toml() + '\n'.join([
        "", "[[cc]]", "cc = 20", 'param = "temperature"', "min = 0.1", "max = 1.0", "channel = 2",
        "", "[[cc]]", "cc = 21", 'action = "mute"', 'mode = "momentary"'])
    engine = make_engine(NoVamps())
    params = ParamState(VampParams(steps="fast"))
    control = MidiControl(engine, parse_mapping(text), params, midi_in=midi_in())
    try:
        play(control, sender, cc(70, 0))
        assert params.current.temperature == pytest.approx(0.5)
        play(control, sender, cc(70, 64), cc(73, 64), cc(71, 100), cc(72, 127), cc(74, 32))
        p = params.current
        assert p.temperature == pytest.approx(0.5 * 4 ** (64 / 127))             # log
        assert p.steps == 12 and isinstance(p.steps, int)                        # log, rounded: 4·9^(64/127) = 12.1
        assert p.periodic_prompt == 13 and p.upper_codebook_mask == 8             # linear, rounded: 12.6 → 13
        assert p.mask_density == pytest.approx(32 / 127)
        play(control, sender, cc(20, 127))                                        # channel 2 only: ignored
        assert params.current.temperature == pytest.approx(0.5 * 4 ** (64 / 127))
        play(control, sender, cc(20, 127, channel=2))
        assert params.current.temperature == pytest.approx(1.0)
        play(control, sender, cc(75, 127), cc(76, 0), cc(77, 127))
        blocks(engine)
        assert (engine.core.dry_gain, engine.core.wet_gain) == (1.0, 0.0) and params.crossfade_ms == pytest.approx(50)
        play(control, sender, cc(21, 100))                                       # a CC button: press
        blocks(engine)
        assert engine.core.muted
        play(control, sender, cc(21, 110))                                       # still pressed: no edge
        play(control, sender, cc(21, 0))
        blocks(engine)
        assert not engine.core.muted
        assert [a.what for a in control.applied][-2:] == ["mute", "mute off"]
    finally:
        control.close()


def test_toggle_and_momentary_pads(sender):
    engine = make_engine(NoVamps())
    control = MidiControl(engine, midi_in=midi_in())
    try:
        play(control, sender, note(48))                   # mute, toggle
        play(control, sender, note(48, 0))                # its note-off does nothing
        blocks(engine)
        assert engine.core.muted
        play(control, sender, note(48), [0x80, 48, 0])
        blocks(engine)
        assert not engine.core.muted
        play(control, sender, note(47))                   # overdub, momentary: while held
        blocks(engine)
        assert engine.core.overdubbing
        play(control, sender, note(47, 0))
        blocks(engine)
        assert not engine.core.overdubbing
        play(control, sender, note(46))                   # play/stop toggle, twice before a block: back on
        play(control, sender, note(46))
        blocks(engine)
        assert engine.core.playing
    finally:
        control.close()


def test_learn_binds_replaces_and_saves(sender, tmp_path):
    path = tmp_path / "map.toml"
    engine = make_engine(NoVamps())
    control = MidiControl(engine, midi_in=midi_in(), map_path=path)
    try:
        control.learn("undo")
        play(control, sender, note(60))
        assert control.learned.action == "undo" and str(control.learned.control) == "note 60 (any channel)"
        saved = load_mapping(path)
        assert saved.lookup("note", 60, 5).action == "undo"
        control.learn("mask_density")
        play(control, sender, note(61))                   # a parameter needs a CC: still armed
        assert any("needs a CC" in m for m in control.messages) and control.learned.action == "undo"
        play(control, sender, cc(70, 5))                   # CC 70 was temperature in the default map
        saved = load_mapping(path)
        assert saved.lookup("cc", 70, 1).param == "mask_density"
        assert not any(getattr(b, "param", None) == "temperature" for b in saved.bindings)
        play(control, sender, cc(70, 127))
        assert control.params.current.mask_density == 1.0
        with pytest.raises(MappingError, match="unknown learn target 'louder'"):
            control.learn("louder")
    finally:
        control.close()


# -- vamping through pads (real worker, sample-exact file driver) ---------------------------------


def test_pads_trigger_on_the_quantised_frames_and_light_up(sender, worker):
    engine = make_engine(worker)
    s = engine.scheduler
    pads = rtmidi.MidiIn(rtmidi.API_UNIX_JACK, name="rtvamp-test-pads")  # read from its queue: a
    pads.open_virtual_port("in")                                         # Python callback would run
    lights: list[list[int]] = []                                         # on JACK's thread
    control = MidiControl(engine, params=ParamState(VampParams(steps="fast", variations=2)), midi_in=midi_in(),
                          midi_out=MidiOutput("rtvamp-test-pads", api="jack"))
    control.midi_out.open()
    muted = []

    def at(sample: int, *messages: list[int], then=None):
        def action(e: Engine):
            play(control, sender, *messages, now=e.core.now)
            if then is not None:
                then()
        return sample, action

    actions = [
        at(20_000, note(45)),                              # record: from bar 1 …
        at(BAR + 20_000, note(45), note(45, 0)),           # … to bar 2
        at(3 * BAR + 20_000, cc(70, 64), cc(73, 0), note(37), note(37, 0)),  # temperature ≈ 1, 4 steps; vamp_2
        at(4 * BAR - 300),                                 # the result is in: waiting for bar 4
        at(4 * BAR + 20_000),
        at(5 * BAR + 20_000, note(42)),                    # next candidate at bar 6
        at(6 * BAR + 20_000, note(51)),                    # hold to mute …
        at(6 * BAR + 25_000, then=lambda: muted.append(engine.core.muted)),
        at(6 * BAR + 30_000, note(51, 0)),                 # … released
        at(6 * BAR + 35_000, then=lambda: muted.append(engine.core.muted)),
        at(7 * BAR + 20_000, note(43)),                    # undo at bar 8
    ]
    try:
        x = np.repeat(groove(bars=9, bpm=120, seed=3)[:, None], 2, axis=1)
        render(engine, x, actions=actions)
        control.poll(engine.core.now)
        recorded = next(e for e in s.events_log if e[0] == "recorded")
        assert (recorded[1], recorded[2]["start"]) == (2 * BAR, BAR)
        job = s.jobs[1]
        assert job.window == (BAR, 3 * BAR) and job.target == job.swap_at == 4 * BAR
        assert job.trigger.params.temperature == pytest.approx(0.5 * 4 ** (64 / 127)) and job.trigger.params.steps == 4
        assert [e[1] for e in s.events_log if e[0] == "swapped"] == [4 * BAR, 6 * BAR, 8 * BAR]
        assert s.history.current.source == "recorded"
        assert muted == [True, False]
        applied = {a.what: a.sample for a in control.applied}
        assert 3 * BAR < applied["vamp_2"] <= 3 * BAR + 20_000  # the note's own sample (≤ the poll's)
        def pad_37_off() -> bool:
            while (item := pads.get_message()) is not None:
                lights.append(item[0])
            return [m[2] for m in lights if m[1] == 37][-1:] == [0]

        wait_for(pad_37_off, what="pad lights")
        assert [m[2] for m in lights if m[1] == 37] == [0, 32, 64, 127, 0]   # pending, ready, playing, undone
        assert [m[2] for m in lights if m[1] == 45] == [127, 0]  # record requested … stopped
    finally:
        control.close()
        pads.delete()


# -- MIDI clock (real-time engine on the JACK server) --------------------------------------------


def realtime_engine():
    from rtvamp.io.audio import SoundCardDriver

    engine = make_engine(NoVamps(), threaded=True)
    driver = SoundCardDriver(engine, SR, 256, 2, input_device="system, jack", output_device="system, jack")
    driver.start()
    return engine, driver


def test_clock_in_tempo_transport_and_dropout(sender):
    engine, driver = realtime_engine()
    control = MidiControl(engine, midi_in=midi_in(), clock_in=True)
    control.start()
    t = engine.transport
    try:
        for bpm in (90, 120, 174):
            sender.clock(bpm)
            time.sleep(2 * 60 / bpm)                       # 2 beats after the change: following
            assert t.bpm == pytest.approx(bpm, abs=1.0)
            time.sleep(6 * 60 / bpm)                       # 2 bars: settled
            assert control.clock_in.bpm == pytest.approx(bpm, abs=0.5)
            assert t.bpm == pytest.approx(bpm, abs=0.5)
        assert engine.scheduler.tempo_locked and "MIDI clock: following the master's tempo" in control.messages

        def applied(message: list[int], what: str):
            return send_until_applied(control, sender, message, what)

        start = applied([0xFA], "clock start").sample      # Start: beat 0 at its sample, playing
        assert abs(start - engine.core.now) < 0.05 * SR
        # (the clock's own phase follows within a tick: exact up to the fit, 0.01 beat here)
        assert float(t.beat_at(start)) == pytest.approx(0, abs=0.01) and engine.core.playing
        time.sleep(1.0)                                    # ~69 ticks: the grid follows the ticks
        wait_for(lambda: control.clock_in.position > 2)
        now = control.time_map.sample_of_perf(time.perf_counter())
        assert float(t.beat_at(round(now))) == pytest.approx(float(control.clock_in.position), abs=0.1)
        applied([0xFC], "clock stop")                      # Stop
        time.sleep(0.05)
        assert not engine.core.playing
        spp = applied([0xF2, 16, 0], "song position").sample  # 16 sixteenths = beat 4
        assert float(t.beat_at(spp)) == pytest.approx(4, abs=0.01) and t.position(spp + 100)[0] == 1
        cont = applied([0xFB], "clock continue").sample    # Continue from beat 4
        assert float(t.beat_at(cont)) == pytest.approx(4, abs=0.01)
        time.sleep(0.05)
        assert engine.core.playing
        sender.clock(0)                                    # dropout: internal tempo, the last one
        wait_for(lambda: any("MIDI clock lost" in m for m in control.messages), timeout_s=2, what="dropout")
        assert not control.clock_in.following and t.bpm == pytest.approx(174, abs=0.5)
        lost = next(m for m in engine.scheduler.messages if m.startswith("MIDI clock lost: internal tempo "))
        assert float(lost.split()[-2]) == pytest.approx(174, abs=0.5)
    finally:
        sender.clock(0)
        control.close()
        driver.stop()
        engine.close()


def test_clock_out_follows_the_transport(jack):
    engine, driver = realtime_engine()
    receiver = rtmidi.MidiIn(rtmidi.API_UNIX_JACK, name="rtvamp-test-clock")
    receiver.ignore_types(timing=False)
    receiver.open_virtual_port("in")
    got: list[tuple[int, int]] = []  # (status, the engine's sample when it arrived, ± 1 ms)
    reading = threading.Event()

    def read() -> None:  # from rtmidi's queue, every millisecond (no Python on JACK's thread)
        while not reading.is_set():
            while (item := receiver.get_message()) is not None:
                got.append((item[0][0], engine.core.now))
            time.sleep(0.001)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    control = MidiControl(engine, midi_out=MidiOutput("rtvamp-test-clock", api="jack"), clock_out=True)
    control.midi_out.open()
    control.start()
    try:
        time.sleep(3.0)
        # tempo on the engine's sample clock (which JACK's dummy driver may run slower than
        # the wall clock under load): samples per tick. A loaded machine disturbs single ticks
        # both ways (a late reader thread; a stalled dummy driver that the TimeMap catches up
        # with over a fraction of a second), so the slope is the median over tick pairs at
        # least a second apart (Theil–Sen), which those transients cannot move
        ticks = np.array([sample for status, sample in got if status == 0xF8], np.float64)
        assert len(ticks) > 100
        first, last = np.triu_indices(len(ticks), k=2 * PPQN)
        slope = float(np.median((ticks[last] - ticks[first]) / (last - first)))
        assert 60 * SR / (PPQN * slope) == pytest.approx(120, abs=0.5)
        statuses = [status for status, _ in got if status >= 0xF8]  # (pad lights are notes)
        first = statuses.index(0xFA)                       # Start at the first bar line, then its tick
        assert statuses[first + 1] == 0xF8 and first <= PPQN * engine.transport.beats_per_bar
        start_sample = next(sample for status, sample in got if status == 0xFA)
        assert abs(start_sample - engine.transport.bar_sample(1)) < 0.03 * SR
        engine.core.post("play", False)
        wait_for(lambda: any(status == 0xFC for status, _ in got), what="Stop")
    finally:
        reading.set()
        reader.join()
        control.close()
        receiver.delete()
        driver.stop()
        engine.close()
