"""TensorRT engines (`NAME.plan`) built from an artifact's ONNX graphs, through polygraphy.

Precision comes from the graph: fp16 weights and activations, int8 Q/DQ nodes. TensorRT >= 10.12 builds
it as a strongly typed network (TensorRT 11 knows nothing else: its FP16/INT8 builder flags and
calibrators are gone); older 10.x get the matching builder flags instead. The optimization profile is
the recipe's [min, opt, max] of each dynamic axis. A timing cache shared by all builds of a machine
makes rebuilds fast.

TensorRT is imported only inside the functions: nothing here is needed where no engine is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime import tensorrt_backend
from runtime.heads import TensorSpec

from exporter.flags import option

STRONGLY_TYPED_SINCE = (10, 12)
HARDWARE_COMPATIBILITY = ("none", "ampere+", "same-compute-capability")


@dataclass
class EngineOptions:
    workspace_gib: float | None = option("builder workspace limit (default: TensorRT's, the GPU's memory)",
                                         metavar="GIB", group="TensorRT", name="--workspace")
    optimization_level: int | None = option("higher builds slower, may run faster (default: TensorRT's, 3)",
                                            choices=range(6), metavar="0-5", group="TensorRT",
                                            name="--builder-optimization-level")
    hardware_compatibility: str = option("let the engine run on other GPUs too, at some speed cost", "none",
                                         choices=HARDWARE_COMPATIBILITY, group="TensorRT")
    timing_cache: Path = option("tactic timing cache shared by builds", metavar="FILE", group="TensorRT",
                                factory=lambda: Path.home() / ".cache" / "megatron-deploy" / "trt.cache")


Shapes = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def profile_shapes(inputs: list[TensorSpec], limits: dict[str, list[int]]) -> Shapes:
    """(min, opt, max) shape of every input from the shape limits; total_sequence = past + new tokens."""
    bounds = {axis: list(v) for axis, v in limits.items()}
    if "past_sequence" in bounds:
        bounds["total_sequence"] = [p + s for p, s in zip(bounds["past_sequence"], bounds["sequence"])]
    return {t.name: tuple(tuple(bounds[a][i] if isinstance(a, str) else a for a in t.shape)  # type: ignore[misc]
                          for i in range(3))
            for t in inputs}


def version() -> tuple[int, ...]:
    import tensorrt as trt

    return tuple(int(part) for part in trt.__version__.split(".")[:2])


def build_engine(onnx_path: Path, plan: Path, shapes: Shapes, precision: str, options: EngineOptions) -> dict[str, Any]:
    """Build `plan` from the ONNX graph; returns what the manifest records of the build."""
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, SaveEngine

    strongly_typed = version() >= STRONGLY_TYPED_SINCE
    profile = Profile()
    for name, (low, opt, high) in shapes.items():
        profile.add(name, min=low, opt=opt, max=high)
    compatibility = {"none": trt.HardwareCompatibilityLevel.NONE,
                     "ampere+": trt.HardwareCompatibilityLevel.AMPERE_PLUS,
                     "same-compute-capability": trt.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY}
    options.timing_cache.parent.mkdir(parents=True, exist_ok=True)
    config = CreateConfig(
        profiles=[profile],
        # before strongly typed networks, TensorRT took precision from flags (the Q/DQ scales still rule int8)
        fp16=None if strongly_typed else precision in ("fp16", "int8"),
        int8=None if strongly_typed else precision == "int8",
        memory_pool_limits=None if options.workspace_gib is None else
        {trt.MemoryPoolType.WORKSPACE: int(options.workspace_gib * 2**30)},
        builder_optimization_level=options.optimization_level,
        hardware_compatibility_level=compatibility[options.hardware_compatibility],
        load_timing_cache=str(options.timing_cache) if options.timing_cache.exists() else None)
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=strongly_typed)
    engine = EngineFromNetwork(network, config, save_timing_cache=str(options.timing_cache))
    SaveEngine(engine, str(plan))()
    return {"version": trt.__version__, **tensorrt_backend.gpu(), "strongly_typed": strongly_typed,
            "hardware_compatibility": options.hardware_compatibility,
            "optimization_level": options.optimization_level, "workspace_gib": options.workspace_gib}
