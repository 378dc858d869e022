"""The sound-card driver against a real audio server: `jackd -d dummy` (no sound hardware needed).

PortAudio is re-initialised in this process once jackd is up (see tests/jack_server.py), so the
driver runs here, where the test can look at its counters and trace its allocations.
"""

from __future__ import annotations

import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest

from rtvamp.io import audio
from rtvamp.io.audio import XRUN_KINDS, DeviceError, DeviceInfo, SoundCardDriver, find_device, list_devices

from jack_server import JACK_HOSTAPI, jack_dummy, jack_ports

RATE = 44100
BLOCK = 256  # frames, the JACK period too
JACK_DEVICE = "system, jack"  # "name, host API" substring of the dummy's only device


@pytest.fixture(scope="module")
def jack():
    with jack_dummy(RATE, BLOCK) as server:
        yield server


class Probe:
    """Test processor: out = −in (input copied through by the driver shows as a sign flip); records
    each block's frame_time; when `fail_next` is set, saves its input and raises once."""

    def __init__(self, channels: int = 2, max_blocks: int = 4096) -> None:
        self.frame_times = np.full(max_blocks, -1, np.int64)
        self.shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None  # (in, out) of the last block
        self.blocks = 0
        self.fail_next = False
        self.failed_input = np.zeros((BLOCK, channels), np.float32)

    def process(self, in_block: np.ndarray, out_block: np.ndarray, frame_time: int) -> None:
        self.frame_times[self.blocks % self.frame_times.shape[0]] = frame_time
        self.blocks += 1
        self.shapes = (in_block.shape, out_block.shape)
        if self.fail_next:
            self.fail_next = False
            np.copyto(self.failed_input, in_block)
            raise RuntimeError("a bug in the processor")
        np.negative(in_block, out=out_block)


class Copy:
    """Non-allocating processor (out = in); `allocate=True` also creates one block-sized array per
    block, the control that shows the allocation measurement sees arrays made in the callback."""

    def __init__(self, allocate: bool = False) -> None:
        self.allocate = allocate

    def process(self, in_block: np.ndarray, out_block: np.ndarray, frame_time: int) -> None:
        if self.allocate:
            np.empty_like(in_block)
        np.copyto(out_block, in_block)


def jack_driver(processor, channels: int = 2) -> SoundCardDriver:
    return SoundCardDriver(processor, RATE, BLOCK, channels, input_device=JACK_DEVICE, output_device=JACK_DEVICE)


class NewPorts:
    """Ports registered on the JACK server since the last call, in registration order."""

    def __init__(self) -> None:
        self.known = set(jack_ports())

    def __call__(self) -> list[str]:
        ports = [p for p in jack_ports() if p not in self.known]
        self.known.update(ports)
        return ports


def connect(sources: list[str], destinations: list[str]) -> None:
    for source, destination in zip(sources, destinations, strict=True):
        subprocess.run(["jack_connect", source, destination], check=True, timeout=5)


def wait_blocks(driver: SoundCardDriver, blocks: int, timeout_s: float = 5.0) -> None:
    target = driver.frame_time + blocks * BLOCK
    deadline = time.monotonic() + timeout_s
    while driver.frame_time < target:
        assert time.monotonic() < deadline, f"the stream stalled at frame {driver.frame_time}"
        time.sleep(0.01)


def test_list_devices_includes_jack(jack):
    devices = [d for d in list_devices() if d.hostapi == JACK_HOSTAPI]
    assert len(devices) == 1
    assert (devices[0].name, devices[0].max_input_channels, devices[0].max_output_channels,
            devices[0].default_sample_rate) == ("system", 2, 2, RATE)


def test_find_device_by_substring_and_index(jack):
    index = next(d.index for d in list_devices() if d.hostapi == JACK_HOSTAPI)
    assert find_device("SYSTEM, JACK", "input") == index
    assert find_device("System, JACK Audio", "output") == index
    assert find_device(index, "output") == index
    assert find_device(str(index), "input") == index
    assert find_device(None, "output") is None
    with pytest.raises(DeviceError, match="no output device matches 'no such card'") as error:
        find_device("no such card", "output")
    assert "available devices:" in str(error.value) and f"[{index}] system — {JACK_HOSTAPI}" in str(error.value)
    with pytest.raises(DeviceError, match="no audio device with index 99"):
        find_device(99, "input")


def test_ambiguous_or_wrong_direction_spec_lists_devices(monkeypatch):
    fake = [DeviceInfo(0, "USB Audio A", "ALSA", 2, 2, 48000.0), DeviceInfo(1, "USB Audio B", "ALSA", 2, 2, 48000.0),
            DeviceInfo(2, "Mic", "ALSA", 1, 0, 48000.0), DeviceInfo(3, "Mic Array", "ALSA", 4, 0, 48000.0)]
    monkeypatch.setattr(audio, "list_devices", lambda: fake)
    with pytest.raises(DeviceError, match="matches several output devices") as error:
        find_device("usb audio", "output")
    assert all(str(d) in str(error.value) for d in fake)
    assert find_device("usb audio b", "output") == 1
    assert find_device("mic", "input") == 2  # an exact name wins over names that contain it
    with pytest.raises(DeviceError, match="no output device matches 'mic'"):
        find_device("mic", "output")
    with pytest.raises(DeviceError, match="has no output channels"):
        find_device(3, "output")


def test_missing_portaudio_is_a_device_error(monkeypatch):
    class NoPortAudio:  # what importing sounddevice does without libportaudio2
        def find_spec(self, name, path=None, target=None):
            if name == "sounddevice":
                raise OSError("PortAudio library not found")

    monkeypatch.delitem(sys.modules, "sounddevice", raising=False)
    monkeypatch.setattr(sys, "meta_path", [NoPortAudio(), *sys.meta_path])
    with pytest.raises(DeviceError) as error:
        list_devices()
    assert str(error.value) == audio.PORTAUDIO_MISSING
    assert error.value.__suppress_context__  # no chained traceback for the user


def test_driver_runs_against_jack(jack):
    """2 s of blocks. The dummy backend skips a cycle per xrun when this machine is loaded, so the
    block rate is only bounded loosely (≥ half the nominal rate)."""
    probe = Probe()
    with jack_driver(probe) as driver:
        time.sleep(2.0)
        assert driver.running and probe.shapes == ((BLOCK, 2), (BLOCK, 2))
        latency = driver.latency_samples
    stats = driver.stats()
    print(f"\nJACK dummy, {BLOCK} frames at {RATE} Hz: latency {latency} samples; {stats}")
    assert not driver.running
    blocks = stats["blocks"]
    assert 0.5 * 2.0 * RATE / BLOCK < blocks < 1.1 * 2.0 * RATE / BLOCK
    assert probe.blocks == blocks and stats["frame_time"] == blocks * BLOCK == driver.frame_time
    np.testing.assert_array_equal(probe.frame_times[:blocks], np.arange(blocks) * BLOCK)
    assert set(stats["xruns"]) == set(XRUN_KINDS)
    assert all(type(n) is int and n >= 0 for n in stats["xruns"].values())
    assert (stats["callback_errors"], stats["processor_error"]) == (0, None)
    assert 0.0 < stats["callback_p50"] <= stats["callback_p99"] <= stats["callback_max"]
    assert type(latency) is int and latency >= BLOCK  # the dummy reports 0 in + 2 periods out


def test_processor_exception_passes_input_through(jack):
    """source (ramp) → driver (−in, one block raises) → recorder, all JACK ports of this process."""
    ramp = (0.25 + np.arange(65536) / 131072).astype(np.float32)  # distinct and exact, in [0.25, 0.75)
    played = 0
    recording = np.zeros((4 * RATE, 2), np.float32)
    recorded = 0

    def source(outdata, frames, time_info, status):
        nonlocal played
        signal = ramp[(played + np.arange(frames)) % ramp.shape[0]]
        outdata[:, 0], outdata[:, 1] = signal, 1.0 - signal
        played += frames

    def recorder(indata, frames, time_info, status):
        nonlocal recorded
        frames = min(frames, recording.shape[0] - recorded)
        recording[recorded:recorded + frames] = indata[:frames]
        recorded += frames

    import sounddevice

    device = find_device(JACK_DEVICE, "output")
    new_ports = NewPorts()
    probe = Probe()
    with sounddevice.OutputStream(RATE, BLOCK, device, 2, "float32", callback=source):
        source_out = new_ports()
        with jack_driver(probe) as driver:
            driver_ports = new_ports()
            with sounddevice.InputStream(RATE, BLOCK, device, 2, "float32", callback=recorder):
                connect(source_out, [p for p in driver_ports if ":in_" in p])
                connect([p for p in driver_ports if ":out_" in p], new_ports())
                wait_blocks(driver, 20)
                probe.fail_next = True
                wait_blocks(driver, 40)
                assert driver.running
                assert (driver.callback_errors, driver.processor_error) == (1, "RuntimeError")
                assert probe.blocks == driver.stats()["blocks"]  # every block after the failure ran too

    assert (probe.failed_input > 0.2).all(), "the source did not reach the driver's input"
    out = recording[:recorded]
    for channel in range(2):
        copied = np.flatnonzero(out[:, channel] > 0)  # −in everywhere but the block that raised
        assert copied.shape[0] == BLOCK and copied[-1] - copied[0] == BLOCK - 1
        np.testing.assert_array_equal(out[copied, channel], probe.failed_input[:, channel])


@pytest.mark.parametrize("channels,allocate", [(2, False), (4, False), (2, True)],
                         ids=["direct", "channel-adapting buffers", "control: allocating processor"])
def test_callback_does_not_allocate(jack, channels, allocate):
    """Bounds, over 170 blocks after warm-up: net traced memory grows < 1 KiB (< 6 B per block:
    nothing accumulates), and the transient peak stays < 2 KiB, the size of one block's float32
    array (256 frames × 2 channels × 4 B), so no array of a block is created per callback. The rest
    is sounddevice's own per-callback wrapping of PortAudio's buffers (~0.8 KiB transient here).
    The control processor creates one such array per block and must break the peak bound."""
    with jack_driver(Copy(allocate), channels) as driver:
        wait_blocks(driver, 20)
        tracemalloc.start()
        try:
            wait_blocks(driver, 50)  # warm-up: first-time allocations of the traced path
            tracemalloc.get_traced_memory()
            base, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            wait_blocks(driver, 170)
            current, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert driver.callback_errors == 0
    assert current - base < 1024
    if allocate:
        assert peak - base >= BLOCK * 2 * 4
    else:
        assert peak - base < BLOCK * 2 * 4, f"{peak - base} B allocated transiently in the callback"


def test_engine_channels_adapt_to_the_device(jack):
    """A 4-channel engine on the dummy's 2-channel device: the processor still gets 4-channel blocks
    (preallocated buffers); device inputs fill the first engine channels, the rest are silent."""
    probe = Probe(channels=4)
    with jack_driver(probe, channels=4) as driver:
        wait_blocks(driver, 10)
        probe.fail_next = True  # saves one 4-channel input block
        wait_blocks(driver, 10)
    assert probe.shapes == ((BLOCK, 4), (BLOCK, 4))
    assert driver.callback_errors == 1 and not probe.failed_input[:, 2:].any()


def test_mono_device_feeds_and_hears_every_engine_channel():
    """A stereo engine on a mono device (its own dummy server: 1 capture, 1 playback port): the mono
    input feeds both engine channels, the mono output gets their mean."""

    class Constant:
        def __init__(self) -> None:
            self.last_input = np.zeros((BLOCK, 2), np.float32)

        def process(self, in_block: np.ndarray, out_block: np.ndarray, frame_time: int) -> None:
            np.copyto(self.last_input, in_block)
            out_block[:, 0], out_block[:, 1] = 0.5, 0.25

    heard = np.zeros(BLOCK, np.float32)

    def source(outdata, frames, time_info, status):
        outdata.fill(0.125)

    def recorder(indata, frames, time_info, status):
        heard[:] = indata[:, 0]

    with jack_dummy(RATE, BLOCK, ports=1):
        import sounddevice

        device = find_device(JACK_DEVICE, "output")
        new_ports = NewPorts()
        processor = Constant()
        with sounddevice.OutputStream(RATE, BLOCK, device, 1, "float32", callback=source):
            source_out = new_ports()
            with jack_driver(processor) as driver:
                driver_ports = new_ports()
                with sounddevice.InputStream(RATE, BLOCK, device, 1, "float32", callback=recorder):
                    connect(source_out, [p for p in driver_ports if ":in_" in p])
                    connect([p for p in driver_ports if ":out_" in p], new_ports())
                    wait_blocks(driver, 20)
    assert (processor.last_input == 0.125).all()
    assert (heard == 0.375).all()
