"""The LAC codec of a bundle, run with onnxruntime: audio ↔ tokens."""

from __future__ import annotations

import numpy as np

from .bundle import Bundle
from .sessions import make_session


class Codec:
    """Encoder and decoder sessions of a bundle (44.1 kHz mono, `hop_length` samples per frame)."""

    def __init__(self, bundle: Bundle, threads: int = 0) -> None:
        self.manifest = bundle.manifest
        self.hop_length = bundle.manifest.hop_length
        self._encoder = make_session(bundle.path("codec_encoder"), threads)
        self._decoder = make_session(bundle.path("codec_decoder"), threads)

    def encode(self, audio: np.ndarray) -> np.ndarray:
        """audio float32 [B, 1, N samples] at the bundle rate → codes int64 [B, n_cb, ⌈N/hop⌉].

        Right-pads with zeros to a multiple of the hop, like upstream `LAC.preprocess`.
        """
        pad = (-audio.shape[-1]) % self.hop_length
        if pad:
            audio = np.pad(audio, ((0, 0), (0, 0), (0, pad)))
        return self._encoder.run(None, {"audio": np.ascontiguousarray(audio, dtype=np.float32)})[0]

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """codes int64 [B, K ≤ n_cb, T] (a prefix of the codebooks; MASK ids read as 0)
        → audio float32 [B, 1, T·hop samples]."""
        return self._decoder.run(None, {"codes": np.ascontiguousarray(codes, dtype=np.int64)})[0]
