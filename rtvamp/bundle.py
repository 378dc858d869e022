"""Model bundles: a folder of ONNX files plus `manifest.json`, the contract the runtime checks.

A bundle declares everything the runtime needs (sample rate, hop, codebook counts, MASK id,
chunk lengths, file hashes), so nothing downstream hard-codes a model number. Loading verifies
the format version, the presence and sha256 of every file, and the internal consistency of the
numbers; a bundle that does not fit is refused with a message, never a crash later on.

Precision: the transformers are stored in fp32 (`coarse`, `c2f`) and, in bundles converted by
this rtvamp, also as dynamic-int8 variants (`coarse_int8`, `c2f_int8`) with their measured top-1
agreement with fp32. A variant is *eligible* when every recorded agreement is at least
`INT8_MIN_AGREEMENT`; `Bundle.transformer_file` picks the file for a precision request
("auto", "fp32" or "int8"). Bundles without int8 entries (older conversions) are fp32 only.
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
TRANSFORMERS = ("coarse", "c2f")
PRECISIONS = ("auto", "fp32", "int8")
"""what a caller may ask for: auto = int8 on the CPU when its variant is eligible, else fp32"""
INT8_MIN_AGREEMENT = 0.99
"""an int8 variant is eligible when its top-1 agreement with fp32 is at least this on every
recorded measure (random codes and codes of encoded audio)"""
AGREEMENT_MEASURES = ("random_codes", "encoded_audio")
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
    """name → {"path", "sha256", "precision"}; the int8 variants (`coarse_int8`, `c2f_int8`)
    also have "top1_agreement": {measure: fraction} (see AGREEMENT_MEASURES)"""
    sources: dict[str, str] = field(default_factory=dict)
    """checkpoint role → sha256 of the source file"""
    codec: dict = field(default_factory=dict)
    """the codec's architecture: encoder_dim, encoder_rates, decoder_dim, decoder_rates (the
    context that continuous encoding and streamed decoding need follows from it,
    rtvamp.codec.CodecReach); empty in bundles converted before it was recorded"""
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
        for name in TRANSFORMERS:
            variant = self.files.get(int8_name(name))
            if variant is not None and variant.get("precision") != "int8":
                problems.append(f"{int8_name(name)} must have precision int8, not {variant.get('precision')!r}")
        if problems:
            raise BundleError(f"{where}: " + "; ".join(problems))

    def seconds_to_frames(self, seconds: float) -> int:
        """ceil(seconds · sample_rate / hop) — upstream's s2t."""
        return math.ceil(seconds * self.sample_rate / self.hop_length)


def int8_name(name: str) -> str:
    """The manifest name of transformer `name`'s int8 variant (`coarse` → `coarse_int8`)."""
    return f"{name}_int8"


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

    def int8_eligibility(self, name: str) -> tuple[bool, str]:
        """(whether transformer `name` has an eligible int8 variant, why not when it has none)."""
        files = self.manifest.files
        if files[name].get("precision", "fp32") == "int8":
            return True, ""  # converted int8-only by an older rtvamp: the user chose it then
        variant = files.get(int8_name(name))
        if variant is None:
            return False, (f"the bundle has no int8 variant of {name} (converted without one, or by an older "
                           "rtvamp; convert it again)")
        agreement = variant.get("top1_agreement") or {}
        missing = [m for m in AGREEMENT_MEASURES if m not in agreement]
        if missing:
            return False, f"the int8 variant of {name} has no recorded agreement ({', '.join(missing)})"
        low = {m: float(agreement[m]) for m in AGREEMENT_MEASURES if float(agreement[m]) < INT8_MIN_AGREEMENT}
        if low:
            measured = ", ".join(f"{v:.2%} ({m.replace('_', ' ')})" for m, v in low.items())
            return False, (f"the int8 variant of {name} agrees with fp32 on too few top-1 tokens: {measured}, "
                           f"below the {INT8_MIN_AGREEMENT:.0%} required")
        return True, ""

    def transformer_file(self, name: str, precision: str = "auto", on_cpu: bool = True,
                         require_eligible: bool = True) -> tuple[str, str]:
        """(manifest file name, precision it has) to run transformer `name` with.

        precision "fp32" → the fp32 file; "int8" → the eligible int8 variant (BundleError when
        there is none, naming why); "auto" → int8 when `on_cpu` (sessions on the CPU execution
        provider) and the variant is eligible, otherwise fp32. `require_eligible=False` lets
        "int8" take a variant below the agreement threshold (benchmarks measure its speed).
        """
        if name not in TRANSFORMERS:
            raise ValueError(f"unknown transformer {name!r} (coarse or c2f)")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        base = self.manifest.files[name].get("precision", "fp32")
        eligible, why = self.int8_eligibility(name)
        int8_file = name if base == "int8" else int8_name(name)
        if precision == "fp32":
            if base != "fp32":
                raise BundleError(f"{self.root}: fp32 was asked for, but this bundle's {name} is {base} only "
                                  "(converted with an older `--precision int8`); convert it again")
            return name, "fp32"
        if precision == "int8":
            if not eligible and (require_eligible or int8_file not in self.manifest.files):
                raise BundleError(f"{self.root}: int8 was asked for, but {why}; use precision fp32 or auto")
            return int8_file, "int8"
        if base != "fp32":
            return name, base  # nothing else to choose from
        return (int8_file, "int8") if on_cpu and eligible else (name, "fp32")


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
