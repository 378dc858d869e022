"""The sound-card driver: a sounddevice (PortAudio) duplex stream that calls `BlockProcessor.process`.

Real-time rules for the callback (`SoundCardDriver._callback`), as in python-sounddevice's own
documentation: it creates no NumPy array, takes no lock, never waits, logs or prints. The processor
reads the stream's input array and writes the stream's output array in place (or preallocated
buffers when the engine's channel count differs from the device's); counters are plain integers
and callback durations go into a preallocated ring. Everything that summarises them (`stats`) runs
outside the callback.

sounddevice is imported lazily so that `rtvamp` imports without PortAudio; a missing PortAudio
becomes a `DeviceError` with the install command.
"""

from __future__ import annotations

from dataclasses import dataclass
from time import perf_counter
from types import ModuleType
from typing import Literal, Protocol

import numpy as np

PORTAUDIO_MISSING = "PortAudio is not installed: apt-get install libportaudio2 (and jackd2 for JACK)"

XRUN_KINDS = ("input_underflow", "input_overflow", "output_underflow", "output_overflow", "priming_output")
"""The callback's status flags, counted per kind. `priming_output` marks blocks PortAudio asks for
before the input starts (start-up), not a dropout; the other four are dropouts."""

DeviceKind = Literal["input", "output"]


class DeviceError(RuntimeError):
    """An audio device that cannot be found or opened, with a message for the user."""


class BlockProcessor(Protocol):
    """What a driver drives (the engine): called once per block on the audio thread."""

    def process(self, in_block: np.ndarray, out_block: np.ndarray, frame_time: int) -> None:
        """in_block float32 [frames, channels] → out_block float32 [frames, channels], written in
        place. frame_time: sample index of the block's first frame. Must not allocate, lock or wait."""


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    hostapi: str
    max_input_channels: int
    max_output_channels: int
    default_sample_rate: float
    """Hz"""

    def __str__(self) -> str:
        return (f"[{self.index}] {self.name} — {self.hostapi} ({self.max_input_channels} in, "
                f"{self.max_output_channels} out, {self.default_sample_rate:g} Hz)")


def _sounddevice() -> ModuleType:
    """The sounddevice module; DeviceError (no traceback for the user) when PortAudio is missing."""
    try:
        import sounddevice
    except OSError:  # sounddevice raises OSError("PortAudio library not found") at import
        raise DeviceError(PORTAUDIO_MISSING) from None
    return sounddevice


def list_devices() -> list[DeviceInfo]:
    """Every device PortAudio sees, in PortAudio's index order."""
    sd = _sounddevice()
    hostapis = [api["name"] for api in sd.query_hostapis()]
    return [DeviceInfo(index=d["index"], name=d["name"], hostapi=hostapis[d["hostapi"]],
                       max_input_channels=d["max_input_channels"], max_output_channels=d["max_output_channels"],
                       default_sample_rate=d["default_samplerate"])
            for d in sd.query_devices()]


def _channels(device: DeviceInfo, kind: DeviceKind) -> int:
    return device.max_input_channels if kind == "input" else device.max_output_channels


def _device_error(message: str, devices: list[DeviceInfo]) -> DeviceError:
    listing = "\n".join(f"  {d}" for d in devices) or "  (none: is an audio server such as JACK running?)"
    return DeviceError(f"{message}\navailable devices:\n{listing}")


def find_device(spec: str | int | None, kind: DeviceKind) -> int | None:
    """The PortAudio index of the `kind` device that `spec` names; None for the host's default.

    spec: an index (int or digits), or a case-insensitive substring of "name, host API" (so "jack"
    finds the JACK device). A name equal to spec wins over names that merely contain it. An
    unknown, ambiguous or wrong-direction spec raises DeviceError listing the devices.
    """
    if spec is None:
        return None
    devices = list_devices()
    if isinstance(spec, int) or spec.strip().isdigit():
        index = int(spec)
        if not 0 <= index < len(devices):
            raise _device_error(f"no audio device with index {index}", devices)
        if _channels(devices[index], kind) == 0:
            raise _device_error(f"device {devices[index]} has no {kind} channels", devices)
        return index
    query = spec.strip().lower()
    candidates = [d for d in devices if _channels(d, kind) > 0]
    matches = [d for d in candidates if d.name.lower() == query] or \
              [d for d in candidates if query in f"{d.name}, {d.hostapi}".lower()]
    if not matches:
        raise _device_error(f"no {kind} device matches {spec!r}", devices)
    if len(matches) > 1:
        names = ", ".join(f"[{d.index}] {d.name} ({d.hostapi})" for d in matches)
        raise _device_error(f"{spec!r} matches several {kind} devices: {names}; give an index", devices)
    return matches[0].index


class SoundCardDriver:
    """Runs `processor.process` from a PortAudio duplex stream, one block of `block_frames` frames
    at `sample_rate` Hz, with `channels` engine channels in and out.

    A device with fewer channels than the engine is adapted through preallocated buffers: a mono
    input feeds every engine channel, a multichannel input the first ones (the rest are silent); a
    mono output gets the mean of the engine channels, a multichannel output the first ones.

    If the processor raises, that block's output is the input copied through (never silent, never a
    crash of the audio path), `callback_errors` counts it and `processor_error` names the exception
    type for the UI. This is the only place rtvamp swallows an exception.
    """

    def __init__(self, processor: BlockProcessor, sample_rate: int = 44100, block_frames: int = 256,
                 channels: int = 2, input_device: str | int | None = None, output_device: str | int | None = None,
                 latency: str | float = "low", timing_blocks: int = 16384) -> None:
        """latency: PortAudio's suggested latency, "low", "high" or seconds. timing_blocks: how many
        recent callback durations `stats` summarises (16384 blocks ≈ 95 s at 44.1 kHz / 256)."""
        self._sd = _sounddevice()
        self.processor = processor
        self.sample_rate = int(sample_rate)
        self.block_frames = int(block_frames)
        self.channels = int(channels)
        self.latency = latency
        self._devices = (find_device(input_device, "input"), find_device(output_device, "output"))
        self._device_channels = (self._open_channels(self._devices[0], "input"),
                                 self._open_channels(self._devices[1], "output"))
        dev_in, dev_out = self._device_channels
        # Engine-shaped buffers (or None: the stream's own arrays are passed straight through).
        self._in_buf = np.zeros((self.block_frames, self.channels), np.float32) if dev_in != self.channels else None
        self._out_buf = np.zeros((self.block_frames, self.channels), np.float32) if dev_out != self.channels else None
        # Where the device input is copied to: all of _in_buf (mono broadcast) or its first columns.
        self._in_target = None if self._in_buf is None else (self._in_buf if dev_in == 1 else self._in_buf[:, :dev_in])
        self._out_source = None if self._out_buf is None else self._out_buf[:, :dev_out]
        self._mono_out = dev_out == 1

        self._stream = None
        self._frame_time = 0
        self._blocks = 0
        self._callback_errors = 0
        self.processor_error: str | None = None
        """Type name of the exception the processor last raised on the audio thread (None: never)."""
        self._xruns = [0] * len(XRUN_KINDS)
        self._durations = np.zeros(int(timing_blocks), np.float64)  # seconds, ring indexed by block

    def _open_channels(self, device: int | None, kind: DeviceKind) -> int:
        """Channels to open on `device` for `kind`: the engine's count, fewer if the device has fewer."""
        try:
            available = self._sd.query_devices(device, kind)[f"max_{kind}_channels"]
        except (self._sd.PortAudioError, ValueError) as exc:
            raise _device_error(f"no default {kind} device ({exc})", list_devices()) from None
        if available == 0:
            raise _device_error(f"the {kind} device has no {kind} channels", list_devices())
        return min(self.channels, available)

    # --- the audio thread ------------------------------------------------------------------------

    def _callback(self, indata: np.ndarray, outdata: np.ndarray, frames: int, time_info, status) -> None:
        """PortAudio's callback: no array creation, lock, wait, log or print in here."""
        start = perf_counter()
        if status:
            self._count_xruns(status)
        if self._in_target is None:
            in_block = indata
        else:
            np.copyto(self._in_target, indata)
            in_block = self._in_buf
        out_block = outdata if self._out_buf is None else self._out_buf
        try:
            self.processor.process(in_block, out_block, self._frame_time)
        except Exception as exc:  # noqa: BLE001 — the audio path must survive any processor bug
            np.copyto(out_block, in_block)
            self._callback_errors += 1
            self.processor_error = type(exc).__name__
        if self._out_source is not None:
            if self._mono_out:
                np.mean(self._out_buf, axis=1, keepdims=True, out=outdata)
            else:
                np.copyto(outdata, self._out_source)
        self._frame_time += frames
        self._durations[self._blocks % self._durations.shape[0]] = perf_counter() - start
        self._blocks += 1

    def _count_xruns(self, status) -> None:
        for i, kind in enumerate(XRUN_KINDS):
            if getattr(status, kind):
                self._xruns[i] += 1

    # --- control (any thread but the audio one) ------------------------------------------------

    def start(self) -> None:
        """Open the stream (if needed) and start calling the processor. frame_time and the counters
        carry on across stop/start."""
        if self._stream is None:
            try:
                self._stream = self._sd.Stream(
                    samplerate=self.sample_rate, blocksize=self.block_frames, device=self._devices,
                    channels=self._device_channels, dtype="float32", latency=self.latency,
                    callback=self._callback)
            except (self._sd.PortAudioError, ValueError) as exc:
                raise _device_error(f"cannot open the audio stream at {self.sample_rate} Hz, "
                                    f"{self.block_frames} frames: {exc}", list_devices()) from None
        self._stream.start()

    def stop(self) -> None:
        """Stop and close the stream (waits for the current callback); a no-op when not started."""
        if self._stream is not None:
            self._stream.stop()
            self._stream.close()
            self._stream = None

    def __enter__(self) -> SoundCardDriver:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """True while the stream is calling the processor."""
        return self._stream is not None and self._stream.active

    @property
    def frame_time(self) -> int:
        """Sample index of the next block's first frame: frames delivered so far (dropouts do not
        advance it)."""
        return self._frame_time

    @property
    def callback_errors(self) -> int:
        """Blocks in which the processor raised (their output was the input copied through)."""
        return self._callback_errors

    @property
    def latency_samples(self) -> int:
        """The open stream's reported input + output latency, in samples at `sample_rate`."""
        if self._stream is None:
            raise RuntimeError("the sound-card driver is not started")
        latency_in_s, latency_out_s = self._stream.latency
        return round((latency_in_s + latency_out_s) * self.sample_rate)

    def stats(self) -> dict:
        """Counters and callback timing (computed here, never in the callback).

        blocks, frame_time (samples), callback_errors, processor_error, xruns {kind: count};
        callback_p50 / callback_p99 / callback_max: callback duration as a fraction of the block
        period (block_frames / sample_rate seconds) over the last `timing_blocks` blocks (0 before
        the first block).
        """
        blocks = self._blocks
        durations = self._durations[:min(blocks, self._durations.shape[0])].copy()
        period_s = self.block_frames / self.sample_rate
        p50, p99, peak = (*np.percentile(durations, [50, 99]), durations.max()) if blocks else (0.0, 0.0, 0.0)
        return {
            "blocks": blocks,
            "frame_time": self._frame_time,
            "callback_errors": self._callback_errors,
            "processor_error": self.processor_error,
            "xruns": dict(zip(XRUN_KINDS, self._xruns)),
            "callback_p50": float(p50) / period_s,
            "callback_p99": float(p99) / period_s,
            "callback_max": float(peak) / period_s,
        }
