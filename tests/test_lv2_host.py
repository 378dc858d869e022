"""The LV2 plugin (bridge/lv2) in a real-time LV2 host: jalv on a real JACK server (`jackd -d dummy`),
against a bridge server in this process (real ZeroMQ, a real worker process with the tiny bundle).

Audio is played into jalv and recorded from it by `jack_probe` (bridge/lv2/jack_probe.c, built with
`make probe`): two JACK clients, src → jalv → rec, so JACK runs all three in one cycle in graph
order, and everything is indexed by JACK's own frame clock. A direct src → rec path is recorded
too: it shows that JACK adds nothing on such a path, so any delay on the jalv path is the
plugin's. With the transport options the probe is JACK's BBT timebase master (BBT computed from
the transport frame every cycle) and starts the transport; it logs each cycle's transport frame.

The engine's side is read from the server (a log of the host sample time and engine sample of
every block it processes), from `ControlClient.state()` and from the engine's takes. Every
check is exact sample accounting; the only wall-clock waits are "until … or fail" deadlines.
JACK xruns (a loaded machine has them) are accounted for, not tolerated: a cycle the probe
missed and the blocks that depend on it are named and left out, every other block must be
exact. The measured numbers are printed (run with -s to see them).

The last test needs no JACK: the server's side of a host whose timeline skips cycles.
"""

from __future__ import annotations

import ctypes.util
import os
import queue
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from rtvamp.bridge import AudioStream, ClientKeys, ControlClient, DawTransport
from rtvamp.bridge.cli import generate_keys
from rtvamp.bridge.server import BridgeServer, ServeOptions, ServerKeys, realtime_permitted
from rtvamp.engine.backend import LocalWorker
from rtvamp.engine.core import CoreConfig
from rtvamp.engine.engine import Engine, EngineConfig

from conftest import SharedBackend
from jack_server import jack_dummy, jack_ports
from test_bridge import free_base_port

ROOT = Path(__file__).resolve().parent.parent
LV2_SOURCE = ROOT / "bridge" / "lv2"
URI = "urn:rtvamp:bridge"
SR = 44100
PERIOD = 256            # the JACK period: the host's block, and so the plugin's bridge frame
HOST = "rtvamp-bridge"  # jalv's JACK client name
FADE = int(0.01 * SR)   # the engine's crossfade and gain glides (crossfade_ms=10)
INSTALL = "apt-get install -y jalv jackd2 lv2-dev libzmq3-dev pkg-config make gcc"
ATTEMPTS = 3            # measurements JACK itself spoiled (see until_jack_ran) are made again, up to this


def _missing() -> str | None:
    for tool in ("make", "cc", "pkg-config", "jalv", "jackd", "jack_lsp", "stdbuf"):
        if shutil.which(tool) is None:
            return tool
    for pkg in ("lv2", "libzmq"):
        if subprocess.run(["pkg-config", "--exists", pkg]).returncode != 0:
            return f"pkg-config {pkg}"
    if ctypes.util.find_library("jack") is None:
        return "libjack.so.0"
    return None


needs_host = pytest.mark.skipif(_missing() is not None, reason=f"{_missing()} is missing: {INSTALL}")


def report(text: str) -> None:
    print(f"\n[lv2-host] {text}", flush=True)


# -- fixtures: the plugin and probe, JACK, the bridge server, jalv --------------------------------

@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lv2build")
    proc = subprocess.run(["make", "-C", str(LV2_SOURCE), f"OUT={out}", "all", "probe"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@pytest.fixture(scope="module")
def jack():
    with jack_dummy(SR, PERIOD) as name:
        yield name


@dataclass
class Served:
    server: BridgeServer
    engine: Engine
    endpoint: str
    blocks: list
    """(host sample time, engine sample, frames, flags) of every block the engine processed (logged
    on the server's audio thread)"""

    def host_frame(self, engine_sample: int) -> int:
        """The host's timeline position of an engine sample, from the block that holds it."""
        for sample_time, engine_time, frames, _ in reversed(self.blocks):
            if engine_time <= engine_sample < engine_time + frames:
                return sample_time + engine_sample - engine_time
        raise AssertionError(f"the engine processed no block holding sample {engine_sample}")


@pytest.fixture(scope="module")
def worker():
    with LocalWorker(max_batch=1) as w:
        yield w


def serve(worker, **options) -> tuple[BridgeServer, Engine, str]:
    """An engine on the shared worker, served on a fresh loopback port."""
    engine = Engine(SharedBackend(worker), EngineConfig(core=CoreConfig(sample_rate=SR, crossfade_ms=10)))
    endpoint = f"tcp://127.0.0.1:{free_base_port()}"
    return BridgeServer(engine, ServeOptions(bind=endpoint, **options)).start(), engine, endpoint


def logged(server: BridgeServer, engine: Engine, endpoint: str) -> Served:
    """The server, with a log of the blocks its engine processes (on its audio thread)."""
    blocks: list = []
    process = server.audio._process

    def log_and_process(session, header, samples):
        blocks.append((header.sample_time, server.audio.engine_time, header.frames, int(header.flags)))
        process(session, header, samples)

    server.audio._process = log_and_process
    return Served(server, engine, endpoint, blocks)


@pytest.fixture(scope="module")
def served(worker):
    """The engine jalv streams to, served as `rtvamp serve --realtime` would."""
    served = logged(*serve(worker, realtime=True))
    yield served
    served.server.close()
    served.engine.close()


class Jalv:
    """jalv (console frontend) running the plugin as a JACK client; commands on its stdin."""

    def __init__(self, build: Path, endpoint: str, name: str = HOST, **env: str) -> None:
        env = {**os.environ, "LV2_PATH": str(build / "lv2"), "RTVAMP_ENDPOINT": endpoint, **env}
        self.name = name
        self.proc = subprocess.Popen(["stdbuf", "-oL", "jalv", "-x", "-n", name, URI], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)
            self.lines.put(line)

    def send(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def monitors(self, timeout_s: float = 5.0) -> dict[str, float]:
        """The plugin's output controls (jalv's `monitors` command)."""
        while not self.lines.empty():
            self.lines.get_nowait()
        self.send("monitors")
        got: dict[str, float] = {}
        deadline = time.monotonic() + timeout_s
        while not {"latency", "connected", "concealed"} <= got.keys():
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"jalv did not answer `monitors`:\n{''.join(self.log[-20:])}") from None
            if m := re.search(r"(\w+) = (-?[\d.]+)", line):
                got[m[1]] = float(m[2])
        return got

    def wait_connected(self, timeout_s: float = 20.0) -> dict[str, float]:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc.poll() is None, f"jalv exited:\n{''.join(self.log)}"
            m = self.monitors()
            if m["connected"] == 1.0 or time.monotonic() > deadline:
                return m
            time.sleep(0.1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # EOF: jalv's console quits
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def wait_ports(self, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while f"{self.name}:out_l" not in jack_ports():
            assert self.proc.poll() is None and time.monotonic() < deadline, f"jalv did not start:\n{''.join(self.log)}"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def host(build, jack, served):
    jalv = Jalv(build, served.endpoint)
    jalv.wait_ports()
    m = jalv.wait_connected()
    assert m["connected"] == 1.0, f"the plugin in jalv did not reach the engine: {m}\n{''.join(jalv.log)}"
    yield jalv
    jalv.close()


# -- the probe ----------------------------------------------------------------------------------

@dataclass
class Recording:
    audio: np.ndarray
    """float32 [frames, inputs] from JACK frame `start` on (NaN where rec did not run)"""
    start: int
    """a cycle boundary: recorded block k (PERIOD frames) is one cycle of the host"""
    cycles: np.ndarray
    """one row per rec cycle: JACK frame, transport state, transport frame, BBT valid, bar, beat, tick, bpm"""
    src_cycles: np.ndarray
    """the JACK frame of each cycle src played"""
    xruns: int

    @property
    def blocks(self) -> int:
        return self.audio.shape[0] // PERIOD

    def missed(self) -> np.ndarray:
        """Blocks (cycles) that a JACK xrun cost the probe: rec recorded nothing (NaN) or src
        played nothing (jalv read a stale input buffer)."""
        n = self.blocks
        rec_gap = np.isnan(self.audio[:n * PERIOD]).any(axis=1).reshape(n, PERIOD).any(axis=1)
        played = np.zeros(n, bool)
        k = (self.src_cycles.astype(np.int64) - self.start) // PERIOD
        played[k[(k >= 0) & (k < n)]] = True
        return np.flatnonzero(rec_gap | ~played)

    def _transport_offsets(self) -> tuple[np.ndarray, np.ndarray]:
        rolling = self.cycles[self.cycles[:, 1] == 1]
        return np.unique(rolling[:, 0].astype(np.int64) - rolling[:, 2].astype(np.int64), return_counts=True)

    def transport_steady(self) -> bool:
        """JACK frame − transport frame kept one value while the transport rolled (a cycle the
        probe ran late may read the next cycle's position: a few exceptions are allowed)."""
        counts = self._transport_offsets()[1]
        return counts.size > 0 and counts.max() >= 0.95 * counts.sum()

    def transport_offset(self) -> int:
        """JACK frame − transport frame while the transport rolls."""
        offsets, counts = self._transport_offsets()
        assert self.transport_steady(), f"the transport jumped while rolling: {offsets}, {counts}"
        return int(offsets[np.argmax(counts)])

    def index_of_transport_frame(self, frame: int) -> int:
        return frame + self.transport_offset() - self.start


class Probe:
    """bridge/lv2/jack_probe as a subprocess: plays `signal` into jalv, records `inputs` ports."""

    def __init__(self, build: Path, tmp: Path, signal: np.ndarray, inputs: int, connections: list[tuple[str, str]],
                 tempo: tuple[float, int] | None = None, roll: bool = False,
                 midi: list[tuple[int, bytes]] = ()) -> None:
        self.frames = signal.shape[0]
        self.inputs = inputs
        self.out = tmp / "recording.f32"
        signal_file = tmp / "signal.f32"
        np.ascontiguousarray(signal, dtype=np.float32).tofile(signal_file)
        args = [str(build / "jack_probe"), "probe", str(signal_file), str(self.frames), str(inputs), str(self.out)]
        for a, b in connections:
            args += ["-c", a, b]
        if tempo is not None:
            args += ["-t", str(tempo[0]), str(tempo[1])]
        if roll:
            args.append("-r")
        for at, data in midi:
            args += ["-m", str(at), *(str(b) for b in data)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def result(self) -> Recording:
        out, err = self.proc.communicate(timeout=30 + 3 * self.frames / SR)
        assert self.proc.returncode == 0, out + err
        fields = dict(kv.split("=") for kv in out.split()[1:])
        audio = np.fromfile(self.out, np.float32).reshape(self.frames, self.inputs)
        cycles = np.loadtxt(f"{self.out}.cycles", ndmin=2)
        src = np.loadtxt(f"{self.out}.src", ndmin=1)
        return Recording(audio, int(fields["start"]), cycles, src, int(fields["xruns"]))


def jack_latencies() -> dict[str, dict[str, tuple[int, int]]]:
    """`jack_lsp -l`: port → {"playback": (min, max), "capture": (min, max)}."""
    text = subprocess.run(["jack_lsp", "-l"], capture_output=True, text=True, timeout=10).stdout
    ports: dict[str, dict[str, tuple[int, int]]] = {}
    port = None
    for line in text.splitlines():
        if m := re.match(r"\s+port (playback|capture) latency = \[ (\d+) (\d+) \]", line):
            ports[port][m[1]] = (int(m[2]), int(m[3]))
        elif line and not line[0].isspace():
            port = line.strip()
            ports[port] = {}
    return ports


def realtime_threads(pid: int) -> list[tuple[str, int]]:
    """(name, priority) of the SCHED_FIFO / SCHED_RR threads of process `pid`."""
    threads = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            policy, priority = os.sched_getscheduler(int(task.name)), os.sched_getparam(int(task.name)).sched_priority
            name = (task / "comm").read_text().strip()
        except (OSError, ProcessLookupError):
            continue  # the thread ended
        if policy in (os.SCHED_FIFO, os.SCHED_RR):
            threads.append((name, priority))
    return sorted(threads, key=lambda t: -t[1])


def noise(frames: int, seed: int) -> np.ndarray:
    """Stereo noise, `frames` rounded up to whole blocks."""
    frames = -(-frames // PERIOD) * PERIOD
    return (0.2 * np.random.default_rng(seed).standard_normal((frames, 2))).astype(np.float32)


def xrun_blocks(rec: Recording, latency: int) -> np.ndarray:
    """Recorded blocks a JACK xrun may have disturbed: a block the probe missed, the blocks up to
    `latency` after it (jalv's output there comes from before the missed cycle), and one more:
    with the transport rolling, the first block after a skipped cycle is processed before the
    engine learns from the next block that the host skipped, so its audio sits one skip early."""
    hit = np.zeros(rec.blocks, bool)
    for g in rec.missed():
        hit[g:g + latency // PERIOD + 2] = True
    return hit


def until_jack_ran(measure, what: str, jack_path_ok=lambda rec: True) -> Recording:
    """`measure()` → a Recording, measured again while JACK itself missed a fifth or more of the
    probe's cycles (on a loaded VM the whole JACK graph can stall for seconds), or while a path
    through JACK alone (no plugin on it: `jack_path_ok`) came out wrong on cycles JACK did not
    report, up to ATTEMPTS times; the test fails when JACK never ran."""
    for _ in range(ATTEMPTS):
        rec = measure()
        missed = rec.missed().size
        if missed < 0.2 * rec.blocks and jack_path_ok(rec):
            return rec
        report(f"{what}: JACK missed {missed} of {rec.blocks} cycles ({rec.xruns} xruns) or garbled its own "
               "path, measuring again")
    pytest.fail(f"{what}: JACK missed most of its cycles in each of {ATTEMPTS} runs")


def classify_blocks(rec: Recording, channels: slice, x: np.ndarray, latency: int, wet_gain: float
                    ) -> dict[str, np.ndarray]:
    """Each recorded block of jalv's output (`channels` of the recording) from `latency` on,
    against the input `x` delayed by exactly `latency`: "wet" (the engine's output, wet_gain ×
    the input), "dry" (the plugin's own input: the reply was late), "xrun" (a block a JACK
    xrun disturbed, see xrun_blocks) or "other" (none of these: a wrong delay or wrong audio)."""
    out = rec.audio[:, channels]
    first = latency // PERIOD
    n = min(rec.blocks, (x.shape[0] + latency) // PERIOD) - first
    got = out[latency:latency + n * PERIOD].reshape(n, PERIOD, 2)
    want = x[:n * PERIOD].reshape(n, PERIOD, 2)
    xrun = xrun_blocks(rec, latency)[first:first + n]
    dry = ~xrun & np.all(got == want, axis=(1, 2))
    wet = ~xrun & ~dry & np.all(got == wet_gain * want, axis=(1, 2))
    return {"wet": wet, "dry": dry, "xrun": xrun, "other": ~(xrun | dry | wet)}


# -- (a) latency ----------------------------------------------------------------------------------

def jalv_latency_ranges(latency: int) -> tuple[bool, bool, bool, dict]:
    """Wait (10 s at most) until the probe is wired to jalv and jalv's ports carry `latency` →
    (wired, as JACK's latency model puts it, as jalv 1.6 puts it, `jack_lsp -l`). JACK's model
    puts a client's delay on its outputs' capture range (and its inputs' playback range); jalv
    1.6 (Debian 12) computes the right number but publishes it on the other range of each port:
    its outputs' playback and its inputs' capture latency."""
    deadline = time.monotonic() + 10
    while True:
        connections = subprocess.run(["jack_lsp", "-c"], capture_output=True, text=True, timeout=10).stdout
        ports = jack_latencies()
        out_l, in_l = ports.get(f"{HOST}:out_l", {}), ports.get(f"{HOST}:in_l", {})
        jack_model = out_l.get("capture") == (latency, latency) and in_l.get("playback") == (latency, latency)
        jalv_16 = out_l.get("playback") == (latency, latency) and in_l.get("capture") == (latency, latency)
        wired = re.search(rf"^{HOST}:out_r\n(\s+.*\n)*?\s+probe-rec:in_3$", connections, re.M) is not None
        if (wired and (jack_model or jalv_16)) or time.monotonic() > deadline:
            return wired, jack_model, jalv_16, ports
        time.sleep(0.05)


@needs_host
def test_jalv_reports_the_latency_and_delays_by_exactly_that(build, served, host, tmp_path):
    with ControlClient(served.endpoint) as ctl:
        ctl.set("dry", 0.5)  # the engine's output is 0.5 × its input: wet told from dry
        latency = ctl.state().stream.latency_samples
    assert latency == 2 * PERIOD  # the handshake: jitter 2 (the plugin's default) × the host's block
    assert host.monitors()["latency"] == latency  # the plugin's latency port, read by jalv

    x = noise(3 * SR, seed=1)
    wiring = [("src:out_1", f"{HOST}:in_l"), ("src:out_2", f"{HOST}:in_r"),
              ("src:out_1", "rec:in_1"),  # the direct path: JACK's own delay
              (f"{HOST}:out_l", "rec:in_2"), (f"{HOST}:out_r", "rec:in_3")]
    seen: list = []

    def measure() -> Recording:
        probe = Probe(build, tmp_path, x, 3, wiring)
        if not seen:  # what jalv tells JACK, once the probe's 0-latency ports surround it
            seen.append(jalv_latency_ranges(latency))
        return probe.result()

    def direct_path_exact(rec: Recording) -> bool:  # src → rec, JACK alone
        ran = np.repeat(~np.isin(np.arange(rec.blocks), rec.missed()), PERIOD)
        return bool(np.array_equal(rec.audio[ran, 0], x[ran, 0]))

    rec = until_jack_ran(measure, "latency", direct_path_exact)
    wired, jack_model, jalv_16, ports = seen[0]
    out_l, in_l = ports.get(f"{HOST}:out_l"), ports.get(f"{HOST}:in_l")
    report(f"JACK latency ranges: {HOST}:out_l {out_l}, {HOST}:in_l {in_l}: "
           f"{'JACK model' if jack_model else 'jalv 1.6 placement' if jalv_16 else 'neither'}")
    assert wired, "the probe's connections never showed up"
    assert jack_model or jalv_16, ports

    audio = rec.audio
    missed = rec.missed()  # cycles JACK xruns cost the probe
    assert missed.size < 0.2 * rec.blocks, f"JACK itself could not keep time ({rec.xruns} xruns)"
    ran = np.repeat(~np.isin(np.arange(rec.blocks), missed), PERIOD)
    np.testing.assert_array_equal(audio[ran, 0], x[ran, 0])  # src → rec: JACK itself adds 0 frames
    # the lag, by cross-correlation over the whole recording: an integer, no tolerance
    n = 2 * x.shape[0]
    spectrum = np.fft.rfft(np.nan_to_num(audio[:, 1]), n) * np.conj(np.fft.rfft(x[:, 0], n))
    lag = int(np.argmax(np.fft.irfft(spectrum, n)[:x.shape[0]]))
    blocks = classify_blocks(rec, slice(1, 3), x, latency, wet_gain=0.5)
    report(f"latency: handshake {latency}, jalv's port {latency}, measured lag {lag} samples (JACK's own: 0, "
           f"{rec.blocks - missed.size} cycles); "
           f"blocks wet {blocks['wet'].sum()}, dry {blocks['dry'].sum()}, disturbed by JACK xruns "
           f"{blocks['xrun'].sum()} ({rec.xruns} xruns), other {blocks['other'].sum()}")
    assert lag == latency
    head = audio[:latency, 1:]
    assert not head[~np.isnan(head)].any()  # silence until the signal has been through the plugin
    assert not blocks["other"].any()  # every block: the engine's output or the dry input, at exactly the latency
    assert blocks["wet"].sum() >= 0.8 * (~blocks["xrun"]).sum()
    wet = (np.flatnonzero(blocks["wet"])[0]) * PERIOD
    for wrong in (latency - 1, latency + 1):  # no other lag fits
        assert not np.array_equal(audio[wrong + wet:wrong + wet + PERIOD, 1:], 0.5 * x[wet:wet + PERIOD])


# -- (b) real time: wet blocks on time ----------------------------------------------------------------

@needs_host
def test_wet_blocks_arrive_on_time_for_ten_seconds(build, served, host, tmp_path):
    with ControlClient(served.endpoint) as ctl:
        ctl.set("dry", 0.5)
        latency = ctl.state().stream.latency_samples
    x = noise(10 * SR, seed=2)
    window: dict = {}

    def measure() -> Recording:  # the plugin's port and the engine's counters over the recording
        window["before"], window["stats_before"] = host.monitors(), dict(served.server.stats)
        rec = Probe(build, tmp_path, x, 2, [("src:out_1", f"{HOST}:in_l"), ("src:out_2", f"{HOST}:in_r"),
                                            (f"{HOST}:out_l", "rec:in_1"), (f"{HOST}:out_r", "rec:in_2")]).result()
        window["after"], window["stats"] = host.monitors(), dict(served.server.stats)
        return rec

    rec = until_jack_ran(measure, "10 s")
    before, stats_before, after, stats = (window[k] for k in ("before", "stats_before", "after", "stats"))
    blocks = classify_blocks(rec, slice(0, 2), x, latency, wet_gain=0.5)
    total, disturbed = blocks["wet"].size, blocks["xrun"].sum()
    concealed = after["concealed"] - before["concealed"]
    report(f"10 s in jalv ({total} blocks): wet {blocks['wet'].sum()}, dry {blocks['dry'].sum()}, disturbed by "
           f"JACK xruns {disturbed} ({rec.xruns} xruns); the plugin's concealed port +{concealed:g} over the "
           f"whole window; the engine: concealed +{stats['concealed'] - stats_before['concealed']}, "
           f"late +{stats['late'] - stats_before['late']}")
    assert before["connected"] == after["connected"] == 1.0
    # what keeps replies on time on a loaded machine: with jalv's JACK thread real-time, the
    # plugin's network thread and ZeroMQ's I/O thread run SCHED_FIFO 1 (below it), and so do the
    # server's audio thread and its ZeroMQ I/O thread (ServeOptions.realtime), where permitted
    threads, permitted = realtime_threads(host.proc.pid), realtime_permitted()
    audio_thread = served.server.audio.thread.native_id
    report(f"real-time threads in jalv: {threads}; the server's audio thread: "
           f"{'SCHED_FIFO' if os.sched_getscheduler(audio_thread) == os.SCHED_FIFO else 'normal'} "
           f"(real-time permitted: {permitted})")
    host_realtime = any(priority > 1 for _, priority in threads)
    plugin = sorted(name for name, priority in threads if priority == 1)
    assert len(plugin) >= 2 and "ZMQbg/IO/0" in plugin if host_realtime and permitted else not plugin
    assert served.server.realtime == permitted
    assert (os.sched_getscheduler(audio_thread) == os.SCHED_FIFO) == permitted
    assert not blocks["other"].any()
    assert blocks["dry"].sum() < 0.02 * total  # replies on time: < 2 % of the blocks played dry
    # the port counts every block played dry (its window holds the recording's and a little more);
    # blocks around JACK's own xruns may play dry too, and are the host's loss, not the plugin's
    assert blocks["dry"].sum() <= concealed < 0.02 * total + disturbed


# -- (c) JACK transport → time:Position → the engine's grid; a trigger lands on a bar line ---------------

TEMPO, METER = 100.0, 3               # not the engine's default 120 BPM 4/4: the engine must follow
BAR = int(METER * 60 * SR / TEMPO)    # 79380 samples: a whole number at this tempo and rate
assert BAR * TEMPO == METER * 60 * SR


@dataclass
class Vamp:
    """One run of the transport scenario: what the engine reported and what jalv played."""
    synced: object      # the engine's State once on the host's grid, a bar in
    job: object         # the trigger's job (JobInfo) once swapped in
    rec: Recording
    x: np.ndarray
    since: int          # the first block of this run in served.blocks
    syncs: int          # grid syncs in this run (1: the start; more: the host's position jumped)
    skips: int          # cycles JACK skipped (xruns) that the engine's clock skipped too


def roll_and_trigger(build: Path, served: Served, host: Jalv, tmp: Path, seed: int) -> Vamp:
    """JACK's transport rolls from bar 0 at TEMPO, METER/4 (the probe is the timebase master);
    once the engine follows it and a bar has played, jalv's console presses the trigger port;
    the run ends a bar after the swap."""
    x = noise(7 * BAR, seed=seed)
    with ControlClient(served.endpoint) as ctl:
        stats = served.server.stats
        since, syncs, skips = len(served.blocks), stats["transport_syncs"], stats["timeline_skips"]
        probe = Probe(build, tmp, x, 2, [("src:out_1", f"{HOST}:in_l"), ("src:out_2", f"{HOST}:in_r"),
                                         (f"{HOST}:out_l", "rec:in_1"), (f"{HOST}:out_r", "rec:in_2")],
                      tempo=(TEMPO, METER), roll=True)
        deadline = time.monotonic() + 20
        while not ((s := ctl.state()).stats["transport_syncs"] > syncs and s.synced and s.bpm == TEMPO
                   and s.bar >= 1 and s.beat >= 0.5):  # this run's grid (synced at its start), a bar in
            assert time.monotonic() < deadline and probe.proc.poll() is None, f"the engine never synced: {s}"
            time.sleep(0.02)
        previous = s.job.id if s.job is not None else None
        host.send("set trigger 1")
        deadline = time.monotonic() + 20
        while ((job := ctl.state().job) is None or job.id == previous or job.swap_at is None
               or served.engine.core.now < job.swap_at + BAR):
            assert time.monotonic() < deadline and probe.proc.poll() is None, f"no swap in time: {job}"
            time.sleep(0.02)
        host.send("set trigger 0")
        rec = probe.result()
    return Vamp(s, job, rec, x, since, stats["transport_syncs"] - syncs, stats["timeline_skips"] - skips)


@needs_host
def test_the_engine_follows_jack_transport_and_a_trigger_lands_on_a_bar_line(build, served, host, tmp_path):
    """Exact on the host's timeline: the engine's grid at a block is the host's BBT there; the
    vamp's window and its swap are on the host's bar lines, to the sample; its audio leaves jalv
    exactly `latency` later.

    JACK xruns: cycles JACK skips are followed by the engine's clock (the server's timeline
    skips) and a position misread for one cycle is ignored. Under heavier xruns JACK's BBT can
    lag its frame by a cycle (the timebase master missed it): the grid then re-syncs to it, and
    a vamp already aimed keeps its engine-sample target (the scheduler does not re-aim), so a
    run with any re-sync after the first is measured again, up to ATTEMPTS times."""
    engine = served.engine
    with ControlClient(served.endpoint) as ctl:
        ctl.set("dry", 0.0)  # the engine's output: silence until the vamp swaps in, then the loop
        latency = ctl.state().stream.latency_samples
        triggers_before = served.server.stats["triggers"]
        host.send("set bars 1")
        for attempt in range(1, ATTEMPTS + 1):
            run = roll_and_trigger(build, served, host, tmp_path, seed=2 + attempt)
            steady = run.syncs == 1 and run.rec.transport_steady() and run.rec.missed().size < 0.2 * run.rec.blocks
            report(f"attempt {attempt}: JACK xruns {run.rec.xruns}, skipped cycles followed {run.skips}, grid "
                   f"syncs {run.syncs}{'' if steady else ': the host position jumped, measuring again'}")
            if steady:
                break
            ctl.command("clear")
        else:
            pytest.fail(f"JACK's transport jumped (xruns) in each of {ATTEMPTS} runs: nothing to measure")
    synced, job, rec, x = run.synced, run.job, run.rec, run.x

    # the engine follows the host: tempo, meter, and its bar/beat at a block = the host's BBT there
    assert synced.bpm == TEMPO and synced.beats_per_bar == METER
    frame = served.host_frame(synced.now)
    host_beats = frame * TEMPO / (60 * SR)
    assert (synced.bar, synced.beat) == (int(host_beats // METER), pytest.approx(host_beats % METER, abs=1e-6))
    bbt = rec.cycles[(rec.cycles[:, 1] == 1) & (rec.cycles[:, 2] <= frame)][-1]  # the host's own BBT there
    cycle_beats = (bbt[4] - 1) * METER + (bbt[5] - 1) + bbt[6] / 1920 + (frame - bbt[2]) * TEMPO / (60 * SR)
    assert bbt[3] == 1 and cycle_beats == pytest.approx(host_beats, abs=1 / 1920)

    # the trigger came from the plugin's ports, through jalv: the last bar of the input (bars 1),
    # a window on the host's grid
    assert served.server.stats["triggers"] == triggers_before + attempt
    assert job.status in ("ok", "running") and job.source == "input"  # running: still streaming in
    window = [served.host_frame(k) for k in engine.scheduler.jobs[job.id].window]
    assert window[0] % BAR == 0 and window[1] == window[0] + BAR
    # the swap, on the host's timeline: exactly a bar line
    swap = served.host_frame(job.swap_at)
    report(f"transport {TEMPO:g} BPM {METER}/4 → engine {synced.bpm:g} BPM {synced.beats_per_bar}/4; "
           f"vamped host frames {window}; swap at engine sample {job.swap_at} = host frame {swap} = bar "
           f"{swap / BAR:g} (offset from the bar line: {swap % BAR} samples); its audio at host frame {swap + latency}")
    assert swap % BAR == 0 and swap // BAR >= 2

    # …the loop starts there: the engine's output is silence before the bar line, the loop from it
    # (a streamed take may still be arriving: what the engine played is its output ring)
    played = engine.core.output_ring.read(job.swap_at - BAR, job.swap_at + BAR)
    assert not played[:BAR].any() and played[BAR:BAR + FADE].any()
    # …and jalv plays exactly that, `latency` samples later on the host's timeline (the delay the
    # host compensates). A block whose reply was late is the plugin's own input instead; blocks
    # JACK xruns disturbed are left out.
    at = rec.index_of_transport_frame(swap + latency)
    out = rec.audio
    assert BAR < at < out.shape[0] - BAR
    index = np.arange(at - BAR, at + BAR)
    block = index // PERIOD
    late = [k for k in np.unique(block)
            if np.array_equal(out[k * PERIOD:(k + 1) * PERIOD], x[k * PERIOD - latency:(k + 1) * PERIOD - latency])]
    disturbed = xrun_blocks(rec, latency)[block]
    check = ~np.isin(block, late) & ~disturbed
    report(f"around the swap (2 bars): {np.unique(block[check]).size} blocks from the engine checked, "
           f"{len(late)} played dry, {np.unique(block[disturbed]).size} disturbed by xruns")
    np.testing.assert_array_equal(out[index[check]], played[check])
    assert check.sum() > 1.5 * BAR


# -- (d) MIDI from a JACK MIDI port; CURVE -----------------------------------------------------------

@needs_host
def test_jack_midi_into_jalv_reaches_the_engine(build, served, host, tmp_path):
    """CC and notes on a JACK MIDI port → jalv's event port → the plugin → the engine's MIDI learn."""
    with ControlClient(served.endpoint) as ctl:
        assert ctl.learn("temperature", kind="cc", number=74, min=0.5, max=1.5) == "bound"
        assert ctl.learn("bars", kind="note", number=60, min=1, max=16) == "bound"
        before = ctl.state()
        tenth = SR // 10  # in order, a tenth of a second apart: CC 74 = 0, 127; note 60 on (127), off
        events = [(2 * tenth, bytes([0xB0, 74, 0])), (3 * tenth, bytes([0xB0, 74, 127])),
                  (4 * tenth, bytes([0x90, 60, 127])), (5 * tenth, bytes([0x80, 60, 0]))]
        Probe(build, tmp_path, noise(6 * tenth, seed=4), 1, [("src:midi_out", f"{HOST}:events")],
              midi=events).result()
        deadline, polls = time.monotonic() + 5, 0
        while (state := ctl.state()).params["temperature"] != 1.5 or state.params["bars"] != 1:
            polls += 1
            assert time.monotonic() < deadline, f"the MIDI did not reach the engine: {state.params}"
            time.sleep(0.02)
        ctl.forget("*")
        ctl.set("bars", 2)
        ctl.set("temperature", 1.0)
    # the four MIDI messages (one request each) and the getstate polls; their order: the last
    # CC value, and note off after note on
    assert state.stats["requests"] - before.stats["requests"] == 4 + polls + 1
    assert state.params["temperature"] == 1.5 and state.params["bars"] == 1
    assert before.params["temperature"] == 1.0 and before.params["bars"] == 2


@needs_host
def test_the_plugin_in_jalv_speaks_curve(build, jack, worker, tmp_path):
    """An engine behind CURVE (`rtvamp keys`): the plugin with the keys (RTVAMP_KEYS) streams;
    one with another client's keys is refused, and passes its input through, at its latency."""
    keys, other = generate_keys(tmp_path / "keys"), generate_keys(tmp_path / "other")
    stranger_keys = tmp_path / "stranger"  # the engine's public key, a client keypair it has not authorised
    stranger_keys.mkdir()
    shutil.copy(keys / "server.key", stranger_keys / "server.key")
    shutil.copy(other / "client.key_secret", stranger_keys / "client.key_secret")
    server, engine, endpoint = serve(worker, keys=ServerKeys.load(keys))
    good = bad = None
    try:
        with ControlClient(endpoint, keys=ClientKeys.load(keys)) as ctl:
            ctl.set("dry", 0.5)  # the engine's output is 0.5 × its input
        good = Jalv(build, endpoint, "rtvamp-curve", RTVAMP_KEYS=str(keys))
        bad = Jalv(build, endpoint, "rtvamp-stranger", RTVAMP_KEYS=str(stranger_keys))
        good.wait_ports()
        bad.wait_ports()
        assert good.wait_connected()["connected"] == 1.0
        deadline = time.monotonic() + 10
        while server.stats["unauthenticated"] < 1:
            assert time.monotonic() < deadline, "the stranger's handshake never failed"
            time.sleep(0.05)
        x = noise(SR, seed=5)
        wiring = [("src:out_1", "rtvamp-curve:in_l"), ("src:out_2", "rtvamp-curve:in_r"),
                  ("src:out_1", "rtvamp-stranger:in_l"), ("src:out_2", "rtvamp-stranger:in_r"),
                  ("rtvamp-curve:out_l", "rec:in_1"), ("rtvamp-curve:out_r", "rec:in_2"),
                  ("rtvamp-stranger:out_l", "rec:in_3"), ("rtvamp-stranger:out_r", "rec:in_4")]
        rec = until_jack_ran(lambda: Probe(build, tmp_path, x, 4, wiring).result(), "CURVE")
        latency = 2 * PERIOD
        authorised = classify_blocks(rec, slice(0, 2), x, latency, wet_gain=0.5)
        stranger = classify_blocks(rec, slice(2, 4), x, latency, wet_gain=0.5)
        m = bad.monitors()
        report(f"CURVE: the authorised plugin's blocks: {authorised['wet'].sum()} from the engine, "
               f"{authorised['dry'].sum()} dry; the stranger's: {stranger['dry'].sum()} dry, {stranger['wet'].sum()} "
               f"from the engine (connected={m['connected']:g}); unauthenticated handshakes "
               f"{server.stats['unauthenticated']}")
    finally:
        for jalv in (good, bad):
            if jalv is not None:
                jalv.close()
        server.close()
        engine.close()
    assert server.stats["processed"] > SR // PERIOD and server.stats["sessions"] == 1
    assert m["connected"] == 0.0 and m["latency"] == latency
    assert not authorised["other"].any() and not stranger["other"].any()
    assert authorised["wet"].sum() >= 0.8 * (~authorised["xrun"]).sum()  # through the engine, at the latency
    # the stranger plays its own input, `latency` later: never silence, the latency kept
    assert not stranger["wet"].any() and stranger["dry"].sum() == (~stranger["xrun"]).sum()


# -- the server's side of a host's xruns (no JACK needed) -------------------------------------------

def test_the_engine_follows_a_host_that_skips_cycles(worker):
    """A DAW at 120 BPM whose timeline skips blocks (an xrun: JACK skips whole cycles) while a vamp
    is aimed, and misreports one block's position: the engine's clock skips with it, so the vamp
    still lands on the DAW's bar line, to the sample, and the grid never re-syncs."""
    from rtvamp.synth import groove

    served = logged(*serve(worker))
    server, engine, endpoint = served.server, served.engine, served.endpoint
    engine.core.post("gains", 0.0, 1.0)
    bar = 2 * SR
    x = np.repeat(groove(bars=12, bpm=120, seed=2)[:, None], 2, axis=1).astype(np.float32)
    skip_at = {3: 1, 8: 2, 30: 1}       # blocks after the trigger → cycles the DAW skips there
    glitch_at = 12                       # …and where it reports a block's position a cycle late
    try:
        with ControlClient(endpoint) as ctl, AudioStream(endpoint, block_frames=PERIOD) as stream:
            t, triggered, job = 0, None, None
            deadline = time.monotonic() + 120

            def play(at: int, sample_time: int) -> np.ndarray:  # the groove, looped
                return stream.process(x[np.arange(at, at + PERIOD) % x.shape[0]], sample_time=sample_time,
                                      transport=DawTransport.at(sample_time, SR, 120.0))

            while job is None or job.swap_at is None or engine.core.now < job.swap_at + 16 * PERIOD:
                assert time.monotonic() < deadline, f"no swap: {job}"
                after = None if triggered is None else stream.sequence - triggered
                t += PERIOD * skip_at.get(after, 0)
                if after == glitch_at:
                    play(t, t + PERIOD)
                    t += PERIOD
                play(t, t)
                t += PERIOD
                if triggered is None and t >= 2 * bar:
                    job_id, triggered = ctl.trigger(source="input", bars=1, steps="fast", variations=1), stream.sequence
                    job = engine.scheduler.jobs[job_id]
                if job is not None and job.status == "running":
                    time.sleep(0.01)  # a DAW plays in real time (the streamed result's pieces
                    # come while the first ones already play): give the worker its time
        stats = dict(server.stats)
    finally:
        server.close()
        engine.close()
    assert job.swap_at is not None, f"no swap: {job.status}"
    swap = served.host_frame(job.swap_at)
    report(f"a host skipping cycles: {stats['timeline_skips']} skips followed, {stats['timeline_glitches']} misread "
           f"position ignored, grid syncs {stats['transport_syncs']}; swap at engine sample {job.swap_at} = DAW "
           f"frame {swap} (bar {swap / bar:g})")
    # the vamp lands on the DAW's bar line, to the sample: the engine's output is silence before
    # it and the loop from it (read from the engine's own output: a reply the client received
    # late on a loaded machine would be concealed, which test (b) covers, not this one)
    assert swap % bar == 0
    around = engine.core.output_ring.read(job.swap_at - 8 * PERIOD, job.swap_at + FADE)
    assert not around[:8 * PERIOD].any() and around[8 * PERIOD:].any()
    # the engine's clock skipped with the DAW (the engine sample is the DAW frame: both began at 0),
    # the misread position was ignored, and the grid never had to move
    assert job.swap_at == swap
    assert stats["timeline_skips"] == len(skip_at) and stats["timeline_glitches"] == 1
    assert stats["transport_syncs"] == 1
