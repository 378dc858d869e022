"""Model bundles: a folder of ONNX files plus `manifest.json`, the contract the runtime checks.

A bundle declares everything the runtime needs (sample rate, hop, codebook counts, MASK id,
chunk lengths, file hashes), so nothing downstream hard-codes a model number. Loading verifies
the format version, the presence and sha256 of every file, and the internal consistency of the
numbers; a bundle that does not fit is refused with a message, never a crash later on.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_FILES = ("codec_encoder", "codec_decoder", "coarse", "c2f")
LICENCE_NOTE = ("VampNet code: MIT. Official VampNet weights and models converted from them: "
                "CC BY-NC-SA 4.0 (non-commercial).")


class BundleError(ValueError):
    """A bundle folder that cannot be used, with a message for the user."""


@dataclass(frozen=True)
class Manifest:
    """The contract of a bundle (all counts in tokens/frames/samples as named)."""

    sample_rate: int
    hop_length: int
    """samples per token frame"""
    n_codebooks: int
    coarse_codebooks: int
    coarse_conditioning_codebooks: int
    c2f_codebooks: int
    c2f_conditioning_codebooks: int
    vocab_size: int
    mask_id: int
    coarse_chunk_frames: int
    c2f_chunk_frames: int
    files: dict[str, dict]
    """name → {"path", "sha256", "precision"}"""
    sources: dict[str, str] = field(default_factory=dict)
    """checkpoint role → sha256 of the source file"""
    name: str = ""
    licence: str = LICENCE_NOTE
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BundleError(f"{where}: manifest is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise BundleError(f"{where}: manifest must be a JSON object")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(f"{where}: bundle format {version!r} is not supported "
                              f"(this rtvamp reads format {FORMAT_VERSION}); convert it again")
        try:
            manifest = cls(**data)
        except TypeError as exc:
            raise BundleError(f"{where}: manifest fields do not match the format: {exc}") from None
        manifest.check(where)
        return manifest

    def check(self, where: str) -> None:
        problems = []
        if self.mask_id != self.vocab_size:
            problems.append(f"mask_id {self.mask_id} must equal vocab_size {self.vocab_size}")
        if self.c2f_conditioning_codebooks != self.coarse_codebooks:
            problems.append("c2f must condition on exactly the coarse codebooks")
        if not (0 < self.coarse_codebooks <= self.c2f_codebooks == self.n_codebooks):
            problems.append("codebook counts are inconsistent")
        if self.coarse_conditioning_codebooks != 0:
            problems.append("coarse model must not have conditioning codebooks")
        if min(self.sample_rate, self.hop_length, self.coarse_chunk_frames, self.c2f_chunk_frames) <= 0:
            problems.append("rates and chunk lengths must be positive")
        missing = [n for n in MODEL_FILES if n not in self.files]
        if missing:
            problems.append(f"files missing from the manifest: {', '.join(missing)}")
        if problems:
            raise BundleError(f"{where}: " + "; ".join(problems))

    def seconds_to_frames(self, seconds: float) -> int:
        """ceil(seconds · sample_rate / hop) — upstream's s2t."""
        return math.ceil(seconds * self.sample_rate / self.hop_length)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A verified bundle folder."""

    root: Path
    manifest: Manifest

    def path(self, name: str) -> Path:
        return self.root / self.manifest.files[name]["path"]


def load_bundle(root: str | Path | None = None, verify_hashes: bool = True) -> Bundle:
    """Open and verify a bundle folder (None → the embedded tiny default)."""
    root = Path(root) if root is not None else default_bundle_path()
    if not root.is_dir():
        raise BundleError(f"{root}: no such bundle folder")
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{root}: not a bundle (no {MANIFEST}); create one with `rtvamp models convert`")
    manifest = Manifest.from_json(manifest_path.read_text(), str(root))
    for name, entry in manifest.files.items():
        file = root / entry["path"]
        if not file.is_file():
            raise BundleError(f"{root}: file {entry['path']} ({name}) is missing")
        if verify_hashes and sha256_of(file) != entry["sha256"]:
            raise BundleError(f"{root}: {entry['path']} does not match its sha256 in the manifest "
                              "(modified or damaged); convert or download the bundle again")
    return Bundle(root, manifest)


def bundles_dir() -> Path:
    """Where `rtvamp models convert/download` put named bundles (a per-user data folder)."""
    import platformdirs

    return platformdirs.user_data_path("rtvamp") / "bundles"


def resolve_bundle(name_or_path: str | None) -> Path:
    """A bundle folder from a path, the name of an installed bundle, or None (the tiny default)."""
    if name_or_path is None:
        return default_bundle_path()
    path = Path(name_or_path)
    if path.is_dir() or "/" in name_or_path or name_or_path.startswith("."):
        return path
    installed = bundles_dir() / name_or_path
    if installed.is_dir():
        return installed
    raise BundleError(f"no bundle {name_or_path!r}: not a folder, and not installed in {bundles_dir()} "
                      "(see `rtvamp models list`)")


def default_bundle_path() -> Path:
    """The embedded tiny bundle: installed as package data, or `models/tiny` in a source tree."""
    try:
        installed = Path(str(resources.files("rtvamp_models") / "tiny"))
        if (installed / MANIFEST).is_file():
            return installed
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parent.parent / "models" / "tiny"
