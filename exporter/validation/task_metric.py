"""Task accuracy in the build: the head's metric on the recipe's evaluation set, for fp32 and for
every graph and engine the build writes, judged against the recipe's `[accuracy.<precision>]` bound
(`max_drop`: points of the metric below fp32's). fp32's is that of the fp32 graphs on ONNX Runtime once
their outputs matched PyTorch's: in an fp32 build (decided by its logits), its first form's; in the
others, a pass run beside the conversion (`exporter.pipeline.fp32_reference`). Only the examples that fit the artifact
are measured, and a form's scoring stops once its bound is decided (`decided_early`).

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
from runtime.evaluation import METRICS, Example, Scores, evaluate, fitting, means, percent, read_examples
from runtime.files import sha256_of
from runtime.manifest import Manifest
from runtime.session import Session

from exporter.export.cache import add_weights
from exporter.model.megatron_bert import HeadModel
from exporter.export.to_onnx import reference_outputs

# Fewer fitting examples than this (or than the whole set, if smaller) and the build refuses: a bound of
# a point or two means little over a handful of examples.
MIN_FITTING = 50
# fp32's scores and predictions by what they were measured on (weights, artifact description,
# tokenizer, examples), kept for this process: the precisions of one head in build-all share them (at
# 345M, one pass over the 200 qa examples takes minutes).
_REFERENCE_RUNS: dict[str, tuple[str, Scores, list[Any]]] = {}


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
    """The task metric of one build: fp32's (PyTorch's, or the first ONNX form whose logits matched
    PyTorch's: fp32 is decided by its logits) and every other form's against it, each example encoded
    once for all forms."""

    head: str
    data: Path
    metric: str  # the one that decides
    examples: list[Example]  # those this artifact can measure, once prepared
    max_drop: dict[str, float]  # precision -> points below fp32
    results: dict[str, Scores] = field(default_factory=dict)  # form -> scores
    reference_form: str | None = None  # the entry of `results` that holds fp32's metric
    reference: list[Any] | None = None  # its predictions
    left_out: list[str] = field(default_factory=list)  # why each example that does not fit was left out
    early: dict[str, dict[str, Any]] = field(default_factory=dict)  # form -> where its bound was decided
    encodings: dict[Any, Any] = field(default_factory=dict)  # the tokenizer's work, shared by the forms
    key: str = ""  # what fp32's metric depends on (see prepare)
    # How the fp32 graphs matched PyTorch on the first examples, in other precisions (pipeline.fp32_reference)
    reference_check: dict[str, Any] = field(default_factory=dict)

    def prepare(self, model: HeadModel, manifest: Manifest, staging: Path) -> None:
        """Keep the examples this artifact can measure (refusing if too few fit), shortest first, and key
        fp32's metric by the weights, artifact description, tokenizer and examples (`_REFERENCE_RUNS`).
        Shortest first: a form's scoring goes in parts of one batch, each of examples of about one length,
        and where its bound is decided early, the examples left unscored are the costliest."""
        fit, self.left_out, tokens = fitting(Session.staged(manifest, staging, TorchBackend(model), self.encodings),
                                             self.examples)
        needed = min(MIN_FITTING, len(self.examples))
        if len(fit) < needed:
            raise UserError(f"evaluation set {self.data}: {len(fit)} of its {len(self.examples)} examples fit this "
                            f"artifact and at least {needed} must (first misfit: {self.left_out[0]}); pass "
                            "--eval-data with examples that fit, or --eval-data none")
        self.examples = [fit[i] for i in sorted(range(len(fit)), key=lambda i: tokens[i])]
        digest = hashlib.sha256()
        add_weights(digest, model)
        described = {"config": manifest.config, "head": manifest.head, "shape_limits": manifest.shape_limits,
                     "tokenizer": {k: v for k, v in manifest.tokenizer.items() if k != "file"},  # the file: its bytes
                     "data": sha256_of(self.data), "examples": len(self.examples)}
        digest.update(json.dumps(described, sort_keys=True).encode())
        digest.update((staging / manifest.tokenizer["file"]).read_bytes())
        self.key = digest.hexdigest()

    def cached_reference(self) -> bool:
        """Take fp32's metric from an earlier build of the same key in this process, if there was one."""
        if self.key not in _REFERENCE_RUNS:
            return False
        self._reference(*_REFERENCE_RUNS[self.key])
        return True

    def measure_fp32(self, form: str, manifest: Manifest, staging: Path, backend: Backend) -> None:
        """Score an fp32 form whose outputs matched PyTorch's: its metric stands for fp32's (here, and as
        "FORM fp32" for the other precisions of the same weights built later in this process)."""
        session = Session.staged(manifest, staging, backend, self.encodings)
        self.take_reference(form, *self.evaluate_on(session, self.examples, None), cached_as=f"{form} fp32")

    def take_reference(self, form: str, scores: Scores, predicted: list[Any], cached_as: str | None = None) -> None:
        """fp32's metric, measured by `form`; later builds of the same key in this process take it as `cached_as`."""
        _REFERENCE_RUNS.setdefault(self.key, (cached_as or form, scores, predicted))
        self._reference(form, scores, predicted)

    def _reference(self, form: str, scores: Scores, predicted: list[Any]) -> None:
        self.reference_form, self.reference = form, predicted
        self.results[form] = dict(scores)

    def measure(self, form: str, precision: str, manifest: Manifest, staging: Path, backend: Backend) -> None:
        """Score a form judged against fp32's metric. Where the metric is a mean over examples, they are
        scored part by part, and scoring stops once the bound is decided whatever the rest hold."""
        self.early.pop(form, None)
        if self.reference is None:  # no fp32 form matched PyTorch: the build fails on that already
            return
        session = Session.staged(manifest, staging, backend, self.encodings)
        each, bound = METRICS[self.head].each, self.max_drop.get(precision)
        if self.metric not in each or bound is None:
            self.results[form] = self.evaluate_on(session, self.examples, self.reference)[0]
            return
        value = each[self.metric]
        # Parts of the artifact's largest batch: each still runs full batches of examples of about one length
        total, size, lost = len(self.examples), manifest.shape_limits["batch"][2], 0.0
        predicted: list[Any] = []
        reference = [value(e, p) for e, p in zip(self.examples, self.reference)]
        # Looked at before the first part too: where fp32 got (nearly) nothing right, nothing can be lost
        while (decided := decided_early(lost, sum(reference[len(predicted):]), len(predicted), total, bound)) is None \
                and len(predicted) < total:
            first = len(predicted)
            part = self.examples[first:first + size]
            predicted += self.evaluate_on(session, part, self.reference[first:first + size])[1]
            lost += sum(reference[first:first + size]) - sum(value(e, p) for e, p in zip(part, predicted[first:]))
        if decided is not None:
            self.early[form] = decided
        scored = self.examples[:len(predicted)]  # none, where the bound was decided before any
        self.results[form] = {**means(each, scored, predicted),
                              "agreement": percent([p == r for p, r in zip(predicted, self.reference)])} if scored else {}

    def evaluate_on(self, session: Session, examples: list[Example], reference: list[Any] | None
                  ) -> tuple[Scores, list[Any]]:
        try:
            return evaluate(session, examples, reference)
        except UserError as err:
            raise UserError(f"evaluation set {self.data}: {err} (pass --eval-data with examples that fit, "
                            "or --eval-data none)") from None

    def problems(self, precision: str, forms: list[str]) -> list[str]:
        """One line per form whose metric fell (or is certain to fall) further below fp32's than the
        recipe allows."""
        bound = self.max_drop.get(precision)
        if bound is None:
            return []
        if self.reference_form is None:
            return [f"{form}: {self.metric} not measured (the fp32 graphs' outputs did not match PyTorch's, so there "
                    "is no fp32 metric to hold it against)" for form in forms]
        fp32 = self.results[self.reference_form][self.metric]
        lines = []
        for form in forms:
            early = self.early.get(form)
            if early is not None and early["drop_at_least"] > bound:
                lines.append(f"{form}: after {early['scored']} of {len(self.examples)} examples, its {self.metric} "
                             f"is certain to end at least {early['drop_at_least']:.2f} points below fp32's "
                             f"{fp32:.2f} (the {precision} bound is {bound})")
            elif early is None and fp32 - self.results[form][self.metric] > bound:
                lines.append(f"{form}: {self.metric} {self.results[form][self.metric]:.2f} is "
                             f"{fp32 - self.results[form][self.metric]:.2f} points below fp32's {fp32:.2f} "
                             f"(the {precision} bound is {bound})")
        return lines

    def record(self, precision: str, forms: list[str]) -> dict[str, Any]:
        """What the manifest keeps: the data, the metric, the bound, every form's scores and verdict."""
        return {"data": str(self.data), "data_sha256": sha256_of(self.data), "examples": len(self.examples),
                "left_out": len(self.left_out), "metric": self.metric, "max_drop": self.max_drop.get(precision),
                "reference": self.reference_form, "reference_check": self.reference_check, "results": self.results,
                "decided_early": self.early,
                "passed": not self.problems(precision, forms)}

    def table(self) -> str:
        names = list(dict.fromkeys(k for scores in self.results.values() for k in scores))
        lines = [f"{'task accuracy (' + self.data.name + ')':<34}" + "".join(f"{n:>20}" for n in names)]
        for form, scores in self.results.items():
            lines.append(f"{form + (' (fp32)' if form == self.reference_form else ''):<34}"
                         + "".join(f"{scores[n]:>20.2f}" if n in scores else f"{'-':>20}" for n in names))
        lines += [f"  {form}: decided after {e['scored']} of {len(self.examples)} examples (the drop lies between "
                  f"{e['drop_at_least']:.2f} and {e['drop_at_most']:.2f} points whatever the rest hold)"
                  for form, e in self.early.items()]
        return "\n".join(lines)


def decided_early(lost: float, right_after: float, scored: int, total: int, bound: float) -> dict[str, Any] | None:
    """Where a form's bound is decided before the last example, by the values still possible: each
    example's value lies in [0, 1], so with `lost` (fp32's values minus the form's, summed over the
    `scored` examples) and `right_after` (fp32's values over the rest), the final drop in points lies
    between 100 * (lost + right_after - rest) / total and 100 * (lost + right_after) / total. Decided
    (with 0.01 points to spare for rounding) when all of that range misses the bound, or all of it holds."""
    if scored >= total:
        return None
    least = 100.0 * (lost + right_after - (total - scored)) / total
    most = 100.0 * (lost + right_after) / total
    if least > bound + 0.01 or most < bound - 0.01:
        return {"scored": scored, "drop_at_least": round(least, 2), "drop_at_most": round(most, 2)}
    return None


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
