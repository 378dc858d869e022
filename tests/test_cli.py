"""The command line as a user runs it: real processes, real files, clear errors, no tracebacks."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import soundfile

from conftest import CHECKPOINTS


def rtvamp(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rtvamp.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def test_demo_renders_a_scripted_performance(tmp_path):
    out = tmp_path / "demo.wav"
    proc = rtvamp("demo", "-o", str(out), "--variations", "2", "--steps", "fast")
    assert proc.returncode == 0, proc.stderr
    audio, rate = soundfile.read(out)
    assert rate == 44100 and audio.shape == (14 * 2 * 44100, 2)  # 14 bars at 120 BPM, stereo
    assert np.isfinite(audio).all() and np.abs(audio[12 * 88200:]).max() > 1e-3  # vamped loops still sound
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert "not music" in proc.stderr
    rows = [line for line in proc.stderr.splitlines() if " ok " in line]
    assert len(rows) == 3 and "bar 5" in rows[0] and "bar 8" in rows[1] and "bar 12" in rows[2]


def test_vamp_file_keeps_rate_channels_and_length(tmp_path):
    src = tmp_path / "in.flac"
    rng = np.random.default_rng(0)
    soundfile.write(src, (0.2 * rng.standard_normal((48000 * 2 + 17, 2))).astype(np.float32), 48000)
    proc = rtvamp("vamp", str(src), "-o", str(tmp_path / "out.wav"), "--variations", "2", "--quality", "fast")
    assert proc.returncode == 0, proc.stderr
    for k in (1, 2):
        info = soundfile.info(tmp_path / f"out_{k}.wav")
        assert (info.samplerate, info.channels, info.frames) == (48000, 2, 48000 * 2 + 17)
    a, b = soundfile.read(tmp_path / "out_1.wav")[0], soundfile.read(tmp_path / "out_2.wav")[0]
    assert not np.allclose(a, b), "two seeds must give two variations"


@pytest.mark.parametrize("content,message", [
    (None, "no such file"),
    ("garbage", "not a readable audio file"),
    ("empty", "holds no audio"),
    ("silent", "silent"),
    ("nan", "NaN"),
    ("long", "longer than"),
])
def test_bad_input_gets_a_clear_error(tmp_path, content, message):
    src = tmp_path / "in.wav"
    if content == "garbage":
        src.write_text("not audio")
    elif content == "empty":
        soundfile.write(src, np.zeros(0), 44100)
    elif content == "silent":
        soundfile.write(src, np.zeros(44100), 44100)
    elif content == "nan":
        soundfile.write(src, np.full(4410, np.nan), 44100, subtype="FLOAT")
    elif content == "long":
        soundfile.write(src, np.zeros(44100 * 3), 44100)
    proc = rtvamp("vamp", str(src), "-o", str(tmp_path / "out.wav"), "--max-seconds", "2")
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out.wav").exists()


def test_models_verify_and_list_the_embedded_bundle():
    proc = rtvamp("models", "verify")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("ok") >= 5
    proc = rtvamp("models", "list")
    assert proc.returncode == 0 and "tiny" in proc.stderr


def test_convert_refuses_a_bad_checkpoint_cleanly(tmp_path):
    (tmp_path / "bad.pth").write_bytes((CHECKPOINTS / "coarse.pth").read_bytes()[:1000])
    proc = rtvamp("models", "convert", "--codec", str(CHECKPOINTS / "codec.pth"), "--coarse",
                  str(tmp_path / "bad.pth"), "--c2f", str(CHECKPOINTS / "c2f.pth"), "--out", str(tmp_path / "b"))
    assert proc.returncode == 2
    assert "bad.pth: not a loadable checkpoint" in proc.stderr and "Traceback" not in proc.stderr


def test_verify_refuses_a_tampered_bundle(ref_bundle_dir, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(ref_bundle_dir, copy)
    data = bytearray((copy / "c2f.onnx").read_bytes())
    data[-10] ^= 0xFF
    (copy / "c2f.onnx").write_bytes(bytes(data))
    proc = rtvamp("models", "verify", str(copy))
    assert proc.returncode == 2 and "sha256" in proc.stderr


def test_download_offline_fails_clearly(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    proc = subprocess.run([sys.executable, "-m", "rtvamp.cli", "models", "download", "--out", str(tmp_path / "d")],
                          capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 2
    assert "could not download codec.pth" in proc.stderr and "Traceback" not in proc.stderr
