"""The LAC codec of a bundle, run with onnxruntime: audio ↔ tokens; and how far each token
reaches (the context continuous encoding and streamed decoding need)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnxruntime

from .bundle import Bundle, BundleError, Manifest
from .sessions import make_session

# (kernel, stride, dilation, padding) of every convolution on the path, in order; a transposed
# convolution is marked by a negative stride. Residual branches add their input, which the
# branch's own (wider) reach covers, so only the branch is listed.
_Layer = tuple[int, int, int, int]


def _encoder_layers(rates: list[int]) -> list[_Layer]:
    layers: list[_Layer] = [(7, 1, 1, 3)]
    for stride in rates:
        for dilation in (1, 3, 9):                       # residual unit: k7 dilated, then k1
            layers += [(7, 1, dilation, 3 * dilation), (1, 1, 1, 0)]
        layers.append((2 * stride, stride, 1, stride // 2))
    return layers + [(3, 1, 1, 1)]


def _decoder_layers(rates: list[int]) -> list[_Layer]:
    layers: list[_Layer] = [(7, 1, 1, 3)]
    for stride in rates:
        layers.append((2 * stride, -stride, 1, stride // 2))
        # MRF: the widest of its three residual stacks (kernel 11, dilations 1, 3, 5)
        for dilation in (1, 3, 5):
            layers += [(11, 1, dilation, 5 * dilation), (11, 1, 1, 5)]
    return layers + [(7, 1, 1, 3)]


def _input_span(layers: list[_Layer], first: int, last: int) -> tuple[int, int]:
    """The input positions [lo, hi] that outputs [first, last] of the stack depend on."""
    lo, hi = first, last
    for kernel, stride, dilation, pad in reversed(layers):
        if stride > 0:
            lo, hi = lo * stride - pad, hi * stride - pad + dilation * (kernel - 1)
        else:  # transposed: output o = i·s − pad + m, m ∈ [0, kernel)
            s = -stride
            lo, hi = math.ceil((lo + pad - kernel + 1) / s), (hi + pad) // s
    return lo, hi


@dataclass(frozen=True)
class CodecReach:
    """How far tokens and samples reach, from the codec's architecture (bundle manifest).

    encoder: frame t depends on samples [t·hop − encoder_left, t·hop + hop + encoder_right).
    decoder: the samples of frame t depend on frames [t − decoder_left, t + decoder_right].
    Outside them the codec pads with zeros, so codes (samples) computed with at least this much
    real context on each side equal those of any longer stretch of the same stream."""

    hop: int
    encoder_left: int
    encoder_right: int
    decoder_left: int
    decoder_right: int

    @classmethod
    def of(cls, manifest: Manifest) -> CodecReach:
        arch = manifest.codec
        if not arch:
            raise BundleError(f"bundle {manifest.name or '?'} does not record its codec architecture "
                              "(converted by an older rtvamp): convert it again for continuous encoding")
        hop = manifest.hop_length
        lo, hi = _input_span(_encoder_layers(list(arch["encoder_rates"])), 0, 0)
        dlo, dhi = _input_span(_decoder_layers(list(arch["decoder_rates"])), 0, hop - 1)
        return cls(hop, max(0, -lo), max(0, hi - (hop - 1)), max(0, -dlo), max(0, dhi))

    @property
    def encoder_context_frames(self) -> tuple[int, int]:
        """Whole frames of audio context needed left and right of a stretch of frames."""
        return -(-self.encoder_left // self.hop), -(-self.encoder_right // self.hop)


class Codec:
    """Encoder and decoder sessions of a bundle (44.1 kHz mono, `hop_length` samples per frame)."""

    def __init__(self, bundle: Bundle, threads: int = 0) -> None:
        self.manifest = bundle.manifest
        self.hop_length = bundle.manifest.hop_length
        self._encoder = make_session(bundle.path("codec_encoder"), threads)
        self._decoder = make_session(bundle.path("codec_decoder"), threads)

    @property
    def sessions(self) -> list[onnxruntime.InferenceSession]:
        """The encoder's and the decoder's onnxruntime sessions."""
        return [self._encoder, self._decoder]

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

    def decode_chunks(self, codes: np.ndarray, chunk_frames: int, reach: CodecReach
                      ) -> Iterator[tuple[int, np.ndarray]]:
        """Streamed decode: (first sample, audio float32 [B, chunk·hop]) in order, each chunk
        decoded with the decoder's reach of real frames around it, so the concatenation equals
        `decode(codes)` (to float rounding)."""
        n_frames, hop = codes.shape[-1], self.hop_length
        for start in range(0, n_frames, chunk_frames):
            stop = min(start + chunk_frames, n_frames)
            lo, hi = max(0, start - reach.decoder_left), min(n_frames, stop + reach.decoder_right)
            audio = self.decode(codes[..., lo:hi])[:, 0]
            yield start * hop, audio[:, (start - lo) * hop:(stop - lo) * hop]
