"""A VampNet transformer of a bundle (coarse or c2f), run with onnxruntime into preallocated logits."""

from __future__ import annotations

import numpy as np

from .bundle import Bundle
from .sessions import BoundRunner, make_session


class Transformer:
    """codes int64 [B, C, T] (MASK = vocab_size) → logits float32 [B, Cp, T, V].

    Input and output buffers are allocated once for `max_batch` × `max_frames`; `logits`
    returns a view into the output buffer that the next call overwrites.
    """

    def __init__(self, bundle: Bundle, name: str, max_batch: int, max_frames: int, threads: int = 0) -> None:
        m = bundle.manifest
        if name == "coarse":
            self.n_codebooks, self.n_conditioning = m.coarse_codebooks, m.coarse_conditioning_codebooks
        elif name == "c2f":
            self.n_codebooks, self.n_conditioning = m.c2f_codebooks, m.c2f_conditioning_codebooks
        else:
            raise ValueError(f"unknown transformer {name!r} (coarse or c2f)")
        self.name = name
        self.vocab_size = m.vocab_size
        self.n_predict = self.n_codebooks - self.n_conditioning
        self.max_batch, self.max_frames = max_batch, max_frames
        session = make_session(bundle.path(name), threads)
        self._runner = BoundRunner(
            session,
            np.zeros(max_batch * self.n_codebooks * max_frames, dtype=np.int64),
            np.zeros(max_batch * self.n_predict * max_frames * self.vocab_size, dtype=np.float32),
            lambda shape: (shape[0], self.n_predict, shape[2], self.vocab_size))

    def logits(self, codes: np.ndarray) -> np.ndarray:
        shape = codes.shape
        if len(shape) != 3 or shape[1] != self.n_codebooks:
            raise ValueError(f"{self.name} takes codes [B, {self.n_codebooks}, T], got {shape}")
        if shape[0] > self.max_batch or shape[2] > self.max_frames:
            raise ValueError(f"{self.name}: codes {shape} exceed batch {self.max_batch} × {self.max_frames} frames")
        np.copyto(self._runner.input_view(shape), codes)
        return self._runner.run(shape)
