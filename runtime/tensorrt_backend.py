"""TensorRT backend: runs an artifact's `.plan` engines (TensorRT 10+ API) without torch.

polygraphy's TrtRunner does the engine work: named I/O tensors, `set_input_shape` per call,
`execute_async_v3`, and device buffers allocated once and reused across calls. We add what a
production session needs around it: a clear error when an engine comes from another TensorRT version
or GPU, a lock per engine (an execution context serves one call at a time), and device-resident
outputs for `keep` (the KV cache), copied out of the runner's reused buffers so the next step may
read them while it writes its own.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path
from typing import Any

from .errors import UserError


def usable() -> str | None:
    """None if TensorRT and a CUDA GPU are here; else why not, in a few words."""
    try:
        import tensorrt
        from polygraphy import cuda  # noqa: F401
    except ImportError as err:
        return f"TensorRT is not installed ({err.name} missing)"
    if not hasattr(tensorrt, "Runtime"):  # type stubs alone (tensorrt-stubs) import as an empty package
        return "TensorRT is not installed (only its type stubs are)"
    from polygraphy.cuda import wrapper

    cuda = wrapper()
    if cuda.handle is None:
        return "no CUDA runtime (libcudart) found"
    count = ctypes.c_int()
    if cuda.handle.cudaGetDeviceCount(ctypes.byref(count)) != 0 or count.value == 0:
        return "no CUDA GPU"
    return None


def gpu() -> dict[str, str]:
    """The current CUDA device's name and compute capability (call only where `usable()` is None)."""
    from polygraphy.cuda import wrapper

    libcudart = wrapper().handle
    major, minor = ctypes.c_int(), ctypes.c_int()
    libcudart.cudaDeviceGetAttribute(ctypes.byref(major), 75, 0)  # cudaDevAttrComputeCapabilityMajor
    libcudart.cudaDeviceGetAttribute(ctypes.byref(minor), 76, 0)  # cudaDevAttrComputeCapabilityMinor
    properties = ctypes.create_string_buffer(4096)  # cudaDeviceProp starts with char name[256]
    libcudart.cudaGetDeviceProperties(properties, 0)
    return {"gpu": properties.raw[:256].split(b"\0")[0].decode(errors="replace"),
            "compute_capability": f"{major.value}.{minor.value}"}


def built_by(built_with: dict[str, Any]) -> str:
    """"TensorRT 10.8.0 on NVIDIA A10 (compute capability 8.6)", from the manifest's record."""
    return (f"TensorRT {built_with.get('version', '?')} on {built_with.get('gpu', 'an unknown GPU')} "
            f"(compute capability {built_with.get('compute_capability', '?')})")


def built_elsewhere(built_with: dict[str, Any]) -> str | None:
    """Why engines built as `built_with` records cannot run on this machine, naming both and the rebuild
    needed; None if they can. Call only where `usable()` is None."""
    import tensorrt as trt

    here, device = trt.__version__, gpu()
    if built_with.get("version") not in (None, here) and not built_with.get("version_compatible"):
        return (f"the engines were built with {built_by(built_with)}; this machine has TensorRT {here}: "
                "rebuild them here (python -m exporter build --backend tensorrt ...)")
    if (built_with.get("compute_capability") not in (None, device["compute_capability"])
            and built_with.get("hardware_compatibility", "none") == "none"):
        return (f"the engines were built with {built_by(built_with)}; this machine has {device['gpu']} "
                f"(compute capability {device['compute_capability']}): rebuild them here")
    return None


class TensorRTBackend:
    def __init__(self, engines: dict[str, Path], built_with: dict[str, Any]):
        import tensorrt as trt
        from polygraphy.backend.trt import TrtRunner

        here, origin = trt.__version__, built_by(built_with)
        problem = built_elsewhere(built_with)
        if problem:
            raise UserError(problem)
        runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
        self.runners = {}
        for graph, path in engines.items():
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise UserError(f"{path}: TensorRT {here} cannot load this engine, built with {origin}; "
                                "engines are specific to a GPU model and TensorRT version: rebuild it here")
            runner = TrtRunner(engine, name=graph)
            runner.activate()
            self.runners[graph] = runner
        self.locks = {graph: threading.Lock() for graph in self.runners}
        self.name = f"tensorrt/{here}"

    def run(self, graph: str, feed: dict[str, Any], keep: frozenset[str] = frozenset()) -> dict[str, Any]:
        from polygraphy import cuda

        with self.locks[graph]:
            outputs = self.runners[graph].infer(feed, copy_outputs_to_host=False)
            result: dict[str, Any] = {}
            for name, view in outputs.items():
                if name not in keep:
                    result[name] = view.numpy()
                    continue
                kept = cuda.DeviceArray(shape=view.shape, dtype=view.dtype)
                cuda.wrapper().memcpy(dst=kept.ptr, src=view.ptr, nbytes=view.nbytes,
                                      kind=cuda.MemcpyKind.DeviceToDevice)
                result[name] = kept
        return result

    def close(self) -> None:
        for runner in self.runners.values():
            runner.deactivate()
