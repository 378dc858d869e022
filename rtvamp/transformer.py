"""A VampNet transformer of a bundle (coarse or c2f), run with onnxruntime into preallocated logits."""

from __future__ import annotations

import numpy as np

from .bundle import Bundle
from .sessions import CPU, BoundRunner, default_providers, make_session, runs_on_cpu


class Transformer:
    """codes int64 [B, C, T] (MASK = vocab_size) → logits float32 [B, Cp, T, V].

    Input and output buffers are allocated once for `max_batch` × `max_frames`; `logits`
    returns a view into the output buffer that the next call overwrites.

    `precision` "auto" (default) runs the bundle's int8 variant when the session computes on the
    CPU and the variant is eligible (its top-1 agreement with fp32 reached the bundle threshold),
    fp32 otherwise (e.g. on CUDA); "fp32" and "int8" insist (BundleError when the bundle cannot,
    see `Bundle.transformer_file`). `self.precision` is what was picked.
    """

    def __init__(self, bundle: Bundle, name: str, max_batch: int, max_frames: int, threads: int = 0,
                 precision: str = "auto", require_eligible: bool = True) -> None:
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
        providers = default_providers()
        key, self.precision = bundle.transformer_file(name, precision, runs_on_cpu(providers), require_eligible)
        session = make_session(bundle.path(key), threads, providers)
        if precision == "auto" and not runs_on_cpu(providers) and runs_on_cpu(session.get_providers()):
            # the GPU provider could not be used after all: decide again for the CPU
            key_cpu, precision_cpu = bundle.transformer_file(name, precision, True)
            if key_cpu != key:
                key, self.precision = key_cpu, precision_cpu
                session = make_session(bundle.path(key), threads, [CPU])
        self.file = key
        """the manifest name of the file this transformer runs (`coarse` or `coarse_int8`, …)"""
        self._runner = BoundRunner(
            session,
            np.zeros(max_batch * self.n_codebooks * max_frames, dtype=np.int64),
            np.zeros(max_batch * self.n_predict * max_frames * self.vocab_size, dtype=np.float32),
            lambda shape: (shape[0], self.n_predict, shape[2], self.vocab_size))

    @property
    def session(self):
        """The onnxruntime session (onnxruntime.InferenceSession)."""
        return self._runner.session

    def logits(self, codes: np.ndarray) -> np.ndarray:
        shape = codes.shape
        if len(shape) != 3 or shape[1] != self.n_codebooks:
            raise ValueError(f"{self.name} takes codes [B, {self.n_codebooks}, T], got {shape}")
        if shape[0] > self.max_batch or shape[2] > self.max_frames:
            raise ValueError(f"{self.name}: codes {shape} exceed batch {self.max_batch} × {self.max_frames} frames")
        np.copyto(self._runner.input_view(shape), codes)
        return self._runner.run(shape)
