"""Backends: what runs an artifact's graphs. Each takes named numpy inputs and returns named outputs.

`keep` names outputs that stay where the backend computed them (on the GPU, for a CUDA provider) as
opaque handles that later calls accept as inputs: the causal LM's KV cache moves between steps
without a round trip through host memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from .errors import UserError
from .threads import ort_options


class Backend(Protocol):
    name: str

    def run(self, graph: str, feed: dict[str, Any], keep: frozenset[str] = frozenset()) -> dict[str, Any]: ...


class OnnxRuntimeBackend:
    """ONNX Runtime with the best provider this machine has: TensorRT EP, then CUDA EP, then CPU."""

    PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")

    def __init__(self, files: dict[str, Path], providers: list[str] | None = None,
                 gpu_files: dict[str, Path] | None = None, threads: int | None = None):
        """`gpu_files`: other forms of the graphs, for GPU providers (int8: Q/DQ instead of CPU's dynamic form);
        `threads`: its thread pool's size, if not `engine_threads`'s."""
        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in self.PREFERENCE if p in available]
        unknown = [p for p in providers if p not in available]
        if unknown:
            raise UserError(f"ONNX Runtime provider {', '.join(unknown)} is not available here "
                            f"(available: {', '.join(available)})")
        if gpu_files and providers[0] != "CPUExecutionProvider":
            files = gpu_files
        self.sessions = {graph: ort.InferenceSession(str(path), ort_options(threads), providers=providers)
                         for graph, path in files.items()}
        provider = next(iter(self.sessions.values())).get_providers()[0]
        self.device = "cpu" if provider == "CPUExecutionProvider" else "cuda"
        self.name = f"onnxruntime/{provider}"

    @classmethod
    def best_provider(cls) -> str:
        return next(p for p in cls.PREFERENCE if p in ort.get_available_providers())

    def run(self, graph: str, feed: dict[str, Any], keep: frozenset[str] = frozenset()) -> dict[str, Any]:
        session = self.sessions[graph]
        binding = session.io_binding()  # one per call: sessions are shared between threads
        for name, value in feed.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        names = [o.name for o in session.get_outputs()]
        for name in names:
            binding.bind_output(name, self.device if name in keep else "cpu")
        session.run_with_iobinding(binding)
        return {name: value if name in keep else value.numpy() for name, value in zip(names, binding.get_outputs())}
