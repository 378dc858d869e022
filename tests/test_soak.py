"""Soak: the whole instrument against a real JACK server (jackd -d dummy, 256-frame periods) for
60 s, the worker vamping the loop every bar on the tiny model.

On this kind of VM the dummy driver itself misses deadlines now and then — with no client at all,
and with a C client (jack_metro) — and more so while the worker saturates both cores, so "0
xruns" cannot be asserted in absolute terms here. The test first measures that environmental
baseline in the same server: a pass-through client while a worker process vamps continuously
(the same CPU load), and prints it next to the engine's count. Measured here: 1–16 baseline
xruns per 20 s, and the engine at 0.3–0.9 % of its blocks depending on what else the machine
ran. The assertion is what separates a working engine from a broken one on such a machine —
under 2 % of blocks missed (a GIL-holding kernel in the audio process misses over a third) —
plus a callback that stays far inside the block period, sample-exact swaps and no clicks.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from conftest import run_isolated
from jack_server import jack_dummy
from rtvamp.engine.backend import JobResult, LocalWorker
from rtvamp.engine.scheduler import VampParams
from rtvamp.io.audio import SoundCardDriver
from rtvamp.engine.transport import Quantize
from rtvamp.live import LiveOptions, LiveSession
from rtvamp.synth import groove

RATE, BLOCK, SOAK_S, BASELINE_S = 44100, 256, 60.0, 20.0
BAR = 2 * RATE  # 120 BPM


class PassThrough:
    def process(self, in_block, out_block, frame_time):
        np.copyto(out_block, in_block)


def baseline_under_load() -> dict:
    """Pass-through client stats while a worker process vamps back to back for BASELINE_S."""
    audio = np.repeat(groove(bars=1, bpm=120)[:, None], 2, axis=1)
    with LocalWorker() as worker:
        driver = SoundCardDriver(PassThrough(), RATE, BLOCK, 2, "system", "system")
        with driver:
            end = time.monotonic() + BASELINE_S
            while time.monotonic() < end:
                job = worker.submit(audio, RATE, preset="medium-variation", coarse_steps=4, c2f_steps=1)
                while not any(isinstance(e, JobResult) and e.job_id == job for e in worker.events(0.05)):
                    pass
        return driver.stats()


def xrun_rate(stats: dict) -> float:
    return sum(stats["xruns"].values()) / max(stats["blocks"], 1)


def test_sixty_second_soak_vamping_every_bar(tmp_path):
    """Run in a fresh interpreter: in the test process, threads other tests leave behind (ZeroMQ,
    Ray, MIDI) compete with the audio callback for the GIL, which no live session has to face."""
    result = run_isolated(f"""
        import json, sys
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import test_soak
        print(json.dumps({{"report": test_soak.soak(Path({str(tmp_path)!r}))}}))
        """, timeout_s=SOAK_S + BASELINE_S + 240)
    print(result["report"])


def soak(tmp_path: Path) -> str:
    """The soak itself (its assertions fail the isolated run); returns its xrun report."""
    with jack_dummy(RATE, BLOCK):
        baseline = baseline_under_load()
        options = LiveOptions(sample_rate=RATE, block_frames=BLOCK, input_device="system", output_device="system",
                              params=VampParams(steps="fast", variations=1), crossfade_ms=10, dry=0.0,
                              auto_every_loops=1, loops_dir=tmp_path)
        session = LiveSession(options)
        try:
            session.start()
            loop = np.repeat(groove(bars=1, bpm=120)[:, None], 2, axis=1)
            session.scheduler.load_loop(loop, bars=1, quantize=Quantize.BAR)
            time.sleep(SOAK_S)
            stats = session.driver.stats()
            core, sched = session.engine.core, session.scheduler
            end = core.now
            output = core.output_ring.read(max(core.output_ring.oldest(), end - int(SOAK_S * RATE)), end)
            session.scheduler.auto_every_loops = None
            assert session.key("s") and len(list(tmp_path.glob("take-*.flac"))) == 1   # save the take
            before = sched.history.current.id
            assert session.key("[") and sched.history.current.id == before - 1        # recall the one before
            assert session.key("q") is False
        finally:
            session.close()
    swaps = [sample for kind, sample, _ in sched.events_log if kind == "swapped"]
    vamps = [j for j in sched.jobs.values() if j.status == "ok"]
    assert stats["callback_errors"] == 0
    report = (f"xruns: engine {stats['xruns']} in {stats['blocks']} blocks; baseline {baseline['xruns']} "
              f"in {baseline['blocks']}; callback p99 {stats['callback_p99']:.3f}, max {stats['callback_max']:.2f}")
    assert xrun_rate(stats) < 0.02, report
    assert stats["callback_p99"] < 0.25, "the engine's callback must leave most of the block free"
    assert len(vamps) >= SOAK_S / 2 / 2, f"only {len(vamps)} vamps landed"   # at least one every other bar
    assert all(j.swap_at % BAR == 0 for j in vamps), "every vamp is scheduled on a bar line"
    assert all(j.takes is not None for j in vamps), "results were streamed (committed at their first piece)"
    scheduled = {j.swap_at for j in vamps}
    assert set(swaps[1:]) <= scheduled, "swaps happen only where vamps were scheduled (the first is the loaded loop)"
    assert {at for at in scheduled if at < end - BAR} <= set(swaps), "and every scheduled swap happened"
    # no discontinuity beyond what the loops themselves hold plus the crossfade's slope
    fade = int(0.010 * RATE)
    takes = list(sched.history.takes.values())
    peak = max(float(np.abs(t.audio).max()) for t in takes)
    inherent = max(float(np.abs(np.diff(np.concatenate([t.audio, t.audio[:1]]), axis=0)).max()) for t in takes)
    jumps = np.abs(np.diff(output, axis=0)).max()
    assert jumps <= inherent + np.pi / (2 * fade) * 2 * peak + 1e-4
    window = RATE // 10
    playing = output[max(0, swaps[0] - (end - output.shape[0])):]  # from the loaded loop on
    tail = playing[:(playing.shape[0] // window) * window].reshape(-1, window, 2)
    assert np.sqrt((tail ** 2).mean(axis=(1, 2))).min() > 1e-3, "never silent, not even for 100 ms"
    return report
