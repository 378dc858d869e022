"""`rtvamp midi ports | learn | monitor` — registered by rtvamp.cli through `register_cli`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .clock import CLOCK, PPQN
from .mapping import ACTIONS, PARAMS, MappingError, default_mapping, incoming, load_mapping
from .ports import MidiError, MidiInput, describe, list_ports

API_HELP = "MIDI system: alsa, jack, coremidi, winmm (default: rtmidi's, or $RTVAMP_MIDI_API)"
PORT_HELP = 'index or part of the name (see `rtvamp midi ports`), or "virtual[:NAME]" for a port of our own'


def _user_error(exc: Exception):
    from ..cli import UserError

    return UserError(str(exc))


def _open_input(spec: str, api: str | None) -> MidiInput:
    port = MidiInput(spec, api)
    port.open()
    return port


def cmd_ports(args: argparse.Namespace) -> None:
    from rich.table import Table

    from ..cli import console

    try:
        inputs, outputs = list_ports("input", args.api), list_ports("output", args.api)
    except MidiError as exc:
        raise _user_error(exc) from None
    for title, names in (("MIDI inputs (for --port / --midi-in)", inputs), ("MIDI outputs (for --midi-out)", outputs)):
        table = Table(title=title)
        table.add_column("index", justify="right")
        table.add_column("name")
        for i, name in enumerate(names):
            table.add_row(str(i), name)
        console.print(table if names else f"{title}: none")


def cmd_learn(args: argparse.Namespace) -> None:
    from ..cli import console

    if args.target not in ACTIONS and args.target not in PARAMS:
        raise _user_error(MappingError(f"unknown target {args.target!r}; actions: {', '.join(ACTIONS)}; "
                                       f"parameters: {', '.join(PARAMS)}"))
    path = Path(args.map)
    try:
        mapping = load_mapping(path) if path.exists() else default_mapping()
        port = _open_input(args.port, args.api)
    except (MappingError, MidiError) as exc:
        raise _user_error(exc) from None
    kind = "a knob or fader (CC)" if args.target in PARAMS else "a pad, key or button"
    console.print(f"listening on {port.name}: move {kind} for [bold]{args.target}[/] (Ctrl-C to cancel)")
    deadline = time.monotonic() + args.timeout
    try:
        while time.monotonic() < deadline:
            for _, _, message in port.drain():
                event = incoming(message)
                if event is None or not event.learnable:
                    continue
                try:
                    binding = mapping.bind(args.target, event.kind, event.number)
                except MappingError as exc:
                    console.print(f"[yellow]{exc}[/]")
                    continue
                mapping.save(path)
                console.print(f"{binding.control} → {args.target}")
                print(path)
                return
            time.sleep(0.01)
    finally:
        port.close()
    raise _user_error(MidiError(f"nothing received on {port.name} in {args.timeout:g} s"))


def cmd_monitor(args: argparse.Namespace) -> None:
    """Print each message with its MIDI time; clock ticks are summed up once per beat."""
    try:
        port = _open_input(args.port, args.api)
    except MidiError as exc:
        raise _user_error(exc) from None
    print(f"# listening on {port.name} (Ctrl-C to stop)", flush=True)
    end = None if args.duration is None else time.monotonic() + args.duration
    ticks: list[float] = []
    try:
        while end is None or time.monotonic() < end:
            for _, midi_s, message in port.drain():
                if message and message[0] == CLOCK:
                    ticks.append(midi_s)
                    if len(ticks) == PPQN + 1:
                        bpm = 60.0 / (ticks[-1] - ticks[0]) if ticks[-1] > ticks[0] else float("nan")
                        print(f"{midi_s:11.4f}  clock ×{PPQN} ({bpm:.2f} BPM)", flush=True)
                        ticks = ticks[-1:]
                    continue
                print(f"{midi_s:11.4f}  {describe(message)}", flush=True)
            time.sleep(0.005)
    finally:
        port.close()


def register_cli(subparsers) -> None:
    """Add `rtvamp midi …` to rtvamp's argparse subparsers."""
    midi = subparsers.add_parser("midi", help="MIDI: list ports, learn a control, monitor messages")
    sub = midi.add_subparsers(dest="midi_command", required=True)
    ports = sub.add_parser("ports", help="list MIDI input and output ports")
    ports.add_argument("--api", help=API_HELP)
    ports.set_defaults(func=cmd_ports)
    learn = sub.add_parser("learn", help="bind the next note/CC to an action or parameter, save the map")
    learn.add_argument("target", help=f"an action ({', '.join(ACTIONS)}) or a parameter ({', '.join(PARAMS)})")
    learn.add_argument("--map", required=True, help="TOML map file (started from the default map if missing)")
    learn.add_argument("--port", required=True, help=PORT_HELP)
    learn.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for a control")
    learn.add_argument("--api", help=API_HELP)
    learn.set_defaults(func=cmd_learn)
    monitor = sub.add_parser("monitor", help="print incoming MIDI messages, decoded")
    monitor.add_argument("--port", required=True, help=PORT_HELP)
    monitor.add_argument("--duration", type=float, help="stop after this many seconds")
    monitor.add_argument("--api", help=API_HELP)
    monitor.set_defaults(func=cmd_monitor)
