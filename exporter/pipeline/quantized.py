"""The quantized precisions of a build: what int8 and int4 are made from (the calibration set), how
each writes its graphs, and the repair both share: when a form misses its accuracy bound, the products
that lose most (measured) are put back nearer float one at a time, re-quantizing and re-measuring,
until the bound holds or more than a quarter of the products would have left the precision.
"""

from __future__ import annotations

import abc
import functools
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from tokenizers import Tokenizer

from runtime.files import sha256_of
from runtime.heads import HeadSpec, graph_file

from exporter.precision import calibration
from exporter.precision.int4 import Int4Settings, int4_nodes, product_noise, to_int4, untied
from exporter.precision.int8 import (calibrate, chosen_nodes, module_path, quantizable_nodes, sensitive_layers,
                                     to_int8_dynamic, to_int8_qdq)
from exporter.pipeline.options import BuildOptions
from exporter.pipeline.progress import Log, step
from exporter.pipeline.recipes import Recipe
from exporter.validation.logits import ort_runner
from exporter.validation.task_metric import Evaluation

if TYPE_CHECKING:
    from exporter.pipeline.build import BuildContext, Measured

SPECIAL_TOKENS = {"cls": "[CLS]", "sep": "[SEP]", "pad": "[PAD]", "mask": "[MASK]", "unk": "[UNK]"}
Plan = dict[str, list[str]]  # where products go: "kept_float" (int4 also "eight_bits"), module-path globs
Step = tuple[tuple[str, str], Plan]  # (the layer it moves, what it does), the plan after it


@dataclass(frozen=True)
class CalibrationSet:
    data: Path
    asked: int  # examples asked for (the file may hold fewer)
    method: str  # minmax, entropy or percentile
    examples: list[calibration.Example]
    keep_float: list[str]  # module-path globs kept in float from the start


def read_calibration_set(recipe: Recipe, options: BuildOptions) -> CalibrationSet:
    data = Path(options.calibration_data or recipe.calibration["data"])
    asked = options.calibration_samples or recipe.calibration.get("samples", 32)
    examples = calibration.read_examples(data, recipe.spec, asked, recipe.shape_limits.get("choices", [0, 4, 0])[1])
    return CalibrationSet(data, asked, options.calibration_method or recipe.calibration.get("method", "minmax"),
                          examples, list(options.keep_float))


class Quantized(abc.ABC):
    """What int8 and int4 share: the calibration inputs, the record the manifest keeps, and the repair."""

    precision = ""
    moved = "float_products"  # the record's count of products moved off the precision, per repair step

    def __init__(self, context: BuildContext, fp32: dict[str, Path], graphs: dict[str, Path]):
        assert context.calibration_set is not None
        self.context, self.calibration_set = context, context.calibration_set
        self.fp32, self.graphs, self.log, self.forced = fp32, graphs, context.log, context.calibration_set.keep_float
        self.record: dict[str, Any] = {"kept_float": self.forced, "repair": [], "repaired_layers": []}
        self._ranking: list[dict[str, Any]] | None = None

    @functools.cached_property
    def feeds(self) -> dict[str, list[dict[str, np.ndarray]]]:
        """Each graph's calibration inputs, made when first needed (int4 needs them only to repair)."""
        chosen, context = self.calibration_set, self.context
        with step(self.log, f"making calibration inputs from {chosen.data}"):
            return calibration_feeds(context.spec, context.recipe, context.tokenizer, chosen.examples, self.fp32)

    @property
    def sources(self) -> dict[str, Path]:
        """The graphs quantization reads (their module paths name the products)."""
        return self.fp32

    def start(self) -> Plan:
        return {"kept_float": list(self.forced)}

    def calibrate(self) -> None:
        """What quantizing needs measured first, on every core (int8's activation ranges; int4 needs none)."""

    @abc.abstractmethod
    def quantize(self, plan: Plan) -> dict[str, Path]:
        """Write the graphs as `plan` says; returns what TensorRT builds from."""

    @abc.abstractmethod
    def measure(self) -> list[dict[str, Any]]:
        """Each quantized product's loss, as rows {"layer", "sqnr_db", "graph"}."""

    @abc.abstractmethod
    def steps(self, plan: Plan, total: int) -> Iterator[Step | str]:
        """Each repair step as (what it does, the plan after it), or why the repair stops."""

    def ranking(self) -> list[dict[str, Any]]:
        """Every quantized product, the one losing most first (signal-to-noise, dB)."""
        if self._ranking is None:
            with step(self.log, f"measuring each quantized product's loss to {self.precision}"):
                self._ranking = sorted(self.measure(), key=lambda row: row["sqnr_db"])
        return self._ranking

    def repair(self, evaluation: Evaluation, check: Callable[[], Measured], measured: Measured,
               problems_of: Callable[[Measured], list[str]]) -> tuple[Measured, list[str]]:
        """Take repair steps, re-quantizing and re-measuring, until the accuracy bound holds or the
        steps run out. Returns the last measurement, and why the repair stopped short if it did."""
        total = self.total
        plan = self.start()

        def note(layer: str | None) -> None:
            self.record["repair"].append({**plan, self.moved: self.off(plan),
                                          "metric": {form: scores.get(evaluation.metric)  # the forms this step measured
                                                     for form, scores in evaluation.results.items()
                                                     if form == evaluation.reference_form or form in measured[1]},
                                          "decided_early": {form: dict(e) for form, e in evaluation.early.items()
                                                            if form in measured[1]}})
            if layer and layer not in self.record["repaired_layers"]:  # int4 may move one twice: 8 bits, float
                self.record["repaired_layers"].append(layer)

        note(None)  # where it started
        for taken in self.steps(plan, total):
            if isinstance(taken, str):
                return measured, [taken]
            (layer, what), plan = taken
            self.log(f"- {self.precision} misses its accuracy bound: {what}")
            self.quantize(plan)
            measured = check()
            note(layer)
            if not problems_of(measured):
                break
        return measured, []

    @functools.cached_property
    def structure(self) -> onnx.ModelProto:
        """The first graph quantization reads, without its weights: its products and their module paths."""
        return onnx.load(str(next(iter(self.sources.values()))), load_external_data=False)

    @property
    def total(self) -> int:
        """How many products the precision quantizes when nothing is kept out."""
        return len(quantizable_nodes(self.structure))

    def off(self, plan: Plan) -> int:
        """How many products `plan` moves off the precision."""
        return len(quantizable_nodes(self.structure)) - len(chosen_nodes(self.structure, plan["kept_float"]))


class Int8(Quantized):
    """The int8 forms of every graph, calibrated once and re-quantized as layers are kept in float: the
    Q/DQ one TensorRT builds from, and the dynamic one ONNX Runtime runs fast on CPU (at `graphs`)."""

    precision = "int8"

    def __init__(self, context: BuildContext, fp32: dict[str, Path], graphs: dict[str, Path]):
        super().__init__(context, fp32, graphs)
        chosen, spec, tokenizer, log = context.calibration_set, context.spec, context.tokenizer, context.log
        assert chosen is not None
        self.method = chosen.method
        if self.method != "minmax":  # histograms need one shape (minmax takes each input as it is)
            pad = tokenizer.token_to_id(SPECIAL_TOKENS["pad"]) or 0
            self.feeds = {graph: calibration.same_shapes(f, spec.padding_side == "left", pad)
                          for graph, f in self.feeds.items()}
        count = len(next(iter(self.feeds.values())))
        log(f"  {count} examples (asked for {chosen.asked})" if count < chosen.asked else f"  {count} examples")
        self.qdq = {graph: context.staging / graph_file(context.name, graph, ".qdq.onnx") for graph in graphs}
        specials = {tokenizer.token_to_id(t) for t in SPECIAL_TOKENS.values()}
        ids = {int(i) for f in next(iter(self.feeds.values())) for i in np.unique(f["input_ids"])} - specials
        self.record = {
            "method": self.method, "samples": count, "distinct_tokens": len(ids), "data": str(chosen.data),
            "data_sha256": sha256_of(chosen.data), **self.record,
            "forms": {"onnxruntime": "dynamic: s8 weights per channel (7-bit range), u8 activations quantized per call "
                                     "(DynamicQuantizeLinear + MatMulInteger)",
                      "tensorrt": "static Q/DQ: s8 symmetric, weights per channel, activations per tensor, "
                                  "zero points 0; MatMul/Gemm inputs only"}}

    def ranges(self, graph: str) -> Path:
        return self.fp32[graph].with_suffix(".calibration.json")

    def calibrate(self) -> None:
        for graph in self.graphs:
            if not self.ranges(graph).exists():  # the same ranges serve every repair step
                with step(self.log, f"calibrating {self.fp32[graph].name} ({self.method})"):
                    calibrate(self.fp32[graph], self.feeds[graph], self.method, self.ranges(graph), self.log)

    def quantize(self, plan: Plan) -> dict[str, Path]:
        keep_float = plan["kept_float"]
        self.calibrate()
        for graph, path in self.graphs.items():
            ranges = self.ranges(graph)
            with step(self.log, f"quantizing {self.qdq[graph].name} (Q/DQ, for TensorRT)"):
                to_int8_qdq(self.fp32[graph], self.qdq[graph], ranges, self.method, keep_float, self.log)
            with step(self.log, f"quantizing {path.name} (dynamic int8, for ONNX Runtime on CPU)"):
                to_int8_dynamic(self.fp32[graph], path, keep_float, self.log)
        self.record["kept_float"] = keep_float
        return self.qdq

    def measure(self) -> list[dict[str, Any]]:
        return [dict(row, graph=graph) for graph, path in self.qdq.items()
                for row in sensitive_layers(path, self.feeds[graph][:4], top=None)]

    def steps(self, plan: Plan, total: int) -> Iterator[Step | str]:
        """The products losing most back in float, one at a time, up to a quarter of them."""
        kept = list(plan["kept_float"])
        for layer in dict.fromkeys(row["layer"] for row in self.ranking() if row["layer"] not in kept):
            floats = self.off({"kept_float": [*kept, layer]})
            if floats > total / 4:
                yield (f"int8 repair stopped: keeping {layer} in float too would leave {floats} of "
                       f"{total} matrix products in float (more than a quarter)")
                return
            kept.append(layer)
            yield (layer, f"keeping {layer} in float ({floats} of {total} products)"), {"kept_float": list(kept)}


class Int4(Quantized):
    """The int4 graphs (MatMulNBits, ONNX Runtime's 4-bit weight-only form), re-quantized as the products
    that lose most are kept at 8 bits, then in float. OpenVINO reads the same graphs."""

    precision = "int4"
    moved = "off_four_bits"

    def __init__(self, context: BuildContext, fp32: dict[str, Path], graphs: dict[str, Path], settings: Int4Settings):
        super().__init__(context, fp32, graphs)
        self.settings = settings
        self.untied = {graph: untied(path) for graph, path in fp32.items()}
        self.record = {"form": settings.describe(), "method": settings.method, "block_size": settings.block_size,
                       "symmetric": settings.symmetric, "accuracy_level": settings.accuracy_level,
                       "eight_bits": [], **self.record}

    @property
    def sources(self) -> dict[str, Path]:
        return self.untied

    def start(self) -> Plan:
        return {"eight_bits": [], "kept_float": list(self.forced)}

    def quantize(self, plan: Plan) -> dict[str, Path]:
        for graph, path in self.graphs.items():
            with step(self.log, f"quantizing {path.name} (int4: {self.settings.method}, block {self.settings.block_size})"):
                to_int4(self.untied[graph], path, self.settings, plan["eight_bits"], plan["kept_float"], self.log)
        self.record.update(plan)
        return self.graphs

    def measure(self) -> list[dict[str, Any]]:
        rows = []
        for graph, path in self.graphs.items():
            model = onnx.load(str(self.untied[graph]), load_external_data=False)
            paths = {n.output[0]: module_path(n) for n in model.graph.node}
            rows += [{"layer": paths[output], "sqnr_db": round(sqnr, 2), "graph": graph}
                     for output, sqnr in product_noise(self.untied[graph], path, self.feeds[graph][:4]).items()]
        return rows

    @property
    def total(self) -> int:
        return len(int4_nodes(self.structure, []))

    def off(self, plan: Plan) -> int:
        return self.total - len(int4_nodes(self.structure, [*plan["eight_bits"], *plan["kept_float"]]))

    def steps(self, plan: Plan, total: int) -> Iterator[Step | str]:
        """The product losing most, measured again after each step: at 4 bits, to 8 bits (while at most a
        quarter of the products are off 4 bits); at 8 bits still the worst, to float."""
        eight, kept = list(plan["eight_bits"]), list(plan["kept_float"])
        rows = self.ranking()
        while True:
            worst = dict.fromkeys(row["layer"] for row in sorted(rows, key=lambda row: row["sqnr_db"]))
            for layer in (layer for layer in worst if layer not in kept):
                if layer in eight:
                    eight.remove(layer)
                    kept.append(layer)
                    yield (layer, f"keeping {layer} in float"), {"eight_bits": list(eight), "kept_float": list(kept)}
                    break
                off = self.off({"eight_bits": [*eight, layer], "kept_float": kept})
                if off <= total / 4:
                    eight.append(layer)
                    yield ((layer, f"keeping {layer} at 8 bits ({off} of {total} products off 4 bits)"),
                           {"eight_bits": list(eight), "kept_float": list(kept)})
                    break
            else:
                yield (f"int4 repair stopped: {len(eight) + len(kept)} of the {total} products are off 4 bits "
                       "(one more would be more than a quarter), and none at 8 bits is left to keep in float")
                return
            with step(self.log, "measuring each quantized product's loss again"):
                rows = self.measure()


def calibration_feeds(spec: HeadSpec, recipe: Recipe, tokenizer: Tokenizer, examples: list[calibration.Example],
                      fp32: dict[str, Path]) -> dict[str, list[dict[str, np.ndarray]]]:
    limits = recipe.shape_limits
    cutting = calibration.truncating(tokenizer, limits["sequence"][2])
    pad = tokenizer.token_to_id(SPECIAL_TOKENS["pad"]) or 0
    if "prefill" not in spec.graphs:
        return {"model": [calibration.encoder_feed(e, spec, cutting, limits, pad) for e in examples]}
    prefill = ort_runner(fp32["prefill"])
    pairs = [calibration.causal_feeds(e, cutting, limits, tokenizer.token_to_id(SPECIAL_TOKENS["cls"]), prefill)
             for e in examples]
    return {graph: [p[graph] for p in pairs] for graph in spec.graphs}


def report_sensitive(layers: list[dict[str, Any]], log: Log, precision: str = "int8") -> None:
    """Name the layers `precision` hurts most, and how to keep them in float: where most of them are one
    kind of product in different encoder layers (int8 at every size measured: the MLP's second,
    `*.output.dense`, which reads GELU's long-tailed output), a pattern for that kind in every layer too."""
    log(f"  layers losing most to {precision} (signal-to-quantization-noise, dB; lower is worse): "
        + ", ".join(f"{row['layer']} {row['sqnr_db']}" for row in layers))
    if not layers:
        return
    log(f"  keep layers in float with --keep-float PATTERN, e.g. --keep-float '{layers[0]['layer']}'")
    kinds = Counter(re.sub(r"\.\d+\.", ".*.", row["layer"], count=1) for row in layers)
    kind, count = kinds.most_common(1)[0]
    if "*" in kind and count > 1 and count > len(layers) / 2:
        log(f"  {count} of these {len(layers)} are the same product in different layers: "
            f"--keep-float '{kind}' keeps it in float in every layer")


def calibration_problems(quantization: dict[str, Any], recipe: Recipe) -> list[str]:
    """Calibration data that cannot stand for real inputs fails int8's validation whatever the accuracy
    shows (a model with random weights barely notices)."""
    needed = recipe.calibration.get("min_distinct_tokens", 16)
    found = quantization["distinct_tokens"]
    if found >= needed:
        return []
    return [f"the calibration data is degenerate: its {quantization['samples']} examples hold {found} distinct "
            f"ordinary tokens (padding and special tokens aside), the recipe asks for {needed}; calibrate on "
            "real text (--calibration-data)"]
