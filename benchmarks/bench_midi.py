"""Claim: a note-on played into rtvamp over JACK MIDI is acted on within a few milliseconds, and
MidiControl places it on the engine's sample clock to within about one JACK period.

    python benchmarks/bench_midi.py [--events 250]

Setup: a private `jackd -d dummy -r 44100 -p 256` (tests/jack_server.py), the engine running in
real time through the sound-card driver (its backend never vamps: this measures MIDI, not
generation), MidiControl polling from its own thread every `poll` ms. A sender subprocess
(python-rtmidi on JACK, real-time priority where allowed) plays note-ons of the default map's
mute pad at random gaps of 15–45 ms and reports time.perf_counter() at each send.

Per event, in samples at 44.1 kHz:
- send → stamp: until the MIDI system stamped its arrival (rtmidi's delta time on the JACK
  process cycle that delivered it: up to one period, 256 samples);
- send → applied: until MidiControl had done the action (+ the wait for the next poll);
- stamp error: the engine sample MidiControl assigned to the note (what triggers and tap tempo
  use) minus the sample the engine had reached (core.now) when the note was sent, read from a
  trace of core.now every 0.5 ms. JACK stamps MIDI at the cycle that delivers it and core.now
  moves a block at a time, so 0 to ~1 period is the expected spread.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from common import ROOT, print_table, write_results

sys.path.insert(0, str(ROOT / "tests"))
from jack_server import jack_dummy

SR = 44100
PERIOD = 256
SENDER = "rtvamp-bench-sender"
MUTE_PAD = 48

SENDER_SCRIPT = r"""
import json, os, random, sys, time, rtmidi
try:
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(70))
except (AttributeError, PermissionError):
    pass
out = rtmidi.MidiOut(rtmidi.API_UNIX_JACK, name=sys.argv[1])
out.open_virtual_port("out")
print("ready", flush=True)
n, note = json.loads(sys.stdin.readline())
random.seed(0)
sent = []
for _ in range(n):
    time.sleep(random.uniform(0.015, 0.045))
    sent.append(time.perf_counter())
    out.send_message([0x90, note, 100])
time.sleep(0.2)
print(json.dumps(sent), flush=True)
"""


class NoVamps:
    """A backend that never vamps (this benchmark measures MIDI, not generation)."""

    def submit(self, *args, **kwargs) -> int:
        return 0

    def cancel(self, job_id: int) -> None:
        pass

    def events(self, timeout_s: float = 0.0) -> list:
        time.sleep(timeout_s)
        return []

    def close(self) -> None:
        pass


def measure(poll_ms: float, events: int) -> dict[str, np.ndarray]:
    from rtvamp.engine.core import CoreConfig
    from rtvamp.engine.engine import Engine, EngineConfig
    from rtvamp.io.audio import SoundCardDriver
    from rtvamp.midi import MidiControl, MidiInput

    sender = subprocess.Popen([sys.executable, "-u", "-c", SENDER_SCRIPT, SENDER], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert sender.stdout.readline().strip() == "ready"
    engine = Engine(NoVamps(), EngineConfig(core=CoreConfig(sample_rate=SR)))
    driver = SoundCardDriver(engine, SR, PERIOD, 2, input_device="system, jack", output_device="system, jack")
    driver.start()
    midi_in = MidiInput(SENDER, api="jack", client_name="rtvamp-bench")
    midi_in.open()
    control = MidiControl(engine, midi_in=midi_in, poll_s=poll_ms / 1000)
    control.start()
    trace: list[tuple[float, int]] = []
    tracing = threading.Event()

    def record_engine_clock() -> None:
        while not tracing.is_set():
            trace.append((time.perf_counter(), engine.core.now))
            time.sleep(0.0005)

    tracer = threading.Thread(target=record_engine_clock, daemon=True)
    try:
        time.sleep(0.5)  # the time map settles
        tracer.start()
        sender.stdin.write(json.dumps([events, MUTE_PAD]) + "\n")
        sender.stdin.flush()
        sent = np.array(json.loads(sender.stdout.readline()))
        deadline = time.monotonic() + 5
        while len(applied := [a for a in control.applied if a.what == "mute"]) < len(sent):
            assert time.monotonic() < deadline, f"{len(applied)} of {len(sent)} notes applied"
            time.sleep(0.01)
        tracing.set()
        tracer.join()
        stamped_s = np.array([a.stamped_s for a in applied])
        done = np.array([a.applied_s for a in applied])
        stamped = np.array([a.sample for a in applied], np.float64)
        trace_perf, trace_now = np.array(trace).T
        at_send = trace_now[np.searchsorted(trace_perf, sent, side="right") - 1]
        return {"send → stamp": (stamped_s - sent) * SR, "send → applied": (done - sent) * SR,
                "stamp error": stamped - at_send}
    finally:
        tracing.set()
        control.close()
        driver.stop()
        engine.close()
        sender.wait(timeout=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=250, help="note-ons per configuration (≥ 200)")
    args = parser.parse_args()
    rows = []
    with jack_dummy(SR, PERIOD):
        for poll_ms in (5.0, 1.0):
            for stage, samples in measure(poll_ms, args.events).items():
                rows.append({"poll ms": poll_ms, "measure": stage, "events": len(samples),
                             "p50 samples": float(np.percentile(samples, 50)),
                             "p99 samples": float(np.percentile(samples, 99)),
                             "max samples": float(samples[np.argmax(np.abs(samples))]),
                             "p50 ms": float(np.percentile(samples, 50)) / SR * 1000,
                             "p99 ms": float(np.percentile(samples, 99)) / SR * 1000})
    print_table(f"MIDI event → action over JACK MIDI (jackd dummy, {SR} Hz, {PERIOD}-frame period)", rows)
    path = write_results("bench_midi", rows, {"sample_rate": SR, "jack_period": PERIOD})
    print(Path(path).relative_to(ROOT))


if __name__ == "__main__":
    main()
