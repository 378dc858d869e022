"""Session recording (crash-safe WAV + session.json) and storage of loops and variations.

`SessionRecorder` copies the engine's rings (input, output, …) to `<name>.wav` (float32) from a
background thread; the audio thread only writes the rings. After every flush (default every
0.25 s) each WAV header is rewritten by libsndfile (``SFC_UPDATE_HEADER_NOW``), so a session
killed with SIGKILL reads cleanly and lacks at most the audio of one flush interval plus what
was still in the ring. `recover` gets that tail back too.

`save_loop` / `load_loop` / `LoopLibrary` store loops and variations as FLAC (24-bit) or WAV
(float32) files with a JSON sidecar `<name>.json`.
"""

from __future__ import annotations

import os
import re
import struct
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import soundfile
from soundfile import _ffi, _snd

from .ring import AudioRing, RingOverrun

SESSION_FILE = "session.json"
"""Frames (samples per channel) kept between the recorder and the writer's overwrite point: a
span that close to being overwritten is treated as lost, so a block the writer is copying
(≤ this many frames) can never tear a read. Capped at a quarter of the ring."""
_CHUNK_FRAMES = 16384
_SFC_UPDATE_HEADER_NOW = 0x1060  # sndfile.h; soundfile's cffi declarations lack the constant
_WAV_DATA_LIMIT_BYTES = 0xFFFF_FFFF - 65536
"""RIFF sizes are 32-bit: a WAV file holds at most ~4 GiB of data (≈ 3.1 h of stereo float32 at
48 kHz). The recorder stops with an error rather than write a file that readers misread."""
_NAME = re.compile(r"\w(?:[\w .+-]{0,126}\w)?")


class RecorderError(RuntimeError):
    """Recording failed (disk, WAV size limit) or a session's files cannot be repaired."""


class LoopFileError(Exception):
    """A loop's audio file or JSON sidecar is missing, unreadable or inconsistent."""


def _to_builtin(obj: Any) -> Any:
    """msgspec `enc_hook`: NumPy scalars and arrays, paths → JSON-able Python values."""
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise NotImplementedError(f"cannot store {type(obj).__name__} as JSON")


_encoder = msgspec.json.Encoder(enc_hook=_to_builtin)


def _encode_json(obj: Any) -> bytes:
    """JSON bytes of `obj`; TypeError (not msgspec's own error) for values JSON cannot hold."""
    try:
        return _encoder.encode(obj)
    except (NotImplementedError, msgspec.EncodeError) as exc:
        raise TypeError(str(exc)) from None


def _write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` by `data` in one rename (a crash leaves the old or the new file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _check_name(name: str, what: str) -> str:
    """`name` if it is a safe file stem: word characters, space, `.+-` inside, ≤ 128 characters."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"bad {what} name {name!r}: use 1–128 letters, digits, '_' (and ' .+-' "
                         "inside), no path separators")
    return name


# -- session recorder ----------------------------------------------------------------------------


@dataclass
class _Track:
    """One ring recorded to one WAV file; positions are absolute ring sample indices (frames)."""

    name: str
    ring: AudioRing
    file: soundfile.SoundFile
    position: int
    start_sample: int
    scratch: np.ndarray
    silence: np.ndarray
    frames: int = 0
    dropped: int = 0

    @property
    def frame_bytes(self) -> int:
        return 4 * self.ring.channels


class SessionRecorder:
    """Records rings to `<folder>/<name>.wav` (float32) and `<folder>/session.json`.

    `rings` maps a track name (e.g. ``"input"``, ``"output"``) to the `AudioRing` the audio
    thread writes. Recording of each ring starts at its `written` index when `start()` is
    called. A background thread drains the rings every `flush_interval_s` seconds, rewrites each
    WAV header and session.json; it never blocks the writer. A recorder that falls further
    behind than its ring holds writes silence for the frames it lost and counts them in
    `dropped_frames`, so file frame k is always ring sample `start_sample + k`.
    """

    def __init__(self, folder: Path, sample_rate: int, rings: dict[str, AudioRing],
                 flush_interval_s: float = 0.25) -> None:
        if sample_rate <= 0 or flush_interval_s <= 0:
            raise ValueError("sample_rate and flush_interval_s must be positive")
        if not rings:
            raise ValueError("give at least one ring to record")
        for name in rings:
            _check_name(name, "track")
        self.folder = Path(folder)
        self.sample_rate = sample_rate
        self.rings = dict(rings)
        self.flush_interval_s = flush_interval_s
        self._tracks: list[_Track] = []
        self._events: list[msgspec.Raw] = []
        self._events_lock = threading.Lock()
        self._io_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._started_unix = 0.0
        self._open = False
        self._stopped = False
        self._error: BaseException | None = None

    # public state

    @property
    def frames_written(self) -> dict[str, int]:
        """Frames (samples per channel) in each WAV file so far, silence for gaps included."""
        return {t.name: t.frames for t in self._tracks}

    @property
    def dropped_frames(self) -> dict[str, int]:
        """Frames per track the recorder lost by falling behind (recorded as silence)."""
        return {t.name: t.dropped for t in self._tracks}

    @property
    def error(self) -> BaseException | None:
        """The exception that stopped the background thread, if any (`stop()` raises it too)."""
        return self._error

    # lifecycle

    def start(self) -> None:
        """Create the files (refusing to overwrite a session) and start the background thread."""
        if self._thread is not None or self._stopped:
            raise RuntimeError("a SessionRecorder starts once")
        self.folder.mkdir(parents=True, exist_ok=True)
        paths = [self.folder / f"{name}.wav" for name in self.rings] + [self.folder / SESSION_FILE]
        existing = [p.name for p in paths if p.exists()]
        if existing:
            raise FileExistsError(f"{self.folder} already holds a session ({', '.join(existing)})")
        self._started_unix = time.time()
        self._tracks = [self._open_track(name, ring) for name, ring in self.rings.items()]
        self._write_session(closed=False)
        self._open = True
        self._thread = threading.Thread(target=self._run, name="rtvamp-recorder", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Record everything written so far, close the files; raises `RecorderError` if the
        background thread failed. Idempotent."""
        if self._thread is None:
            return
        self._stopping.set()
        self._thread.join()
        self._thread = None
        self._stopped = True
        with self._io_lock:
            try:
                if self._error is None:
                    self._flush()
            finally:
                self._close()
        if self._error is not None:
            raise RecorderError(f"recording to {self.folder} failed: {self._error}") from self._error

    def __enter__(self) -> SessionRecorder:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # engine API

    def log_event(self, kind: str, sample: int, **info: Any) -> None:
        """Append an event (trigger, swap, …) at absolute engine sample `sample` to the log.

        Thread-safe (takes a lock: not for the audio thread). `info` must be JSON-able (NumPy
        scalars and arrays are converted); it is stored under ``"info"`` with the wall-clock
        time (Unix seconds) and written with the next flush.
        """
        if self._stopped:
            raise RuntimeError("the recorder is stopped")
        event = msgspec.Raw(_encode_json({"kind": str(kind), "sample": int(sample),
                                          "wall_time": time.time(), "info": info}))
        with self._events_lock:
            self._events.append(event)

    def flush(self) -> None:
        """Record what the rings hold now, update the WAV headers and session.json (the
        background thread does this every `flush_interval_s`)."""
        with self._io_lock:
            if not self._open:
                raise RuntimeError("the recorder is not recording")
            self._flush()

    # internals

    def _open_track(self, name: str, ring: AudioRing) -> _Track:
        path = self.folder / f"{name}.wav"
        file = soundfile.SoundFile(str(path), "w", self.sample_rate, ring.channels, "FLOAT", format="WAV")
        chunk = min(ring.capacity, _CHUNK_FRAMES)
        start = ring.written
        return _Track(name=name, ring=ring, file=file, position=start, start_sample=start,
                      scratch=np.empty((chunk, ring.channels), np.float32),
                      silence=np.zeros((chunk, ring.channels), np.float32))

    def _flush(self) -> None:
        for track in self._tracks:
            self._drain(track)
            _snd.sf_command(track.file._file, _SFC_UPDATE_HEADER_NOW, _ffi.NULL, 0)
        self._write_session(closed=False)

    def _run(self) -> None:
        try:
            while not self._stopping.wait(self.flush_interval_s):
                with self._io_lock:
                    self._flush()
        except BaseException as exc:  # disk full, WAV limit: kept for stop() to raise
            self._error = exc

    def _drain(self, track: _Track) -> None:
        """Write the ring's frames [position, written) to the file; silence for lost spans."""
        ring = track.ring
        end = ring.written
        while track.position < end:
            safe = ring.oldest()
            if track.position < safe:
                self._write_gap(track, safe - track.position)
                end = max(end, track.position)
                continue
            block = self._read(track, min(end - track.position, len(track.scratch)))
            if block is not None:
                self._write(track, block)
                track.position += len(block)

    def _read(self, track: _Track, n: int) -> np.ndarray | None:
        """n frames from `position`, or None if the writer overwrote (or nearly did) the span."""
        ring = track.ring
        try:
            block = ring.read(track.position, track.position + n, out=track.scratch[:n])
        except RingOverrun:
            return None
        if track.position < ring.oldest():
            return None
        return block

    def _write_gap(self, track: _Track, n: int) -> None:
        """Record n frames of silence for audio the ring no longer holds."""
        track.dropped += n
        track.position += n
        while n > 0:
            m = min(n, len(track.silence))
            self._write(track, track.silence[:m])
            n -= m

    def _write(self, track: _Track, block: np.ndarray) -> None:
        if (track.frames + len(block)) * track.frame_bytes > _WAV_DATA_LIMIT_BYTES:
            raise RecorderError(f"{track.name}.wav reached the 4 GiB WAV size limit")
        track.file.write(block)
        track.frames += len(block)

    def _write_session(self, closed: bool) -> None:
        with self._events_lock:
            events = list(self._events)
        doc = {
            "format": "rtvamp-session", "version": 1, "sample_rate": self.sample_rate,
            "started_unix": self._started_unix,
            "started_at": datetime.fromtimestamp(self._started_unix, timezone.utc).isoformat(),
            "flush_interval_s": self.flush_interval_s, "closed": closed,
            "tracks": {t.name: {"file": f"{t.name}.wav", "channels": t.ring.channels,
                                "start_sample": t.start_sample, "frames": t.frames,
                                "dropped_frames": t.dropped} for t in self._tracks},
            "events": events,
        }
        _write_atomically(self.folder / SESSION_FILE, _encode_json(doc))

    def _close(self) -> None:
        self._open = False
        for track in self._tracks:
            track.file.close()
        self._write_session(closed=True)


# -- crash recovery ------------------------------------------------------------------------------


def recover(folder: Path) -> list[Path]:
    """Repair the WAV files of a session that ended without `stop()` (crash, SIGKILL).

    Not needed to read them: the recorder rewrites each header after every flush, so a killed
    session's files read cleanly with every reader, minus the audio written after the last
    header update (< one flush interval). `recover` gets that tail back: it sets the RIFF, data
    and fact sizes from the file size (whole frames; a torn last frame is cut off), checks that
    each file reads, and updates the frame counts in session.json. Idempotent; also harmless
    on a cleanly closed session. Returns the WAV files.
    """
    folder = Path(folder)
    wavs = sorted(folder.glob("*.wav"))
    for path in wavs:
        _fix_wav_sizes(path)
        try:
            soundfile.info(str(path))
        except Exception as exc:  # soundfile raises LibsndfileError / RuntimeError
            raise RecorderError(f"{path}: still unreadable after repair ({exc})") from None
    session = folder / SESSION_FILE
    if session.exists():
        doc = msgspec.json.decode(session.read_bytes())
        for track in doc["tracks"].values():
            track["frames"] = soundfile.info(str(folder / track["file"])).frames
        doc["recovered"] = True
        _write_atomically(session, _encode_json(doc))
    return wavs


def _fix_wav_sizes(path: Path) -> None:
    """Rewrite a RIFF/WAVE file's size fields for the whole frames the file holds."""
    with open(path, "r+b") as f:
        riff, _, wave = struct.unpack("<4sI4s", f.read(12))
        if riff != b"RIFF" or wave != b"WAVE":
            raise RecorderError(f"{path}: not a RIFF/WAVE file")
        block_align, fact_at, data_at = _wav_layout(f, path)
        frames = (os.fstat(f.fileno()).st_size - data_at) // block_align
        data_bytes = frames * block_align
        f.truncate(data_at + data_bytes)
        f.seek(4)
        f.write(struct.pack("<I", data_at + data_bytes - 8))
        f.seek(data_at - 4)
        f.write(struct.pack("<I", data_bytes))
        if fact_at is not None:
            f.seek(fact_at)
            f.write(struct.pack("<I", frames))


def _wav_layout(f: Any, path: Path) -> tuple[int, int | None, int]:
    """(bytes per frame, offset of the fact sample count or None, offset of the data)."""
    block_align, fact_at, offset = 0, None, 12
    while True:
        f.seek(offset)
        header = f.read(8)
        if len(header) < 8:
            raise RecorderError(f"{path}: no data chunk")
        chunk, size = struct.unpack("<4sI", header)
        if chunk == b"fmt ":
            block_align = struct.unpack("<H", f.read(16)[12:14])[0]
        elif chunk == b"fact":
            fact_at = offset + 8
        elif chunk == b"data":
            if block_align <= 0:
                raise RecorderError(f"{path}: no usable fmt chunk before the data")
            return block_align, fact_at, offset + 8
        offset += 8 + size + (size & 1)


# -- loops and variations ------------------------------------------------------------------------

_LOOP_FORMATS = {".flac": ("FLAC", "PCM_24"), ".wav": ("WAV", "FLOAT")}


class _Sidecar(msgspec.Struct, forbid_unknown_fields=True):
    """`<name>.json` next to a loop's audio file."""

    version: int
    audio: str
    sample_rate: int
    frames: int
    channels: int
    created_unix: float
    meta: dict[str, Any]


@dataclass(frozen=True)
class LoopEntry:
    """A stored loop: its name, length in seconds, metadata and audio file."""

    name: str
    seconds: float
    meta: dict[str, Any]
    path: Path


def save_loop(path: Path, audio: np.ndarray, sample_rate: int, meta: dict[str, Any]) -> None:
    """Write `audio` (float32 [frames, channels]) to `path` (.flac: 24-bit, clipped to ±1;
    .wav: float32, bit-exact) and `meta` (JSON-able: bars, bpm, seed, preset, parent id, …) to
    the sidecar `path.with_suffix(".json")`. Both files are replaced atomically."""
    path = Path(path)
    fmt = _LOOP_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: a loop file ends in {' or '.join(_LOOP_FORMATS)}")
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 2 or audio.shape[0] == 0 or audio.shape[1] == 0:
        raise ValueError(f"loop audio must be [frames, channels] with both > 0, got {audio.shape}")
    if sample_rate <= 0:
        raise ValueError("sample_rate must be positive")
    sidecar = _encode_json(_Sidecar(version=1, audio=path.name, sample_rate=sample_rate,
                                    frames=audio.shape[0], channels=audio.shape[1],
                                    created_unix=time.time(), meta=dict(meta)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    soundfile.write(str(tmp), audio, sample_rate, format=fmt[0], subtype=fmt[1])
    os.replace(tmp, path)
    _write_atomically(path.with_suffix(".json"), sidecar)


def load_loop(path: Path) -> tuple[np.ndarray, int, dict[str, Any]]:
    """(float32 [frames, channels], sample rate, meta) of a loop saved by `save_loop`; `path`
    is its audio file or its sidecar. Raises `LoopFileError` for missing, unreadable or
    mismatched files."""
    path = Path(path)
    sidecar_path = path.with_suffix(".json")
    side = _read_sidecar(sidecar_path)
    audio_path = sidecar_path.with_name(side.audio)
    if path.suffix.lower() != ".json" and audio_path.name != path.name:
        raise LoopFileError(f"{sidecar_path}: describes {side.audio}, not {path.name}")
    audio, rate = _read_loop_audio(audio_path)
    found = (rate, audio.shape[0], audio.shape[1])
    if found != (side.sample_rate, side.frames, side.channels):
        raise LoopFileError(f"{audio_path}: holds {found[1]} frames × {found[2]} ch at {found[0]} Hz, "
                            f"its sidecar says {side.frames} × {side.channels} at {side.sample_rate} Hz")
    return audio, rate, side.meta


def _read_sidecar(path: Path) -> _Sidecar:
    try:
        side = msgspec.json.decode(path.read_bytes(), type=_Sidecar)
    except FileNotFoundError:
        raise LoopFileError(f"{path}: no such loop sidecar") from None
    except OSError as exc:
        raise LoopFileError(f"{path}: cannot read the sidecar ({exc})") from None
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        raise LoopFileError(f"{path}: corrupt loop sidecar ({exc})") from None
    if side.version != 1:
        raise LoopFileError(f"{path}: unknown loop sidecar version {side.version}")
    if Path(side.audio).name != side.audio or Path(side.audio).suffix.lower() not in _LOOP_FORMATS:
        raise LoopFileError(f"{path}: bad audio file name {side.audio!r}")
    return side


def _read_loop_audio(path: Path) -> tuple[np.ndarray, int]:
    if not path.is_file():
        raise LoopFileError(f"{path}: no such loop audio file")
    try:
        audio, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises LibsndfileError / RuntimeError for broken files
        raise LoopFileError(f"{path}: unreadable loop audio ({exc})") from None
    return audio, rate


class LoopLibrary:
    """A folder of named loops: `<name>.flac` (or .wav) + `<name>.json`."""

    def __init__(self, folder: Path, audio_format: str = "flac") -> None:
        self.suffix = f".{audio_format.lower()}"
        if self.suffix not in _LOOP_FORMATS:
            raise ValueError(f"audio_format must be one of {', '.join(s[1:] for s in _LOOP_FORMATS)}")
        self.folder = Path(folder)

    def save(self, name: str, audio: np.ndarray, sample_rate: int, meta: dict[str, Any]) -> Path:
        """Store (or replace) loop `name`; returns its audio file."""
        path = self.folder / f"{_check_name(name, 'loop')}{self.suffix}"
        save_loop(path, audio, sample_rate, meta)
        return path

    def load(self, name: str) -> tuple[np.ndarray, int, dict[str, Any]]:
        """(float32 [frames, channels], sample rate, meta) of loop `name`."""
        return load_loop(self.folder / f"{_check_name(name, 'loop')}.json")

    def list(self) -> list[LoopEntry]:
        """Every loop in the folder, by name, from the sidecars alone (no audio is decoded);
        raises `LoopFileError` for a corrupt sidecar."""
        entries = []
        for sidecar in sorted(self.folder.glob("*.json")):
            side = _read_sidecar(sidecar)
            entries.append(LoopEntry(name=sidecar.stem, seconds=side.frames / side.sample_rate,
                                     meta=side.meta, path=sidecar.with_name(side.audio)))
        return entries
