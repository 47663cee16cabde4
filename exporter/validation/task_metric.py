"""Task accuracy in the build: the head's metric on the recipe's evaluation set, for PyTorch fp32 and
for every graph and engine the build writes, judged against the recipe's `[accuracy.<precision>]`
bound (`max_drop`: points of the metric below PyTorch fp32).

Each form is measured through `runtime.Session` on the staged artifact, so what is measured is what
users run: the same tokenization, windows and post-processing (`runtime.evaluation`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from runtime.backends import Backend
from runtime.errors import UserError
from runtime.evaluation import METRICS, Example, Scores, evaluate, read_examples
from runtime.files import sha256_of
from runtime.manifest import Manifest
from runtime.session import Session

from exporter.export.cache import add_weights
from exporter.model.megatron_bert import HeadModel
from exporter.export.to_onnx import reference_outputs

REFERENCE = "pytorch fp32"
# PyTorch fp32's scores and predictions by what they were measured on (weights, artifact description,
# tokenizer, examples), kept for this process: the precisions of one head in build-all share them (at
# 345M, PyTorch takes about two minutes over the 200 qa examples).
_REFERENCE_RUNS: dict[str, tuple[Scores, list[Any] | None]] = {}


class TorchBackend:
    """The reference PyTorch head behind a Session, so its task accuracy is measured exactly as an
    artifact's is."""

    name = "pytorch"

    def __init__(self, model: HeadModel):
        self.model = model

    def run(self, graph: str, feed: dict[str, Any], keep: frozenset[str] = frozenset()) -> dict[str, Any]:
        with torch.no_grad():
            outputs = reference_outputs(self.model, {k: torch.from_numpy(v) for k, v in feed.items()})
        return {k: v.numpy() for k, v in outputs.items()}


@dataclass
class Evaluation:
    head: str
    data: Path
    metric: str  # the one that decides
    examples: list[Example]
    max_drop: dict[str, float]  # precision -> points below PyTorch fp32
    results: dict[str, Scores] = field(default_factory=dict)  # form -> scores
    reference: list[Any] | None = None  # PyTorch fp32's predictions

    def measure(self, form: str, manifest: Manifest, staging: Path, backend: Backend) -> Scores:
        """Score one form (through a Session on the staged artifact); the first is PyTorch's."""
        try:
            scores, predicted = evaluate(Session.staged(manifest, staging, backend), self.examples, self.reference)
        except UserError as err:  # e.g. an example longer than the artifact's limits
            raise UserError(f"evaluation set {self.data}: {err} (pass --eval-data with examples that fit, "
                            "or --eval-data none)") from None
        if self.reference is None:
            self.reference = predicted
        self.results[form] = scores
        return scores

    def measure_reference(self, model: HeadModel, manifest: Manifest, staging: Path) -> bool:
        """Score PyTorch fp32, or take its scores from an earlier build of the same weights, artifact
        description, tokenizer and examples in this process; returns whether they were measured now."""
        digest = hashlib.sha256()
        add_weights(digest, model)
        described = {"config": manifest.config, "head": manifest.head, "shape_limits": manifest.shape_limits,
                     "tokenizer": {k: v for k, v in manifest.tokenizer.items() if k != "file"},  # the file: its bytes
                     "data": sha256_of(self.data), "examples": len(self.examples)}
        digest.update(json.dumps(described, sort_keys=True).encode())
        digest.update((staging / manifest.tokenizer["file"]).read_bytes())
        key = digest.hexdigest()
        if key in _REFERENCE_RUNS:
            scores, self.reference = _REFERENCE_RUNS[key]
            self.results[REFERENCE] = dict(scores)
            return False
        _REFERENCE_RUNS[key] = (dict(self.measure(REFERENCE, manifest, staging, TorchBackend(model))), self.reference)
        return True

    def drop(self, form: str) -> float:
        return self.results[REFERENCE][self.metric] - self.results[form][self.metric]

    def problems(self, precision: str, forms: list[str]) -> list[str]:
        """One line per form whose metric fell further below PyTorch fp32 than the recipe allows."""
        bound = self.max_drop.get(precision)
        if bound is None:
            return []
        return [f"{form}: {self.metric} {self.results[form][self.metric]:.2f} is {self.drop(form):.2f} points below "
                f"PyTorch fp32's {self.results[REFERENCE][self.metric]:.2f} (the {precision} bound is {bound})"
                for form in forms if self.drop(form) > bound]

    def record(self, precision: str, forms: list[str]) -> dict[str, Any]:
        """What the manifest keeps: the data, the metric, the bound, every form's scores and verdict."""
        return {"data": str(self.data), "data_sha256": sha256_of(self.data), "examples": len(self.examples),
                "metric": self.metric, "max_drop": self.max_drop.get(precision), "results": self.results,
                "passed": not self.problems(precision, forms)}

    def table(self) -> str:
        names = list(dict.fromkeys(k for scores in self.results.values() for k in scores))
        lines = [f"{'task accuracy (' + self.data.name + ')':<34}" + "".join(f"{n:>20}" for n in names)]
        for form, scores in self.results.items():
            lines.append(f"{form:<34}" + "".join(f"{scores[n]:>20.2f}" if n in scores else f"{'-':>20}"
                                                    for n in names))
        return "\n".join(lines)


def evaluation_for(head: str, setting: dict[str, Any], accuracy: dict[str, dict[str, Any]], data: str | None
                   ) -> Evaluation | None:
    """The evaluation a recipe's [evaluation] `setting` (or `--eval-data FILE`) asks for, judged by its
    [accuracy.<precision>] bounds; None for `--eval-data none` or a recipe without an evaluation set (then
    logit tolerances decide every precision)."""
    path = data if data is not None else setting.get("data")
    if path is None or path == "none":
        return None
    metrics = METRICS[head].names
    metric = setting.get("metric", metrics[0])
    if metric not in metrics:
        raise UserError(f"the {head} head's evaluation measures {', '.join(metrics)}, not {metric!r}")
    bounds = {precision: float(b["max_drop"]) for precision, b in accuracy.items() if "max_drop" in b}
    return Evaluation(head, Path(path), metric, read_examples(path, head), bounds)
