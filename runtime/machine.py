"""What this machine is, as every speed figure must say: the CPU by name, the instruction sets that
decide speed here, cores and threads, and the backends it has (read once per process); and how a
call is timed on it."""

from __future__ import annotations

import functools
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from . import openvino_backend, tensorrt_backend

# The flags that decide speed: AVX2 everywhere here; VNNI and bf16 (AVX-512, AMX) on some CPUs
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


@functools.cache
def cpuinfo() -> tuple[str, frozenset[str], int | None]:
    """The CPU's name, all its flags, and its physical cores (None where the system does not say)."""
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    name = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), platform.processor())
    flags = frozenset(next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), []))
    ids = [line.split(":", 1)[1].strip() for line in info if line.startswith(("physical id", "core id"))]
    cores = set(zip(ids[::2], ids[1::2]))  # (socket, core) per logical processor
    return name, flags, len(cores) or None


def cpu() -> str:
    """The CPU's name with its AVX/AMX flags: what a remembered timing holds for."""
    name, flags, _ = cpuinfo()
    return f"{name} [{' '.join(sorted(f for f in flags if f.startswith(('avx', 'amx'))))}]"


def describe() -> dict[str, Any]:
    """The machine as benchmarks record it."""
    name, flags, physical = cpuinfo()
    return {"cpu": name, "cpu_flags": [f for f in CPU_FLAGS if f in flags], "cores": os.cpu_count(),
            "physical_cores": physical,  # ONNX Runtime's default thread count
            "platform": platform.platform(), "onnxruntime_providers": ort.get_available_providers(),
            "tensorrt": tensorrt_backend.usable() or "available",
            "openvino": openvino_backend.usable() or ("native bf16" if openvino_backend.native_bf16() else "no native bf16")}


def timed(call: Callable[[], object], warmup: int, iterations: int) -> np.ndarray:
    """Seconds per call, after `warmup` untimed calls."""
    for _ in range(warmup):
        call()
    times = np.empty(iterations)
    for i in range(iterations):
        start = time.perf_counter()
        call()
        times[i] = time.perf_counter() - start
    return times
