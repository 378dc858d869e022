"""The MIDI map: which note or CC does what, read from TOML and validated with line numbers.

Schema (see default_map.toml, the map for a generic 16-pad / 8-knob controller):

    channel = "any"            # default channel of every binding: 1–16 or "any"

    [clock]                    # MIDI clock input
    follow_start_stop = true   # Start/Continue/Stop also start/stop the loop playback
    dropout_ms = 250           # no tick for this long (or 3 tick intervals): back to internal tempo

    [[note]]                   # a pad: note number → action
    note = 36
    action = "vamp_1"
    mode = "momentary"         # momentary: note-on does it, note-off undoes it where meaningful
                               # (mute, overdub, record, play while held); toggle: each note-on flips
    channel = 10               # optional, overrides the default

    [[cc]]                     # a knob: CC number → parameter, value 0–127 scaled onto [min, max]
    cc = 70
    param = "temperature"
    min = 0.5
    max = 2.0
    scale = "log"              # linear or log; integer parameters are rounded

    [[cc]]                     # a button that sends CCs: value ≥ 64 presses, < 64 releases
    cc = 20
    action = "undo"

A control (note or CC number + channel) has one binding; a target may have several controls.
Errors raise `MappingError` naming the file, line, table and key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

Kind = Literal["note", "cc"]
Mode = Literal["momentary", "toggle"]
Scale = Literal["linear", "log"]
CC_PRESS = 64
"""a CC bound to an action presses at values ≥ 64 and releases below"""


class MappingError(ValueError):
    """An invalid MIDI map; the message names the file, line, table and key."""


@dataclass(frozen=True)
class ActionInfo:
    stateful: bool
    """has an on/off state (toggle and momentary make sense); else a one-shot"""
    help: str


ACTIONS: dict[str, ActionInfo] = {
    "vamp_1": ActionInfo(False, "vamp the last bar of the input"),
    "vamp_2": ActionInfo(False, "vamp the last 2 bars of the input"),
    "vamp_4": ActionInfo(False, "vamp the last 4 bars of the input"),
    "vamp_loop": ActionInfo(False, "vamp the current loop"),
    "vamp_feedback": ActionInfo(False, "vamp the last 2 bars of the output (feedback)"),
    "next": ActionInfo(False, "next candidate of the last vamp"),
    "previous": ActionInfo(False, "previous candidate of the last vamp"),
    "undo": ActionInfo(False, "back to the previous loop"),
    "redo": ActionInfo(False, "forward again after undo"),
    "clear": ActionInfo(False, "stop the loop and forget the history"),
    "tap": ActionInfo(False, "tap tempo"),
    "record": ActionInfo(True, "record a loop from the next bar / stop at the next bar"),
    "play": ActionInfo(True, "play / stop the loop"),
    "overdub": ActionInfo(True, "overdub the input onto the loop"),
    "mute": ActionInfo(True, "mute the loop"),
}
DEFAULT_MODE: dict[bool, Mode] = {True: "toggle", False: "momentary"}


@dataclass(frozen=True)
class ParamInfo:
    integer: bool
    bounds: tuple[float, float]
    """the values a map may ask for"""
    default_range: tuple[float, float]
    default_scale: Scale
    help: str


PARAMS: dict[str, ParamInfo] = {
    "temperature": ParamInfo(False, (0.01, 10.0), (0.5, 2.0), "log", "sampling temperature"),
    "periodic_prompt": ParamInfo(True, (0, 64), (0, 16), "linear", "keep every Nth token frame (0: none)"),
    "upper_codebook_mask": ParamInfo(True, (0, 14), (1, 8), "linear", "codebooks kept below this one"),
    "steps": ParamInfo(True, (1, 128), (4, 36), "log", "coarse sampling steps"),
    "mask_density": ParamInfo(False, (0.0, 1.0), (0.0, 1.0), "linear", "share of tokens regenerated"),
    "dry": ParamInfo(False, (0.0, 2.0), (0.0, 1.0), "linear", "input monitoring level"),
    "wet": ParamInfo(False, (0.0, 2.0), (0.0, 1.0), "linear", "loop level"),
    "dry_wet": ParamInfo(False, (0.0, 1.0), (0.0, 1.0), "linear", "equal-power mix: 0 dry only, 1 loop only"),
    "crossfade_ms": ParamInfo(False, (5.0, 50.0), (5.0, 50.0), "log", "swap crossfade (next session start)"),
}


@dataclass(frozen=True)
class Control:
    """A physical control: a note or CC number (0–127) on a channel (1–16, None = any)."""

    kind: Kind
    number: int
    channel: int | None = None

    def matches(self, kind: Kind, number: int, channel: int) -> bool:
        return kind == self.kind and number == self.number and self.channel in (None, channel)

    def overlaps(self, other: Control) -> bool:
        same = (self.kind, self.number) == (other.kind, other.number)
        return same and (self.channel == other.channel or None in (self.channel, other.channel))

    def __str__(self) -> str:
        return f"{self.kind} {self.number} ({'any channel' if self.channel is None else f'channel {self.channel}'})"


@dataclass(frozen=True)
class ActionBinding:
    control: Control
    action: str
    mode: Mode


@dataclass(frozen=True)
class ParamBinding:
    control: Control
    param: str
    low: float
    high: float
    scale: Scale

    def value(self, cc_value: int) -> float | int:
        """CC value 0–127 → the parameter value (low at 0, high at 127; ints rounded)."""
        x = min(max(cc_value, 0), 127) / 127
        if self.scale == "log":
            v = self.low * (self.high / self.low) ** x
        else:
            v = self.low + (self.high - self.low) * x
        return round(v) if PARAMS[self.param].integer else v


Binding = ActionBinding | ParamBinding


@dataclass(frozen=True)
class Incoming:
    """A note or CC as the map sees it: note-on (value = velocity > 0), note-off (value 0; a
    note-on with velocity 0 is a note-off), or CC (value 0–127)."""

    kind: Kind
    number: int
    channel: int
    """1–16"""
    value: int

    @property
    def pressed(self) -> bool:
        """note-on, or a CC at ≥ 64 (a button)"""
        return self.value >= (1 if self.kind == "note" else CC_PRESS)

    @property
    def learnable(self) -> bool:
        """what MIDI learn takes: a note-on or any CC (a knob moved)"""
        return self.kind == "cc" or self.value > 0


def incoming(message: list[int]) -> Incoming | None:
    """Decode a note-on/off or CC message (None for anything else)."""
    if len(message) != 3 or message[0] >= 0xF0:
        return None
    kind, channel = message[0] & 0xF0, (message[0] & 0x0F) + 1
    if kind == 0x90:
        return Incoming("note", message[1], channel, message[2])
    if kind == 0x80:
        return Incoming("note", message[1], channel, 0)
    if kind == 0xB0:
        return Incoming("cc", message[1], channel, message[2])
    return None


@dataclass(frozen=True)
class ClockOptions:
    follow_start_stop: bool = True
    """MIDI Start/Continue/Stop also start/stop the loop playback"""
    dropout_ms: float = 250.0
    """no clock tick for this long (or 3 tick intervals, whichever is longer) → internal tempo"""


@dataclass
class Mapping:
    bindings: list[Binding] = field(default_factory=list)
    channel: int | None = None
    """default channel of new bindings (1–16, None = any)"""
    clock: ClockOptions = ClockOptions()

    def lookup(self, kind: Kind, number: int, channel: int) -> Binding | None:
        """The binding of a received note/CC (channel 1–16), or None."""
        for b in self.bindings:
            if b.control.matches(kind, number, channel):
                return b
        return None

    def bind(self, target: str, kind: Kind, number: int) -> Binding:
        """MIDI learn: bind `target` (an action or parameter name) to a note/CC on the default
        channel, replacing every older binding of that control. Returns the new binding."""
        control = Control(kind, number, self.channel)
        if target in PARAMS:
            if kind != "cc":
                raise MappingError(f"parameter {target!r} needs a CC (knob or fader), got a note")
            info = PARAMS[target]
            binding: Binding = ParamBinding(control, target, *info.default_range, info.default_scale)
        elif target in ACTIONS:
            binding = ActionBinding(control, target, DEFAULT_MODE[ACTIONS[target].stateful])
        else:
            raise MappingError(f"unknown learn target {target!r}; {_known()}")
        self.bindings = [b for b in self.bindings if not b.control.overlaps(control)] + [binding]
        return binding

    def to_toml(self) -> str:
        """This map as TOML (the schema above; comments are not kept)."""
        lines = ["# rtvamp MIDI map (written by rtvamp; see `rtvamp midi learn`)",
                 f"channel = {_channel_toml(self.channel)}", "",
                 "[clock]", f"follow_start_stop = {str(self.clock.follow_start_stop).lower()}",
                 f"dropout_ms = {self.clock.dropout_ms!r}"]
        for kind in ("note", "cc"):
            for b in self.bindings:
                if b.control.kind != kind:
                    continue
                lines += ["", f"[[{kind}]]", f"{kind} = {b.control.number}"]
                if isinstance(b, ActionBinding):
                    lines += [f'action = "{b.action}"', f'mode = "{b.mode}"']
                else:
                    lines += [f'param = "{b.param}"', f"min = {b.low!r}", f"max = {b.high!r}", f'scale = "{b.scale}"']
                if b.control.channel != self.channel:
                    lines.append(f"channel = {_channel_toml(b.control.channel)}")
        return "\n".join(lines) + "\n"

    def save(self, path: str | Path) -> Path:
        """Write the map (atomically: a temporary file renamed over `path`)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_toml())
        tmp.replace(path)
        return path


def _known() -> str:
    return f"actions: {', '.join(ACTIONS)}; parameters: {', '.join(PARAMS)}"


def _channel_toml(channel: int | None) -> str:
    return '"any"' if channel is None else str(channel)


# -- parsing ---------------------------------------------------------------------------------------


class _Where:
    """Finds the line of a table's key by re-scanning the TOML text (tomllib gives no positions
    for values). `table`: None for the top level, "clock", or ("note", k) for the k-th [[note]]."""

    def __init__(self, text: str, source: str) -> None:
        self.lines = text.splitlines()
        self.source = source

    def _range(self, table: str | tuple[str, int] | None) -> tuple[int, int]:
        headers = [i for i, line in enumerate(self.lines) if re.match(r"\s*\[", line)]
        if table is None:
            return 0, headers[0] if headers else len(self.lines)
        if isinstance(table, tuple):
            pattern, nth = rf"\s*\[\[\s*{table[0]}\s*\]\]", table[1]
        else:
            pattern, nth = rf"\s*\[\s*{table}\s*\]", 0
        starts = [i for i in headers if re.match(pattern, self.lines[i])]
        if nth >= len(starts):
            return -1, -1
        start = starts[nth]
        end = next((i for i in headers if i > start), len(self.lines))
        return start, end

    def line(self, table: str | tuple[str, int] | None, key: str | None) -> int | None:
        start, end = self._range(table)
        if start < 0:
            return None
        if key is not None:
            for i in range(start, end):
                if re.match(rf"""\s*["']?{re.escape(key)}["']?\s*=""", self.lines[i]):
                    return i + 1
        return start + 1 if table is not None else None

    def error(self, table: str | tuple[str, int] | None, key: str | None, message: str) -> MappingError:
        line = self.line(table, key)
        name = "top level" if table is None else (f"[[{table[0]}]] #{table[1] + 1}" if isinstance(table, tuple)
                                                   else f"[{table}]")
        at = f", line {line}" if line else ""
        return MappingError(f"{self.source}{at}: {name}" + (f", key {key!r}" if key else "") + f": {message}")


def _int(where: _Where, table, key: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise where.error(table, key, f"must be an integer {low}–{high}, got {value!r}")
    return value


def _number(where: _Where, table, key: str, value, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise where.error(table, key, f"must be a number within {low:g}–{high:g}, got {value!r}")
    return float(value)


def _channel(where: _Where, table, value) -> int | None:
    if isinstance(value, str) and value.strip().lower() == "any":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 16:
        raise where.error(table, "channel", f'must be 1–16 or "any", got {value!r}')
    return value


def _choice(where: _Where, table, key: str, value, choices) -> str:
    if value not in choices:
        raise where.error(table, key, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _check_keys(where: _Where, table, entry: dict, allowed: tuple[str, ...]) -> None:
    for key in entry:
        if key not in allowed:
            raise where.error(table, key, f"unknown key (allowed: {', '.join(allowed)})")


def _action(where: _Where, table, entry: dict, control: Control) -> ActionBinding:
    action = entry["action"]
    if action not in ACTIONS:
        raise where.error(table, "action", f"unknown action {action!r} (known: {', '.join(ACTIONS)})")
    stateful = ACTIONS[action].stateful
    mode = _choice(where, table, "mode", entry.get("mode", DEFAULT_MODE[stateful]), ("momentary", "toggle"))
    if mode == "toggle" and not stateful:
        raise where.error(table, "mode", f"{action!r} is a one-shot: toggle needs an action with an on/off state "
                                         f"({', '.join(a for a, i in ACTIONS.items() if i.stateful)})")
    return ActionBinding(control, action, mode)


def _param(where: _Where, table, entry: dict, control: Control) -> ParamBinding:
    param = entry["param"]
    if param not in PARAMS:
        raise where.error(table, "param", f"unknown parameter {param!r} (known: {', '.join(PARAMS)})")
    info = PARAMS[param]
    low = _number(where, table, "min", entry.get("min", info.default_range[0]), *info.bounds)
    high = _number(where, table, "max", entry.get("max", info.default_range[1]), *info.bounds)
    scale = _choice(where, table, "scale", entry.get("scale", info.default_scale), ("linear", "log"))
    if low == high:
        raise where.error(table, "max", f"min and max are both {low:g}: the control would do nothing")
    if scale == "log" and min(low, high) <= 0:
        raise where.error(table, "scale", f"log scaling needs min and max > 0, got {low:g}–{high:g}")
    return ParamBinding(control, param, low, high, scale)


def _binding(where: _Where, kind: Kind, k: int, entry, default_channel: int | None) -> Binding:
    table = (kind, k)
    if not isinstance(entry, dict):
        raise where.error(None, kind, f"{kind} must be an array of tables ([[{kind}]])")
    _check_keys(where, table, entry, ("note", "action", "mode", "channel") if kind == "note" else
                ("cc", "param", "action", "mode", "min", "max", "scale", "channel"))
    if kind not in entry:
        raise where.error(table, None, f"missing {kind!r} (the {kind} number 0–127)")
    number = _int(where, table, kind, entry[kind], 0, 127)
    channel = _channel(where, table, entry["channel"]) if "channel" in entry else default_channel
    control = Control(kind, number, channel)
    targets = [key for key in ("action", "param") if key in entry]
    if len(targets) != 1 or (kind == "note" and targets != ["action"]):
        need = "an action" if kind == "note" else "either an action or a param"
        raise where.error(table, None, f"needs {need}")
    if targets == ["param"]:
        if "mode" in entry:
            raise where.error(table, "mode", "only for actions")
        return _param(where, table, entry, control)
    for key in ("min", "max", "scale"):
        if key in entry:
            raise where.error(table, key, "only for parameters")
    return _action(where, table, entry, control)


def parse_mapping(text: str, source: str = "<MIDI map>") -> Mapping:
    """Parse and validate a map. Raises MappingError (never anything else for bad input)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise MappingError(f"{source}: invalid TOML: {exc}") from None
    where = _Where(text, source)
    _check_keys(where, None, data, ("channel", "clock", "note", "cc"))
    default_channel = _channel(where, None, data["channel"]) if "channel" in data else None
    clock = data.get("clock", {})
    if not isinstance(clock, dict):
        raise where.error(None, "clock", "must be a table ([clock])")
    _check_keys(where, "clock", clock, ("follow_start_stop", "dropout_ms"))
    follow = clock.get("follow_start_stop", True)
    if not isinstance(follow, bool):
        raise where.error("clock", "follow_start_stop", f"must be true or false, got {follow!r}")
    dropout = _number(where, "clock", "dropout_ms", clock.get("dropout_ms", 250.0), 50.0, 5000.0)
    bindings: list[Binding] = []
    for kind in ("note", "cc"):
        entries = data.get(kind, [])
        if not isinstance(entries, list):
            raise where.error(None, kind, f"must be an array of tables ([[{kind}]])")
        for k, entry in enumerate(entries):
            binding = _binding(where, kind, k, entry, default_channel)
            clash = next((b for b in bindings if b.control.overlaps(binding.control)), None)
            if clash is not None:
                raise where.error((kind, k), kind, f"{binding.control} is already bound "
                                                   f"(to {getattr(clash, 'action', None) or clash.param})")
            bindings.append(binding)
    return Mapping(bindings, default_channel, ClockOptions(follow, dropout))


def load_mapping(path: str | Path) -> Mapping:
    """Read and validate a map file (MappingError if it is missing, unreadable or invalid)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MappingError(f"{path}: cannot read the MIDI map: {exc}") from None
    return parse_mapping(text, str(path))


DEFAULT_MAP = "default_map.toml"


def default_mapping() -> Mapping:
    """The built-in map for a generic 16-pad (notes 36–51) / 8-knob (CC 70–77) controller."""
    text = resources.files(__package__).joinpath(DEFAULT_MAP).read_text(encoding="utf-8")
    return parse_mapping(text, f"rtvamp/midi/{DEFAULT_MAP}")
