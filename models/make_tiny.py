"""Regenerate the embedded tiny bundle (models/tiny) bit for bit.

    python models/make_tiny.py            # needs the `convert` extra (torch, onnx, onnxscript)

Seeded random weights in the official checkpoint format, converted by the same converter as the
real weights. The architecture and contract are VampNet's (44.1 kHz, hop 768, 14 codebooks,
vocab 1024, MASK 1024, coarse 4 codebooks, c2f conditioned on them); only the widths and depths
are small. Its output is NOT music: it exists so every command and test runs out of the box.
Like every converted bundle it holds fp32 transformers and their int8 variants with the measured
top-1 agreement (printed at the end); under precision "auto" the int8 ones run only if eligible.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from rtvamp.convert.export import Sources, convert
from rtvamp.convert.lac import CodecConfig
from rtvamp.convert.random_checkpoints import write_random_checkpoints
from rtvamp.convert.vampnet import TransformerConfig

TINY_CODEC = CodecConfig(encoder_dim=4, encoder_rates=(2, 4, 8, 12), decoder_dim=64,
                         decoder_rates=(6, 4, 4, 2, 2, 2))
TINY_COARSE = TransformerConfig(n_heads=4, n_layers=3, n_codebooks=4, n_conditioning_codebooks=0,
                                embedding_dim=96)
TINY_C2F = TransformerConfig(n_heads=4, n_layers=2, n_codebooks=14, n_conditioning_codebooks=4,
                             embedding_dim=96)
SEED = 20260527


def main(out_dir: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_random_checkpoints(tmp, TINY_CODEC, TINY_COARSE, TINY_C2F, seed=SEED)
        report = convert(Sources(paths["codec"], paths["coarse"], paths["c2f"]), out_dir, name="tiny",
                         progress=lambda msg: print(msg, file=sys.stderr))
    for name, entry in report.manifest.files.items():
        if "top1_agreement" in entry:
            print(f"{name}: top-1 agreement with fp32 {entry['top1_agreement']}", file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "tiny")
