"""MIDI control for rtvamp: pads and knobs (a TOML map with MIDI learn), MIDI clock in and out,
pad lights — python-rtmidi on the control side, never the audio thread.

MidiControl, ParamState, Applied and attach load the engine (and its numba kernels) on first
use, so `rtvamp midi …` and `import rtvamp.midi` stay quick."""

from .mapping import ACTIONS, PARAMS, Mapping, MappingError, default_mapping, load_mapping, parse_mapping
from .ports import MidiError, MidiInput, MidiOutput, describe, list_ports

_CONTROL = ("Applied", "MidiControl", "ParamState", "attach")

__all__ = ["ACTIONS", "PARAMS", "Mapping", "MappingError", "MidiError", "MidiInput", "MidiOutput", "default_mapping",
           "describe", "list_ports", "load_mapping", "parse_mapping", *_CONTROL]


def __getattr__(name: str):
    if name in _CONTROL:
        from . import control

        return getattr(control, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
