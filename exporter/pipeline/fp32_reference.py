"""fp32's task predictions in a build of another precision (fp16, int8, int4): from the fp32 graphs on
ONNX Runtime, run on one core while the build converts or quantizes on the other.

Why not PyTorch, which used to run them first: converting and quantizing are Python rewriting graphs,
one core busy, so much of a pass beside them costs no wall time (README: Task accuracy, what it
costs); and PyTorch's copy of the weights is gone by then (two copies of a 3.9B do not fit). int8's
calibration runs before, alone: its ONNX Runtime threads wait on each other, and a pass beside them
more than doubled it. The graphs stand for fp32 only once their outputs match PyTorch's within fp32's
tolerance on the evaluation's own first examples (`anchor`), which PyTorch runs before it goes; where
they do not, fp32's metric is not measured and the build fails, as an fp32 build whose graphs do not
match PyTorch does.

Where the metric is a mean over examples, the pass goes in parts of the artifact's largest batch:
when the build needs the predictions, the part running finishes and the rest run on every core.
Otherwise, or where the machine's memory does not hold the graphs beside the conversion, the whole
pass runs at once, on every core, before converting.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backends import Backend, OnnxRuntimeBackend
from runtime.evaluation import METRICS, Example, Scores, means
from runtime.heads import HeadSpec
from runtime.manifest import Manifest
from runtime.session import Session

from exporter.export.to_onnx import written
from exporter.model.megatron_bert import HeadModel
from exporter.pipeline.progress import Log, step
from exporter.sources.checkpoints import available_memory
from exporter.validation.logits import Case, Comparison, failures, validate
from exporter.validation.task_metric import Evaluation, TorchBackend

FORM = "onnxruntime fp32"  # as the fp32 artifact's own form is named in the same process (build-all)
ANCHOR_EXAMPLES = 8
KEPT_RUNS = 2  # of each graph, in the anchor: a causal LM's generation runs its decode graph once a token
# What converting or quantizing holds at its peak beside the fp32 graphs' weights that the pass loads,
# in those weights' bytes (generous: int8's pieces and fp16's converter each hold about one copy)
BESIDE = 3.0


class Recording:
    """A backend that keeps its first runs of each graph (feeds and outputs)."""

    def __init__(self, backend: Backend):
        self.backend, self.name = backend, backend.name
        self.runs: list[tuple[str, dict[str, np.ndarray], dict[str, np.ndarray]]] = []

    def run(self, graph: str, feed: dict[str, Any], keep: frozenset[str] = frozenset()) -> dict[str, Any]:
        outputs = self.backend.run(graph, feed, keep)
        if sum(g == graph for g, _, _ in self.runs) < KEPT_RUNS:
            self.runs.append((graph, {k: np.array(v) for k, v in feed.items()}, dict(outputs)))
        return outputs


def anchor(evaluation: Evaluation, model: HeadModel, manifest: Manifest, staging: Path) -> list[Case]:
    """PyTorch's outputs on the evaluation's first examples, as Session feeds them: what the fp32 graphs
    must match before their predictions stand for fp32's."""
    recording = Recording(TorchBackend(model))
    session = Session.staged(manifest, staging, recording, evaluation.encodings)
    evaluation.evaluate_on(session, evaluation.examples[:ANCHOR_EXAMPLES], None)
    return [Case(graph, "examples", {"batch": feed["input_ids"].shape[0], "sequence": feed["input_ids"].shape[-1]},
                 feed, outputs) for graph, feed, outputs in recording.runs]


class Fp32Reference:
    """One pass of the fp32 graphs over the evaluation set, begun on one core (`begin`) and completed on
    all of them (`finish`), where it hands fp32's scores and predictions to the evaluation."""

    def __init__(self, evaluation: Evaluation, graphs: dict[str, Path], manifest: Manifest, staging: Path,
                 cases: list[Case], spec: HeadSpec, tolerance: dict[str, float]):
        self.evaluation, self.graphs, self.manifest, self.staging = evaluation, graphs, manifest, staging
        self.cases, self.spec, self.tolerance = cases, spec, tolerance
        examples = evaluation.examples
        self.each = METRICS[evaluation.head].each
        size = manifest.shape_limits["batch"][2] if evaluation.metric in self.each else len(examples)
        self.parts: list[list[Example]] = [examples[i:i + size] for i in range(0, len(examples), size)]
        self.predicted: list[Any] = []
        self.scores: Scores = {}  # of the one part, for a metric that is not a mean over examples
        self.done = 0  # parts scored
        self.beside = 0  # examples scored while the build did other work
        self.comparisons: list[Comparison] | None = None
        self.handover = threading.Event()
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def begin(self, beside: bool) -> None:
        if beside:
            self.thread = threading.Thread(target=self._beside, name="fp32 task accuracy", daemon=True)
            self.thread.start()
        else:
            self._run(None)

    def _beside(self) -> None:
        try:
            self._run(1, self.handover)
            self.beside = sum(len(part) for part in self.parts[:self.done])
        except BaseException as err:  # raised again by finish(), on the build's own thread
            self.error = err

    def _run(self, threads: int | None, stop: threading.Event | None = None) -> None:
        backend = OnnxRuntimeBackend(self.graphs, ["CPUExecutionProvider"], threads=threads)
        if self.comparisons is None:
            self.comparisons = validate(self.cases, {g: partial(backend.run, g) for g in self.graphs}, self.spec,
                                        self.tolerance, FORM)
        if failures(self.comparisons):
            return
        session = Session.staged(self.manifest, self.staging, backend, self.evaluation.encodings)
        while self.done < len(self.parts) and not (stop and stop.is_set()):
            self.scores, predicted = self.evaluation.evaluate_on(session, self.parts[self.done], None)
            self.predicted += predicted
            self.done += 1

    def stop(self) -> None:
        """Let the part running finish and run no more (the build failed)."""
        self.handover.set()
        if self.thread is not None:
            self.thread.join()

    def finish(self) -> list[str]:
        """Complete the pass and give its result to the evaluation; returns what it did, to log."""
        self.stop()
        if self.error is not None:
            raise self.error
        problems = failures(self.comparisons or [])
        if problems:  # the evaluation keeps no fp32 metric: every form then fails for want of one
            return [f"note: the fp32 graphs do not match PyTorch's outputs on the first {ANCHOR_EXAMPLES} evaluation "
                    "examples, so fp32's task metric is not measured:", *(f"  {p}" for p in problems)]
        if self.done < len(self.parts):
            self._run(None)
        examples = self.evaluation.examples
        scores = means(self.each, examples, self.predicted) if len(self.parts) > 1 else self.scores
        self.evaluation.take_reference(FORM, scores, self.predicted)
        worst = max(c.max_abs for c in self.comparisons or [])
        self.evaluation.reference_check = {"examples": min(ANCHOR_EXAMPLES, len(examples)), "max_abs": worst,
                                           "scored_beside": self.beside}
        return [f"  the fp32 graphs matched PyTorch's outputs on the first {ANCHOR_EXAMPLES} examples (max_abs "
                f"{worst:.1e}); {self.beside} of the {len(examples)} examples were scored beside the other work"]


def fits_beside(graphs: dict[str, Path]) -> bool:
    """Whether the memory left holds ONNX Runtime's copy of these graphs beside the conversion's work."""
    weights = sum(f.stat().st_size for path in graphs.values() for f in written(path))
    available = available_memory()
    return available is not None and available > BESIDE * weights


@contextmanager
def measured_beside(reference: Fp32Reference | None, log: Log, work: str) -> Iterator[None]:
    """Within: `work` (converting, quantizing), with fp32's pass running beside it where memory allows.
    After: fp32's metric is in the evaluation, or the reason it is not is logged."""
    if reference is None:
        yield
        return
    total = len(reference.evaluation.examples)
    if len(reference.parts) > 1 and fits_beside(reference.graphs):
        log(f"- fp32's task accuracy on {total} examples (the fp32 graphs on ONNX Runtime): begun on one core, "
            f"beside {work}")
        reference.begin(beside=True)
    else:
        with step(log, f"fp32's task accuracy on {total} examples (the fp32 graphs on ONNX Runtime)"):
            reference.begin(beside=False)
    try:
        yield
    except BaseException:
        reference.stop()
        raise
    with step(log, "completing fp32's task accuracy"):
        lines = reference.finish()
    for line in lines:
        log(line)
