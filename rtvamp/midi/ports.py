"""MIDI ports through python-rtmidi: listing, opening by name or index, virtual ports, reconnect.

A port spec is an index (int or digits), a case-insensitive substring of the port name (a name
equal to the spec wins over names that contain it), or "virtual[:NAME]" for a port of our own
that other programs connect to. An unknown or ambiguous spec raises `MidiError` listing the ports.

The MIDI API is rtmidi's default (ALSA on Linux) unless `api` or RTVAMP_MIDI_API names one
("alsa", "jack", "coremidi", "winmm"); an API whose client cannot start (no ALSA sequencer, no
JACK server) is skipped for the next compiled one.

Input uses no Python callback: python-rtmidi would call it on the MIDI system's thread — with
JACK, the real-time process thread — where waiting for the GIL stalls the JACK graph and loses
events (measured here: 1–2 of 400 notes lost while two Python threads were busy). rtmidi's own
C++ queue, filled by its thread with the API's delta times, is drained from the control thread
instead (`MidiInput.drain`), so nothing in rtvamp's Python ever runs on a MIDI or audio thread.
`check()` — called about once a second from the control thread — notices a vanished port and
reopens it when it returns.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from time import perf_counter
from types import ModuleType
from typing import Literal

PortKind = Literal["input", "output"]
Received = tuple[float, float, list[int]]
"""(time.perf_counter() seconds when taken from rtmidi's queue, MIDI time seconds, message bytes);
MIDI time is the running sum of rtmidi's delta times (the MIDI API's own timestamps)"""

API_ENV = "RTVAMP_MIDI_API"
QUEUE_SIZE = 4096
"""messages rtmidi keeps for us between drains (clock at 300 BPM: 120 a second)"""
CLIENT_NAME = "rtvamp"
VIRTUAL = "virtual"


class MidiError(RuntimeError):
    """A MIDI port problem whose message is the whole story (lists the available ports)."""


def _rtmidi() -> ModuleType:
    try:
        import rtmidi
    except ImportError as exc:  # not installed, or its ALSA library is missing
        raise MidiError(f"MIDI needs python-rtmidi and libasound2 (pip install python-rtmidi; "
                        f"apt-get install libasound2): {exc}") from None
    return rtmidi


def _apis(api: str | None) -> list[int]:
    """rtmidi API ids to try, in order."""
    rtmidi = _rtmidi()
    compiled = list(rtmidi.get_compiled_api())
    name = api or os.environ.get(API_ENV)
    if not name:  # compiled in rtmidi's order of preference (Linux: ALSA, then JACK)
        return [a for a in compiled if a != rtmidi.API_RTMIDI_DUMMY]
    wanted = rtmidi.get_compiled_api_by_name(name.strip().lower())
    if wanted == rtmidi.API_UNSPECIFIED:
        names = ", ".join(rtmidi.get_api_name(a) for a in compiled)
        raise MidiError(f"unknown or not compiled MIDI API {name!r}; this python-rtmidi has: {names}")
    return [wanted]


def _client(kind: PortKind, api: str | None, name: str = CLIENT_NAME):
    """An rtmidi MidiIn/MidiOut on the first API of `_apis(api)` that starts."""
    rtmidi = _rtmidi()
    errors = []
    for api_id in _apis(api):
        try:
            if kind == "input":
                return rtmidi.MidiIn(api_id, name=name, queue_size_limit=QUEUE_SIZE)
            return rtmidi.MidiOut(api_id, name=name)
        except rtmidi.RtMidiError as exc:  # e.g. no ALSA sequencer, no JACK server
            errors.append(f"{rtmidi.get_api_display_name(api_id)}: {exc}")
    raise MidiError("no MIDI system could start (" + "; ".join(errors) + ")")


def list_ports(kind: PortKind, api: str | None = None) -> list[str]:
    """Names of the ports a MIDI `kind` can connect to: for "input" the sources (other programs'
    outputs), for "output" the destinations."""
    client = _client(kind, api, CLIENT_NAME + "-list")
    try:
        return list(client.get_ports())
    finally:
        client.delete()


def _port_error(message: str, kind: PortKind, names: list[str]) -> MidiError:
    listing = "\n".join(f"  [{i}] {n}" for i, n in enumerate(names)) or "  (none)"
    return MidiError(f"{message}\navailable MIDI {kind} ports:\n{listing}")


def find_port(spec: str | int, names: list[str], kind: PortKind) -> int:
    """Index into `names` of the port `spec` names (index, or case-insensitive substring)."""
    if isinstance(spec, int) or spec.strip().isdigit():
        index = int(spec)
        if not 0 <= index < len(names):
            raise _port_error(f"no MIDI {kind} port with index {index}", kind, names)
        return index
    query = spec.strip().lower()
    matches = [i for i, n in enumerate(names) if n.lower() == query] or \
              [i for i, n in enumerate(names) if query in n.lower()]
    if not matches:
        raise _port_error(f"no MIDI {kind} port matches {spec!r}", kind, names)
    if len(matches) > 1:
        found = ", ".join(f"[{i}] {names[i]}" for i in matches)
        raise _port_error(f"{spec!r} matches several MIDI {kind} ports: {found}; give an index", kind, names)
    return matches[0]


def virtual_name(spec: str | int | None) -> str | None:
    """"virtual" → "" (our default port name), "virtual:NAME" → NAME, any other spec → None."""
    if not isinstance(spec, str):
        return None
    head, _, name = spec.strip().partition(":")
    return name.strip() if head.lower() == VIRTUAL else None


class MidiPort:
    """One rtmidi port that stays wanted: opened by spec, reopened when it comes back.

    `spec`: see the module docstring. The first successful open pins the full port name, so a
    reconnect finds the same device even if port indices changed. A virtual port never vanishes.
    `client_name` / `port_name`: how our side appears to the MIDI system (e.g. JACK "rtvamp:in").
    """

    def __init__(self, kind: PortKind, spec: str | int, api: str | None = None,
                 client_name: str = CLIENT_NAME, port_name: str | None = None) -> None:
        self.kind = kind
        self.spec = spec
        self._client = _client(kind, api, client_name)
        self._port_name = port_name or ("in" if kind == "input" else "out")
        self._virtual = virtual_name(spec)
        self.name: str | None = None
        """the connected port's full name (None while disconnected)"""
        self._pinned: str | None = None

    @property
    def connected(self) -> bool:
        return self.name is not None

    def open(self) -> str:
        """Open (or create the virtual port); returns its name. Raises MidiError if the spec
        matches no port (or several) or the MIDI system refuses."""
        rtmidi = _rtmidi()
        try:
            if self._virtual is not None:
                name = self._virtual or self._port_name
                self._client.open_virtual_port(name)
                self.name = f"{name} (virtual)"
            else:
                names = list(self._client.get_ports())
                index = names.index(self._pinned) if self._pinned in names else find_port(self.spec, names, self.kind)
                self._client.open_port(index, self._port_name)
                self.name = self._pinned = names[index]
        except rtmidi.RtMidiError as exc:
            raise MidiError(f"cannot open the MIDI {self.kind} {self.spec!r}: {exc}") from None
        return self.name

    def check(self) -> str | None:
        """Notice a vanished port or reopen a returned one (control thread, about once a second).
        Returns a message for the performer when the state changed, else None."""
        if self._virtual is not None:
            return None
        names = list(self._client.get_ports())
        if self.name is not None:
            if self.name in names:
                return None
            self._client.close_port()
            self.name = None
            return f"MIDI {self.kind} {self._pinned!r} vanished; reconnecting when it returns"
        try:
            name = self.open()
        except MidiError:
            return None
        return f"MIDI {self.kind} {name!r} connected"

    def close(self) -> None:
        self._client.close_port()
        self._client.delete()
        self.name = None


class MidiInput(MidiPort):
    """A MIDI input read from the control thread; timing messages (clock, start/stop) are kept,
    sysex and active sensing dropped."""

    def __init__(self, spec: str | int, api: str | None = None, client_name: str = CLIENT_NAME,
                 port_name: str | None = None) -> None:
        super().__init__("input", spec, api, client_name, port_name)
        self.buffer: deque[Received] = deque()
        """messages taken from rtmidi's queue and not drained yet"""
        self._midi_s = 0.0
        self._client.ignore_types(sysex=True, timing=False, active_sense=True)

    def receive(self) -> int:
        """Take what rtmidi queued into `buffer`, stamped (control thread); returns how many
        messages are buffered."""
        get = self._client.get_message
        while (item := get()) is not None:
            message, delta_s = item
            self._midi_s += delta_s
            self.buffer.append((perf_counter(), self._midi_s, message))
        return len(self.buffer)

    def drain(self) -> list[Received]:
        """Everything received since the last drain, oldest first (control thread)."""
        self.receive()
        out = list(self.buffer)
        self.buffer.clear()
        return out


class MidiOutput(MidiPort):
    """A MIDI output; `send` is safe from several control threads (clock out, pad feedback)."""

    def __init__(self, spec: str | int, api: str | None = None, client_name: str = CLIENT_NAME,
                 port_name: str | None = None) -> None:
        super().__init__("output", spec, api, client_name, port_name)
        self._lock = threading.Lock()

    def send(self, message: list[int]) -> None:
        """Send one message now (dropped while the port is disconnected)."""
        with self._lock:
            if self.name is not None:
                self._client.send_message(message)

    def check(self) -> str | None:
        with self._lock:
            return super().check()


STATUS_NAMES = {0x80: "note-off", 0x90: "note-on", 0xA0: "aftertouch", 0xB0: "cc", 0xC0: "program",
                0xD0: "pressure", 0xE0: "pitch-bend"}
SYSTEM_NAMES = {0xF2: "song-position", 0xF8: "clock", 0xFA: "start", 0xFB: "continue", 0xFC: "stop",
                0xFE: "active-sensing", 0xFF: "reset"}


def describe(message: list[int]) -> str:
    """A MIDI message in words, e.g. "note-on ch 1 note 36 vel 100", "cc ch 10 #74 = 64"."""
    if not message:
        return "(empty)"
    status = message[0]
    if status >= 0xF0:
        name = SYSTEM_NAMES.get(status, f"system 0x{status:02X}")
        if status == 0xF2 and len(message) == 3:
            return f"{name} {message[1] | message[2] << 7} sixteenths"
        return name
    kind, channel = status & 0xF0, (status & 0x0F) + 1
    name = STATUS_NAMES.get(kind, f"0x{kind:02X}")
    data = message[1:]
    if kind in (0x80, 0x90) and len(data) == 2:
        return f"{name} ch {channel} note {data[0]} vel {data[1]}"
    if kind == 0xB0 and len(data) == 2:
        return f"{name} ch {channel} #{data[0]} = {data[1]}"
    return f"{name} ch {channel} " + " ".join(str(b) for b in data)
