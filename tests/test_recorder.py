"""SessionRecorder (exact audio, events, starvation, SIGKILL crash safety, recover) and loop storage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile

from rtvamp.engine import recorder as recorder_module
from rtvamp.engine.recorder import (LoopFileError, LoopLibrary, RecorderError, SessionRecorder, load_loop,
                                    recover, save_loop)
from rtvamp.engine.ring import AudioRing

RATE = 48000
BLOCK = 256
REPO = Path(__file__).resolve().parents[1]


def deterministic_signal(start: int, frames: int, channels: int) -> np.ndarray:
    """float32 [frames, channels]: a hash of the absolute sample index (any span is reproducible)."""
    idx = np.arange(start, start + frames, dtype=np.uint64)[:, None] * np.uint64(channels + 1)
    idx = idx + np.arange(channels, dtype=np.uint64)[None, :]
    h = (idx * np.uint64(2654435761)) % np.uint64(1 << 24)
    return (h.astype(np.float32) / np.float32(1 << 23) - np.float32(1.0)) * np.float32(0.9)


def write_blocks(rings: dict[str, AudioRing], start: int, frames: int, pace: float | None = None) -> None:
    """Write [start, start + frames) of each ring's signal in BLOCK-frame blocks, at `pace` × real time."""
    t0 = time.perf_counter()
    for pos in range(start, start + frames, BLOCK):
        n = min(BLOCK, start + frames - pos)
        for ring in rings.values():
            ring.write(deterministic_signal(pos, n, ring.channels))
        if pace is not None:
            delay = t0 + (pos + n - start) / (RATE * pace) - time.perf_counter()
            if delay > 0:
                time.sleep(delay)


def read_wav(path: Path) -> np.ndarray:
    audio, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    assert rate == RATE
    return audio


# -- recording ----------------------------------------------------------------------------------


def test_records_exact_audio_frames_and_events(tmp_path):
    rings = {"input": AudioRing(RATE, 2, guard_frames=256), "output": AudioRing(RATE // 2, 1, guard_frames=256)}
    write_blocks(rings, 0, 1000)  # written before start(): not recorded
    rec = SessionRecorder(tmp_path / "s", RATE, rings, flush_interval_s=0.1)
    total = 2 * RATE
    with rec:
        writer = threading.Thread(target=write_blocks, args=(rings, 1000, total, 1.0))
        writer.start()
        rec.log_event("trigger", 1234, bar=np.int64(3), preset="drums", seeds=np.arange(2))
        time.sleep(0.5)
        assert soundfile.info(str(tmp_path / "s" / "input.wav")).frames > 0  # header kept current
        rec.log_event("swap", 5678, candidate=1)
        writer.join()
    assert rec.frames_written == {"input": total, "output": total}
    assert rec.dropped_frames == {"input": 0, "output": 0}
    for name, ring in rings.items():
        np.testing.assert_array_equal(read_wav(tmp_path / "s" / f"{name}.wav"),
                                      deterministic_signal(1000, total, ring.channels))
    doc = json.loads((tmp_path / "s" / "session.json").read_text())
    assert doc["sample_rate"] == RATE and doc["closed"] is True
    assert doc["tracks"]["input"] == {"file": "input.wav", "channels": 2, "start_sample": 1000,
                                      "frames": total, "dropped_frames": 0}
    assert doc["tracks"]["output"]["channels"] == 1
    assert [(e["kind"], e["sample"], e["info"]) for e in doc["events"]] == [
        ("trigger", 1234, {"bar": 3, "preset": "drums", "seeds": [0, 1]}), ("swap", 5678, {"candidate": 1})]
    with pytest.raises(RuntimeError):
        rec.log_event("late", 0)


def test_refuses_to_overwrite_a_session_and_bad_track_names(tmp_path):
    rings = {"input": AudioRing(1024, 1, guard_frames=256)}
    with SessionRecorder(tmp_path, RATE, rings):
        pass
    with pytest.raises(FileExistsError):
        SessionRecorder(tmp_path, RATE, rings).start()
    with pytest.raises(ValueError):
        SessionRecorder(tmp_path / "x", RATE, {"../input": AudioRing(1024, 1, guard_frames=256)})


def test_starved_recorder_records_silence_for_the_gap(tmp_path):
    rings = {"input": AudioRing(8192, 2, guard_frames=256)}
    rec = SessionRecorder(tmp_path, RATE, rings, flush_interval_s=60.0)  # the thread never wakes
    rec.start()
    total = 5 * 8192
    write_blocks(rings, 0, total)
    rec.stop()
    guard = 256
    lost = total - 8192 + guard
    assert rec.dropped_frames == {"input": lost}
    assert rec.frames_written == {"input": total}
    audio = read_wav(tmp_path / "input.wav")
    assert not audio[:lost].any()
    np.testing.assert_array_equal(audio[lost:], deterministic_signal(lost, total - lost, 2))


class LappingRing(AudioRing):
    """A ring whose writer advances by `lap` frames while the recorder's first read copies."""

    def __init__(self, capacity_frames: int, channels: int, lap: int) -> None:
        super().__init__(capacity_frames, channels, guard_frames=256)
        self.lap = lap

    def read(self, start, stop, out=None):
        if self.lap:
            write_blocks({"r": self}, self.written, self.lap)
            self.lap = 0
        return super().read(start, stop, out)


@pytest.mark.parametrize("lap", [1024, 4096], ids=["too-close-after-copy", "overwritten"])
def test_writer_lapping_a_read_gives_silence_not_torn_audio(tmp_path, lap):
    ring = LappingRing(8192, 1, lap)
    with SessionRecorder(tmp_path, RATE, {"output": ring}, flush_interval_s=60.0) as rec:
        write_blocks({"r": ring}, 0, 8192)  # full ring: frames [0, 256) are inside the guard
    lost = 256 + lap
    assert rec.dropped_frames["output"] == lost and rec.frames_written["output"] == 8192
    audio = read_wav(tmp_path / "output.wav")
    assert not audio[:lost].any()
    np.testing.assert_array_equal(audio[lost:], deterministic_signal(lost, 8192 - lost, 1))


def test_wav_size_limit_stops_with_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(recorder_module, "_WAV_DATA_LIMIT_BYTES", 4 * 3000)
    rings = {"input": AudioRing(8192, 1, guard_frames=256)}
    rec = SessionRecorder(tmp_path, RATE, rings, flush_interval_s=60.0)
    rec.start()
    write_blocks(rings, 0, 4000)
    with pytest.raises(RecorderError, match="4 GiB"):
        rec.stop()
    assert soundfile.info(str(tmp_path / "input.wav")).frames == 0


# -- crash safety -------------------------------------------------------------------------------

CHILD = f"""
import sys, time
from pathlib import Path
sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(REPO / 'tests')!r})
from test_recorder import BLOCK, RATE, write_blocks
from rtvamp.engine.recorder import SessionRecorder
from rtvamp.engine.ring import AudioRing
rings = {{"input": AudioRing(RATE, 2, guard_frames=256), "output": AudioRing(RATE, 1, guard_frames=256)}}
rec = SessionRecorder(Path(sys.argv[1]), RATE, rings, flush_interval_s=0.25)
rec.start()
t0, n = time.perf_counter(), 0
while True:
    write_blocks(rings, n, BLOCK)
    n += BLOCK
    print(n, flush=True)
    time.sleep(max(0.0, t0 + n / RATE - time.perf_counter()))
"""


def test_sigkill_loses_at_most_a_second_and_keeps_samples_exact(tmp_path):
    folder = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(folder)], stdout=subprocess.PIPE, text=True)
    watchdog = threading.Timer(30, child.kill)
    watchdog.start()
    line = "0"
    try:
        for line in child.stdout:
            if int(line) >= 3 * RATE:
                break
        os.kill(child.pid, signal.SIGKILL)
        lines = [line] + [rest for rest in child.stdout.read().splitlines(keepends=True) if rest.endswith("\n")]
    finally:
        watchdog.cancel()
        child.kill()
        child.wait()
    printed = int(lines[-1])  # frames the child had written to its rings before the kill (or more)
    assert printed >= 3 * RATE, "the child did not reach 3 s of audio"
    for name, channels in (("input", 2), ("output", 1)):
        audio = read_wav(folder / f"{name}.wav")  # reads as it is, without recover()
        assert printed - RATE <= len(audio) <= printed + BLOCK
        np.testing.assert_array_equal(audio, deterministic_signal(0, len(audio), channels))
    assert json.loads((folder / "session.json").read_text())["closed"] is False

    before = len(read_wav(folder / "input.wav"))
    assert recover(folder) == [folder / "input.wav", folder / "output.wav"]
    doc = json.loads((folder / "session.json").read_text())
    for name, channels in (("input", 2), ("output", 1)):
        audio = read_wav(folder / f"{name}.wav")
        assert before <= len(audio) <= printed + BLOCK
        np.testing.assert_array_equal(audio, deterministic_signal(0, len(audio), channels))
        assert doc["tracks"][name]["frames"] == len(audio) and doc["recovered"] is True


def test_recover_restores_the_tail_after_the_last_header_update(tmp_path):
    rings = {"input": AudioRing(8192, 2, guard_frames=256)}
    with SessionRecorder(tmp_path, RATE, rings):
        write_blocks(rings, 0, 1000)
    path = tmp_path / "input.wav"
    tail = deterministic_signal(1000, 2, 2).tobytes()[:12]  # one whole frame + half a frame
    with open(path, "ab") as f:
        f.write(tail)
    assert soundfile.info(str(path)).frames == 1000  # the header still describes the old data
    recover(tmp_path)
    recover(tmp_path)  # idempotent
    np.testing.assert_array_equal(read_wav(path), deterministic_signal(0, 1001, 2))
    assert json.loads((tmp_path / "session.json").read_text())["tracks"]["input"]["frames"] == 1001
    (tmp_path / "junk.wav").write_bytes(b"not a wav file at all")
    with pytest.raises(RecorderError, match="RIFF"):
        recover(tmp_path)


# -- loops --------------------------------------------------------------------------------------

META = {"bars": 2, "bpm": 120.0, "seed": 7, "preset": "drums", "parent": "loop-3", "candidate": 1,
        "created": "2024-05-01T12:00:00Z", "mask": [1, 0, 1]}


def loop_audio(frames: int = 22050, channels: int = 2) -> np.ndarray:
    return deterministic_signal(0, frames, channels)


def test_loop_round_trip_wav_exact_flac_24_bit(tmp_path):
    audio = loop_audio()
    save_loop(tmp_path / "a.wav", audio, 44100, META)
    got, rate, meta = load_loop(tmp_path / "a.wav")
    assert rate == 44100 and meta == META and got.dtype == np.float32
    np.testing.assert_array_equal(got, audio)
    save_loop(tmp_path / "b.flac", audio, 44100, META)
    got, rate, meta = load_loop(tmp_path / "b.json")  # the sidecar path works too
    assert rate == 44100 and meta == META and got.shape == audio.shape
    np.testing.assert_allclose(got, audio, rtol=0, atol=2.0 ** -23)


def test_loop_library_save_list_load(tmp_path):
    lib = LoopLibrary(tmp_path / "lib")
    lib.save("groove B", loop_audio(44100, 1), 44100, {"bars": 2})
    lib.save("groove-A.v2", loop_audio(22050), 44100, META)
    entries = lib.list()
    assert [(e.name, e.seconds) for e in entries] == [("groove B", 1.0), ("groove-A.v2", 0.5)]
    assert entries[1].meta == META and entries[1].path == tmp_path / "lib" / "groove-A.v2.flac"
    audio, rate, meta = lib.load("groove B")
    assert audio.shape == (44100, 1) and rate == 44100 and meta == {"bars": 2}
    assert LoopLibrary(tmp_path / "lib2", "wav").save("x", loop_audio(), 44100, {}).suffix == ".wav"


@pytest.mark.parametrize("name", ["", "../x", "a/b", "a\\b", ".hidden", "x\x00", "trailing ", "x" * 200])
def test_loop_library_refuses_bad_names(tmp_path, name):
    with pytest.raises(ValueError, match="bad loop name"):
        LoopLibrary(tmp_path).save(name, loop_audio(), 44100, {})


def test_loop_errors_are_clear(tmp_path):
    lib = LoopLibrary(tmp_path)
    with pytest.raises(LoopFileError, match="no such loop sidecar"):
        lib.load("missing")
    lib.save("a", loop_audio(), 44100, META)
    (tmp_path / "a.flac").unlink()
    with pytest.raises(LoopFileError, match="no such loop audio"):
        lib.load("a")
    lib.save("b", loop_audio(), 44100, META)
    (tmp_path / "b.flac").write_bytes(b"garbage")
    with pytest.raises(LoopFileError, match="unreadable"):
        lib.load("b")
    lib.save("c", loop_audio(), 44100, META)
    (tmp_path / "c.json").write_text('{"version": 1, "audio": "c.fla')
    with pytest.raises(LoopFileError, match="corrupt"):
        lib.load("c")
    with pytest.raises(LoopFileError, match="corrupt"):
        lib.list()
    save_loop(tmp_path / "d.flac", loop_audio(), 44100, META)
    soundfile.write(str(tmp_path / "d.flac"), loop_audio(100), 44100, subtype="PCM_24")
    with pytest.raises(LoopFileError, match="sidecar says"):
        load_loop(tmp_path / "d.flac")
    with pytest.raises(TypeError):
        save_loop(tmp_path / "e.wav", loop_audio(), 44100, {"obj": object()})
    with pytest.raises(ValueError):
        save_loop(tmp_path / "e.mp3", loop_audio(), 44100, {})
