"""Validation: run each built graph (ONNX Runtime, or a TensorRT engine) against the reference PyTorch head.

Cases are the shape limits themselves (min, opt, max) and an odd-sized padded batch in between.
Every output is compared by its largest absolute difference and its cosine similarity, and logits
also by how often their top class agrees; question answering also by how often the best answer span
(start <= end, at most MAX_SPAN tokens) agrees. The recipe's tolerance for the precision decides.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from runtime.heads import HeadSpec, expand
from runtime.threads import ort_options

from exporter.model.config import MegatronBertConfig
from exporter.model.megatron_bert import HeadModel
from exporter.export.to_onnx import reference_outputs
from exporter.model.samples import synthetic_inputs

ODD_SIZES = {"batch": 3, "choices": 3, "sequence": 37, "past_sequence": 23}
MAX_SPAN = 30
Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass
class Comparison:
    backend: str
    graph: str
    case: str
    sizes: dict[str, int]
    output: str  # an output name, or "present.*" for the whole KV cache
    max_abs: float
    cosine: float
    argmax: float | None  # share of positions whose top class agrees (logits only)
    passed: bool
    positions: int = 0  # how many positions the argmax share is of


def validation_cases(limits: dict[str, list[int]]) -> list[tuple[str, dict[str, int]]]:
    cases = [(name, {axis: v[i] for axis, v in limits.items()}) for i, name in enumerate(("min", "opt", "max"))]
    cases.append(("odd", {axis: min(max(ODD_SIZES[axis], v[0]), v[2]) for axis, v in limits.items()}))
    for _, sizes in cases:
        sizes["total_sequence"] = sizes["sequence"] + sizes.get("past_sequence", 0)  # used by decode graphs
    return cases


def compare(expected: np.ndarray, actual: np.ndarray, is_logits: bool, tie: float = 0.0
            ) -> tuple[float, float, float | None]:
    """max_abs, cosine, and for logits the share of positions whose top class agrees. A class whose
    reference logit is within `tie` of the reference's best counts as agreeing: near-ties (common in
    untrained models) may fall either way without the model being wrong."""
    e, a = expected.astype(np.float64), actual.astype(np.float64)
    max_abs = float(np.abs(e - a).max()) if e.size else 0.0
    norms = np.linalg.norm(e) * np.linalg.norm(a)
    cosine = float(np.dot(e.ravel(), a.ravel()) / norms) if norms else float(np.array_equal(e, a))
    argmax = None
    if is_logits:
        chosen = np.take_along_axis(e, a.argmax(-1)[..., None], -1)[..., 0]
        argmax = float((chosen >= e.max(-1) - tie).mean())
    return max_abs, cosine, argmax


def within(tolerance: dict[str, float], max_abs: float, cosine: float, argmax: float | None) -> bool:
    return (max_abs <= tolerance.get("max_abs", np.inf) and cosine >= tolerance.get("min_cosine", -1.0)
            and (argmax is None or argmax >= tolerance.get("min_argmax", 0.0)))


def ort_runner(path: Path) -> Runner:
    session = ort.InferenceSession(str(path), ort_options(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda feed: dict(zip(names, session.run(names, feed)))


@dataclass
class Case:
    graph: str
    name: str  # min, opt, max or odd
    sizes: dict[str, int]
    feed: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]  # the PyTorch reference's outputs


def reference_cases(model: HeadModel, spec: HeadSpec, config: MegatronBertConfig, limits: dict[str, list[int]]
                    ) -> list[Case]:
    """Every validation input of every graph with PyTorch's outputs for it: computed once, then held
    against each backend's graphs or engines (the model itself may go before they load)."""
    cases: list[Case] = []
    for graph, declared in spec.graphs.items():
        inputs = expand(declared.inputs, config.to_hf_dict())
        axes = {a for t in inputs for a in t.shape}
        for name, all_sizes in validation_cases(limits):
            sizes = {axis: size for axis, size in all_sizes.items() if axis in axes}
            feed = synthetic_inputs(inputs, sizes, config, spec.padding_side, seed=len(cases))
            with torch.no_grad():
                if "past_key_values.0.key" in feed:
                    feed.update(model_made_cache(model, feed, config))
                expected = row_by_row(model, feed)
            cases.append(Case(graph, name, sizes, {k: v.numpy() for k, v in feed.items()}, expected))
    return cases


def row_by_row(model: HeadModel, feed: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """PyTorch's outputs computed one batch row at a time: the same numbers, with one row's activations
    held at once instead of the batch's (at 3.9B, batch 8 x 384 tokens, 4 GiB on top of the weights)."""
    rows = [reference_outputs(model, {k: v[i:i + 1] for k, v in feed.items()})
            for i in range(len(next(iter(feed.values()))))]
    return {name: np.concatenate([row[name].numpy() for row in rows]) for name in rows[0]}


def validate(cases: list[Case], runners: Mapping[str, Runner], spec: HeadSpec, tolerance: dict[str, float],
             backend: str = "onnxruntime") -> list[Comparison]:
    """Compare each graph's runner with PyTorch on every validation case."""
    results: list[Comparison] = []
    for graph, run in runners.items():
        for case in (c for c in cases if c.graph == graph):
            results += _compare_case(backend, graph, case.name, case.sizes, case.expected, run(case.feed), spec,
                                     tolerance)
        results += _pooled([r for r in results if r.graph == graph], tolerance)
    return results


def _pooled(rows: list[Comparison], tolerance: dict[str, float]) -> list[Comparison]:
    """One "all" row per output over every case: argmax agreement is judged here, over all positions
    together, not per case (a case of three rows can only agree on 0, 1/3, 2/3 or all of them)."""
    pooled = []
    for output in dict.fromkeys(r.output for r in rows):
        mine = [r for r in rows if r.output == output]
        max_abs, cosine = max(r.max_abs for r in mine), min(r.cosine for r in mine)
        positions = sum(r.positions for r in mine)
        argmax = sum((r.argmax or 0.0) * r.positions for r in mine) / positions if positions else None
        pooled.append(Comparison(mine[0].backend, mine[0].graph, "all", {}, output, max_abs, cosine, argmax,
                                 within(tolerance, max_abs, cosine, argmax), positions))
    return pooled


def model_made_cache(model: HeadModel, feed: dict[str, torch.Tensor], config: MegatronBertConfig
                     ) -> dict[str, torch.Tensor]:
    """The KV cache the model itself makes of the decode input's past tokens. Random values would lie
    far outside the ranges a real cache has, where int8's calibrated ranges do not reach."""
    past = feed["past_key_values.0.key"].shape[2]
    mask = feed["attention_mask"][:, :past]
    ids = torch.randint(1, config.vocab_size, mask.shape, generator=torch.Generator().manual_seed(past))
    prefill = {"input_ids": ids * mask, "attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp(min=0)}
    return {name.replace("present", "past_key_values"): value
            for name, value in reference_outputs(model, prefill).items() if name.startswith("present.")}


def best_spans(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """[batch, 2]: each row's highest-scoring (start, end) with start <= end < start + MAX_SPAN."""
    scores = start[:, :, None] + end[:, None, :]
    positions = np.arange(start.shape[1])
    offsets = positions[None, :] - positions[:, None]
    scores = np.where((offsets >= 0) & (offsets < MAX_SPAN), scores, -np.inf)
    flat = scores.reshape(len(scores), -1).argmax(axis=1)
    return np.stack(np.unravel_index(flat, scores.shape[1:]), axis=1)


def _compare_case(backend: str, graph: str, case: str, sizes: dict[str, int], expected: dict[str, np.ndarray],
                  actual: dict[str, np.ndarray], spec: HeadSpec, tolerance: dict[str, float]) -> list[Comparison]:
    groups: dict[str, list[tuple[float, float, float | None]]] = {}
    positions: dict[str, int] = {}
    tie = tolerance.get("tie_margin", 0.0)
    for name, value in expected.items():
        group = "present.*" if name.startswith("present.") else name
        groups.setdefault(group, []).append(compare(value, actual[name], name in spec.logits, tie))
        positions[group] = value.size // max(value.shape[-1], 1) if name in spec.logits else 0
    if {"start_logits", "end_logits"} <= expected.keys():
        start, end = expected["start_logits"], expected["end_logits"]
        spans = [best_spans(outputs["start_logits"], outputs["end_logits"]) for outputs in (expected, actual)]
        batch = np.arange(len(start))
        score = [start[batch, s[:, 0]] + end[batch, s[:, 1]] for s in spans]  # both spans scored by the reference
        agree = float((score[1] >= score[0] - tie).mean())
        groups["answer span"] = [(*groups["start_logits"][0][:2], agree), (*groups["end_logits"][0][:2], agree)]
        positions["answer span"] = len(spans[0])
    rows = []
    for group, metrics in groups.items():
        max_abs = max(m[0] for m in metrics)
        cosine = min(m[1] for m in metrics)
        argmaxes = [m[2] for m in metrics if m[2] is not None]
        argmax = min(argmaxes) if argmaxes else None
        rows.append(Comparison(backend, graph, case, sizes, group, max_abs, cosine, argmax,
                               within(tolerance, max_abs, cosine, None), positions[group]))
    return rows


def failures(results: list[Comparison]) -> list[str]:
    """One line per output that failed, naming the measure and the case."""
    return [f"{r.backend} {r.graph} {r.output} ({r.case}): max_abs {r.max_abs:.2e}, cosine {r.cosine:.6f}"
            + ("" if r.argmax is None else f", argmax {r.argmax:.3f}") for r in results if not r.passed]


def summary(results: list[Comparison], precision: str, tolerance: dict[str, float], problems: list[str],
            forms: dict[str, bool]) -> dict[str, Any]:
    """What the manifest records of a validation; `forms`: whether each form (a backend over some of the
    artifact's graphs, e.g. "openvino bf16") passed."""
    return {"backends": sorted({r.backend for r in results}), "onnxruntime": f"{ort.__version__} CPUExecutionProvider",
            "reference": "PyTorch fp32", "precision": precision, "tolerance": tolerance, "passed": not problems,
            "problems": problems, "forms": forms, "cases": [asdict(r) for r in results]}


def table(results: list[Comparison]) -> str:
    lines = [f"{'backend':<16} {'graph':<8} {'case':<5} {'shape':<22} {'output':<24} {'max_abs':>9} {'cosine':>9} "
             f"{'argmax':>7}  ok"]
    for r in results:
        shape = " ".join(f"{k[0]}{v}" for k, v in r.sizes.items() if k != "total_sequence")
        argmax = "-" if r.argmax is None else f"{r.argmax:.3f}"
        lines.append(f"{r.backend:<16} {r.graph:<8} {r.case:<5} {shape:<22} {r.output:<24} {r.max_abs:>9.2e} {r.cosine:>9.6f} "
                     f"{argmax:>7}  {'yes' if r.passed else 'NO'}")
    return "\n".join(lines)
