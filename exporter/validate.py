"""Validation: run each built graph (ONNX Runtime here) against the reference PyTorch head.

Cases are the shape limits themselves (min, opt, max) and an odd-sized padded batch in between.
Every output is compared by its largest absolute difference and its cosine similarity, and logits
also by how often their top class agrees; the recipe's tolerance for the precision decides.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from runtime.heads import HeadSpec, expand

from .config import MegatronBertConfig
from .model import HeadModel
from .onnx_export import reference_outputs
from .samples import synthetic_inputs

ODD_SIZES = {"batch": 3, "choices": 3, "sequence": 37, "past_sequence": 23}


@dataclass
class Comparison:
    graph: str
    case: str
    sizes: dict[str, int]
    output: str  # an output name, or "present.*" for the whole KV cache
    max_abs: float
    cosine: float
    argmax: float | None  # share of positions whose top class agrees (logits only)
    passed: bool


def validation_cases(limits: dict[str, list[int]]) -> list[tuple[str, dict[str, int]]]:
    cases = [(name, {axis: v[i] for axis, v in limits.items()}) for i, name in enumerate(("min", "opt", "max"))]
    cases.append(("odd", {axis: min(max(ODD_SIZES[axis], v[0]), v[2]) for axis, v in limits.items()}))
    for _, sizes in cases:
        sizes["total_sequence"] = sizes["sequence"] + sizes.get("past_sequence", 0)  # used by decode graphs
    return cases


def compare(expected: np.ndarray, actual: np.ndarray, is_logits: bool) -> tuple[float, float, float | None]:
    e, a = expected.astype(np.float64), actual.astype(np.float64)
    max_abs = float(np.abs(e - a).max()) if e.size else 0.0
    norms = np.linalg.norm(e) * np.linalg.norm(a)
    cosine = float(np.dot(e.ravel(), a.ravel()) / norms) if norms else float(np.array_equal(e, a))
    argmax = float((e.argmax(-1) == a.argmax(-1)).mean()) if is_logits else None
    return max_abs, cosine, argmax


def within(tolerance: dict[str, float], max_abs: float, cosine: float, argmax: float | None) -> bool:
    return (max_abs <= tolerance.get("max_abs", np.inf) and cosine >= tolerance.get("min_cosine", -1.0)
            and (argmax is None or argmax >= tolerance.get("min_argmax", 0.0)))


def validate(model: HeadModel, spec: HeadSpec, config: MegatronBertConfig, graph_files: dict[str, Path],
             limits: dict[str, list[int]], tolerance: dict[str, float]) -> list[Comparison]:
    results: list[Comparison] = []
    for graph, path in graph_files.items():
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        inputs = expand(spec.graphs[graph].inputs, config.to_hf_dict())
        axes = {a for t in inputs for a in t.shape}
        for case, all_sizes in validation_cases(limits):
            sizes = {axis: size for axis, size in all_sizes.items() if axis in axes}
            feed = synthetic_inputs(inputs, sizes, config, spec.padding_side, seed=len(results))
            with torch.no_grad():
                expected = {k: v.numpy() for k, v in reference_outputs(model, feed).items()}
            names = [o.name for o in session.get_outputs()]
            actual = dict(zip(names, session.run(names, {k: v.numpy() for k, v in feed.items()})))
            results += _compare_case(graph, case, sizes, expected, actual, spec, tolerance)
    return results


def _compare_case(graph: str, case: str, sizes: dict[str, int], expected: dict[str, np.ndarray],
                  actual: dict[str, np.ndarray], spec: HeadSpec, tolerance: dict[str, float]) -> list[Comparison]:
    groups: dict[str, list[tuple[float, float, float | None]]] = {}
    for name, value in expected.items():
        group = "present.*" if name.startswith("present.") else name
        groups.setdefault(group, []).append(compare(value, actual[name], name in spec.logits))
    rows = []
    for group, metrics in groups.items():
        max_abs = max(m[0] for m in metrics)
        cosine = min(m[1] for m in metrics)
        argmaxes = [m[2] for m in metrics if m[2] is not None]
        argmax = min(argmaxes) if argmaxes else None
        rows.append(Comparison(graph, case, sizes, group, max_abs, cosine, argmax,
                               within(tolerance, max_abs, cosine, argmax)))
    return rows


def summary(results: list[Comparison], precision: str, tolerance: dict[str, float]) -> dict[str, Any]:
    """What the manifest records of a validation."""
    return {"backend": f"onnxruntime {ort.__version__} CPUExecutionProvider", "reference": "PyTorch fp32",
            "precision": precision, "tolerance": tolerance, "passed": all(r.passed for r in results),
            "cases": [asdict(r) for r in results]}


def table(results: list[Comparison]) -> str:
    lines = [f"{'graph':<8} {'case':<5} {'shape':<22} {'output':<24} {'max_abs':>9} {'cosine':>9} {'argmax':>7}  ok"]
    for r in results:
        shape = " ".join(f"{k[0]}{v}" for k, v in r.sizes.items() if k != "total_sequence")
        argmax = "-" if r.argmax is None else f"{r.argmax:.3f}"
        lines.append(f"{r.graph:<8} {r.case:<5} {shape:<22} {r.output:<24} {r.max_abs:>9.2e} {r.cosine:>9.6f} "
                     f"{argmax:>7}  {'yes' if r.passed else 'NO'}")
    return "\n".join(lines)
