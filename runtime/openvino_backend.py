"""OpenVINO backend: runs an artifact's ONNX graphs on the CPU with OpenVINO (the `openvino` extra).

OpenVINO reads ONNX directly, so there is no conversion step. What it adds over ONNX Runtime on CPU:
bf16 compute on CPUs that have it natively (AVX-512 BF16 or AMX), and int8 kernels for the Q/DQ
graph (`NAME.qdq.onnx`, the one TensorRT builds from). Compiled models are cached (OpenVINO's
CACHE_DIR, `cache_folder()`), so opening an artifact a second time skips the compilation.

Thread safety: a compiled model is shared; each thread runs its own infer request.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError
from .files import cache_root
from .threads import engine_threads

# What OpenVINO computes in, by the names this project uses
INFERENCE_PRECISIONS = {"bf16": "bf16", "fp32": "f32"}


def cache_folder() -> Path:
    """Where compiled models are kept: the runtime's cache folder's `openvino/`."""
    return cache_root() / "openvino"


def usable() -> str | None:
    """None if OpenVINO imports; else why not."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "OpenVINO is not installed (pip install 'megatron-deploy[openvino]')"
    return None


def version() -> str | None:
    if usable() is not None:
        return None
    import openvino

    return str(openvino.__version__)


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (OpenVINO lists BF16 among the CPU's capabilities)."""
    import openvino

    return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class OpenVinoBackend:
    def __init__(self, files: dict[str, Path], outputs: dict[str, list[str]], float_precision: str | None = None,
                 cache: bool = True):
        """`outputs`: each graph's output names as declared (a compiled output may carry other names too,
        e.g. of a Cast the fp16 conversion put before it).
        `float_precision`: what float graphs compute in, "bf16" or "fp32"; None: bf16 where the CPU
        has it natively, else fp32. int8 (Q/DQ) graphs compute their products in int8 either way.
        `cache`: keep the compiled models in `cache_folder()` (a build's staged graphs are not worth it)."""
        reason = usable()
        if reason:
            raise UserError(f"cannot use the openvino backend: {reason}")
        import openvino

        if float_precision not in (None, *INFERENCE_PRECISIONS):
            raise UserError(f"unknown precision {float_precision!r} for OpenVINO; choose one of "
                            f"{', '.join(INFERENCE_PRECISIONS)}")
        bf16 = native_bf16()
        if float_precision == "bf16" and not bf16:
            raise UserError("this CPU has no native bf16 (AVX-512 BF16 or AMX), where OpenVINO would run bf16 "
                            "slower than fp32; use precision 'fp32'")
        wanted = float_precision or ("bf16" if bf16 else "fp32")
        core = openvino.Core()
        self.cache = cache_folder() if cache else None
        if self.cache:
            self.cache.mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(self.cache)})
        threads = engine_threads()
        config = {"INFERENCE_PRECISION_HINT": INFERENCE_PRECISIONS[wanted], "PERFORMANCE_HINT": "LATENCY",
                  **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
        self.files = files
        # Compiled from the model read, not from its path: the cache is then keyed by the graph's content,
        # and a graph replaced at the same path never loads the old one's compiled form.
        self.compiled = {graph: core.compile_model(core.read_model(str(path)), "CPU", config)
                         for graph, path in files.items()}
        # what it computes in, as compiled (a bf16 hint on a CPU without bf16 is quietly fp32)
        running = {m.get_property("INFERENCE_PRECISION_HINT").get_type_name() for m in self.compiled.values()}
        self.float_precision = "bf16" if running == {"bf16"} else "fp32"
        self.outputs = {graph: [declared_name(port.get_names(), outputs[graph], files[graph]) for port in model.outputs]
                        for graph, model in self.compiled.items()}
        self._local = threading.local()
        self.name = "openvino/CPU"
        self.device = "cpu"

    def run(self, graph: str, feed: dict[str, Any], keep: frozenset[str] = frozenset()) -> dict[str, Any]:
        """`keep` is moot on the CPU: every output comes back as numpy."""
        requests = self._local.__dict__.setdefault("requests", {})
        if graph not in requests:
            requests[graph] = self.compiled[graph].create_infer_request()
        results = requests[graph].infer({name: np.ascontiguousarray(value) for name, value in feed.items()})
        return dict(zip(self.outputs[graph], results.to_tuple()))


def declared_name(names: set[str], declared: list[str], path: Path) -> str:
    """Which declared output an OpenVINO output port is (it may carry several names, fp16 graphs' casts')."""
    name = next((n for n in declared if n in names), None)
    if name is None:
        raise UserError(f"{path}: the graph has an output ({', '.join(sorted(names))}) its manifest does not declare; "
                        "rebuild the artifact")
    return name
