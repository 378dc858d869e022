"""onnxruntime sessions for bundle files, and a bound runner that writes into preallocated outputs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort


CPU = "CPUExecutionProvider"


def default_providers() -> list[str]:
    """CUDA first when onnxruntime-gpu provides it (RTVAMP_PROVIDERS=cpu keeps the CPU), then the CPU."""
    if os.environ.get("RTVAMP_PROVIDERS") != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", CPU]
    return [CPU]


def runs_on_cpu(providers: list[str]) -> bool:
    """Whether a session with these providers (preferred first) computes on the CPU provider."""
    return not providers or providers[0] == CPU


def make_session(path: Path, threads: int = 0, providers: list[str] | None = None) -> ort.InferenceSession:
    """An InferenceSession (threads 0 = onnxruntime's default; providers: `default_providers()`)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=providers or default_providers())


class BoundRunner:
    """Runs a one-input/one-output session on preallocated CPU buffers via IOBinding.

    The binding for a shape is made once and cached, so repeated runs at the same shape
    allocate nothing on the Python side: the caller copies the input into `input_view(shape)`
    and reads the result from the returned view of the output buffer.
    """

    def __init__(self, session: ort.InferenceSession, input_buffer: np.ndarray, output_buffer: np.ndarray,
                 output_shape_of) -> None:
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.output_name = session.get_outputs()[0].name
        self.input_buffer = input_buffer.reshape(-1)
        self.output_buffer = output_buffer.reshape(-1)
        self.output_shape_of = output_shape_of
        self._bindings: dict[tuple[int, ...], tuple[ort.IOBinding, np.ndarray, np.ndarray]] = {}

    def _binding(self, shape: tuple[int, ...]):
        entry = self._bindings.get(shape)
        if entry is None:
            out_shape = self.output_shape_of(shape)
            n_in, n_out = int(np.prod(shape)), int(np.prod(out_shape))
            if n_in > self.input_buffer.size or n_out > self.output_buffer.size:
                raise ValueError(f"input {shape} exceeds the buffers this runner was built for")
            x = self.input_buffer[:n_in].reshape(shape)
            y = self.output_buffer[:n_out].reshape(out_shape)
            binding = self.session.io_binding()
            binding.bind_input(self.input_name, "cpu", 0, x.dtype, list(shape), x.ctypes.data)
            binding.bind_output(self.output_name, "cpu", 0, y.dtype, list(out_shape), y.ctypes.data)
            entry = self._bindings[shape] = (binding, x, y)
        return entry

    def input_view(self, shape: tuple[int, ...]) -> np.ndarray:
        return self._binding(shape)[1]

    def run(self, shape: tuple[int, ...]) -> np.ndarray:
        binding, _, y = self._binding(shape)
        self.session.run_with_iobinding(binding)
        return y
