"""INT8 graphs made from the fp32 ONNX graph, by ONNX Runtime's quantization tools.

Two forms, because the fast int8 form differs by backend:
- `qdq`: calibrated, explicitly quantized (QuantizeLinear/DequantizeLinear pairs) for TensorRT, which
  accepts only symmetric int8 (zero points 0): weights per output channel, activations per tensor. Only
  MatMul/Gemm inputs are quantized; LayerNorm, Softmax, GELU and the residual adds stay in float.
  TensorRT >= 10.12 builds precision from these nodes (no calibrator, no INT8 flag).
- `dynamic`: what ONNX Runtime runs fast on CPU: s8 weights (7-bit range, so CPUs without VNNI do not
  overflow) with u8 activations quantized per call
  (DynamicQuantizeLinear + MatMulInteger). On CPUs without VNNI, s8/s8 Q/DQ runs no faster than fp32.

Nodes are named for `--keep-float` and in reports by the PyTorch module they come from
(`bert.encoder.layer.3.attention.self.query`), which the exporter records in each node's metadata.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import logging
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnx
import onnxruntime
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_dynamic, quantize_static)
from onnxruntime.quantization import qdq_loss_debug
from onnxruntime.quantization.calibrate import HistogramCollector, TensorsData, save_tensors_data

from runtime.errors import UserError

from .onnx_export import EXTERNAL_DATA_OVER, check_graph, written
from .recipes import CALIBRATION_METHODS

METHODS = dict(zip(CALIBRATION_METHODS, (CalibrationMethod.MinMax, CalibrationMethod.Entropy,
                                          CalibrationMethod.Percentile)))
QUANTIZED_OPS = ["MatMul", "Gemm"]
CLASSIFIER_OUTPUTS = 16
Feed = dict[str, np.ndarray]


def module_path(node: onnx.NodeProto) -> str:
    """The PyTorch module a node was exported from, e.g. "bert.encoder.layer.0.attention.self.query"."""
    scope = next((p.value for p in node.metadata_props if p.key == "namespace"), "")
    modules = [part.split(":")[0].strip() for part in scope.split("/")]
    named = [m for m in modules if m.startswith("model.")]
    return named[-1].removeprefix("model.") if named else node.name


def output_features(node: onnx.NodeProto, weights: dict[str, onnx.TensorProto]) -> int:
    """How many outputs a product's weight makes: MatMul weights are [in, out], Gemm's [out, in] if transB."""
    weight = next(weights[i] for i in node.input if i in weights)
    trans_b = any(a.name == "transB" and a.i for a in node.attribute)
    return int(weight.dims[0] if node.op_type == "Gemm" and trans_b else weight.dims[-1])


def quantizable_nodes(model: onnx.ModelProto) -> dict[str, str]:
    """Node name -> module path of the matrix products int8 quantizes: those with a weight (the Linear
    layers) except the heads' classifiers. Attention's activation-by-activation products stay float:
    softmax probabilities of short inputs peak far above what calibration saw, and clipping them cost
    most of the accuracy. Classifiers (at most CLASSIFIER_OUTPUTS outputs: span, choice, label and
    next-sentence scores) stay float too: they are a sliver of the work, and their outputs are the
    logits themselves, which int8's error would reach undiluted (345M qa: logits error -23%)."""
    weights = {t.name: t for t in model.graph.initializer}
    return {n.name: module_path(n) for n in model.graph.node
            if n.op_type in QUANTIZED_OPS and any(i in weights for i in n.input)
            and output_features(n, weights) > CLASSIFIER_OUTPUTS}


def chosen_nodes(model: onnx.ModelProto, keep_float: list[str]) -> list[str]:
    """The quantizable nodes minus those `--keep-float` patterns (globs over module paths) name."""
    nodes = quantizable_nodes(model)
    kept: set[str] = set()
    for pattern in keep_float:
        matched = {name for name, path in nodes.items() if fnmatch.fnmatchcase(path, pattern)}
        if not matched:
            raise UserError(f"--keep-float {pattern!r} matches no quantized layer; they are named like "
                            f"{', '.join(sorted(set(nodes.values()))[:3])}")
        kept |= matched
    return sorted(set(nodes) - kept)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Hide ONNX Runtime's advice (on the root logger) to pre-process first: its shape inference and
    fusions are what we avoid, to keep the graph TensorRT-shaped and the layers named."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


class Feeds(CalibrationDataReader):  # type: ignore[misc]  # onnxruntime ships no type information
    """Hands calibration inputs to ONNX Runtime one by one, reporting progress."""

    def __init__(self, feeds: list[Feed], log: Callable[[str], None] = lambda _: None, what: str = "calibrating"):
        self.feeds, self.log, self.what = feeds, log, what
        self.items: Iterator[Feed] = iter(())
        self.rewind()

    def rewind(self) -> None:
        self.items, self.count = iter(self.feeds), 0

    def get_next(self) -> Feed | None:
        feed = next(self.items, None)
        if feed is not None:
            self.count += 1
            if self.count == len(self.feeds) or self.count % max(1, len(self.feeds) // 4) == 0:
                self.log(f"  {self.what}: {self.count}/{len(self.feeds)} inputs")
        return feed


def _large(path: Path) -> bool:
    return path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(f"{path.name}.data")) > EXTERNAL_DATA_OVER


# ONNX Runtime's calibrators' settings for the histogram methods (create_calibrator's defaults)
HISTOGRAMS = {"entropy": {"num_bins": 128, "num_quantized_bins": 128, "symmetric": False, "percentile": 99.999},
              "percentile": {"num_bins": 2048, "num_quantized_bins": 128, "symmetric": True, "percentile": 99.999}}


def calibration_tensors(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """What ONNX Runtime's calibrators measure for MatMul/Gemm: their float inputs and outputs that are
    not weights (types inferred from the graph alone)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    infos = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
             if v.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
    weights = {t.name for t in model.graph.initializer}
    names = dict.fromkeys(name for node in model.graph.node if node.op_type in QUANTIZED_OPS
                          for name in [*node.input, *node.output] if name in infos and name not in weights)
    return [infos[name] for name in names]


def calibrate(source: Path, feeds: list[Feed], method: str, cache: Path, log: Callable[[str], None]) -> None:
    """Measure the ranges of the tensors int8 quantizes into ONNX Runtime's calibration cache (`cache`),
    as its calibrators would on all of `feeds` at once, but holding the weights once and one input's
    tensors at a time: its calibrators hold the graph's weights in Python beside the session's copy
    (quantize_static a third) and every input's tensors together, too much for a 3.9B model in 24 GB.
    The measuring graph is the fp32 one, weights left in its file, with the tensors as outputs."""
    model = onnx.load(str(source), load_external_data=False)
    measured = calibration_tensors(model)
    names = [v.name for v in measured]
    outputs = {o.name for o in model.graph.output}
    model.graph.output.extend(v for v in measured if v.name not in outputs)
    measuring = source.with_name(f".{source.stem}.calibrating.onnx")  # beside the weights it refers to
    onnx.save(model, str(measuring))
    del model
    try:
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL  # as calibrators do
        session = onnxruntime.InferenceSession(str(measuring), options, providers=["CPUExecutionProvider"])
    finally:
        measuring.unlink()

    def each_input(what: str) -> Iterator[dict[str, np.ndarray]]:
        reader = Feeds(feeds, log, what)
        while (feed := reader.get_next()) is not None:
            yield {name: value.ravel() for name, value in zip(names, session.run(names, feed))}

    lowest: dict[str, np.ndarray] = {}
    highest: dict[str, np.ndarray] = {}
    nearest_zero: dict[str, np.float32] = {}  # the smallest absolute value: where |x|'s histogram starts
    for values in each_input("measuring ranges"):
        for name, value in values.items():
            low, high = np.nanmin(value).reshape(1), np.nanmax(value).reshape(1)  # shaped (1,) as ONNX Runtime's are
            lowest[name] = np.minimum(lowest[name], low) if name in lowest else low
            highest[name] = np.maximum(highest[name], high) if name in highest else high
            if method == "percentile":
                nearest = np.nanmin(np.absolute(value))
                nearest_zero[name] = min(nearest_zero[name], nearest) if name in nearest_zero else nearest
    if method not in HISTOGRAMS:
        ranges = {name: (lowest[name], highest[name]) for name in names}
    else:  # a second pass: each tensor's histogram over the range of all inputs, as one array would give
        collector = HistogramCollector(method=method, scenario="same", **HISTOGRAMS[method])
        collector.histogram_dict = histograms(each_input("histograms"), lowest, highest, nearest_zero, collector)
        with contextlib.redirect_stdout(io.StringIO()):  # it prints as it goes
            ranges = collector.compute_collection_result()
    save_tensors_data(TensorsData(METHODS[method], ranges), cache)


def histograms(inputs: Iterator[dict[str, np.ndarray]], lowest: dict[str, np.ndarray], highest: dict[str, np.ndarray],
               nearest_zero: dict[str, np.float32], collector: HistogramCollector) -> dict[str, tuple[Any, ...]]:
    """HistogramCollector's histogram_dict for all inputs together, summed input by input over bins fixed
    by the ranges of all of them: the entropy method's over [-threshold, threshold] (collect_value), the
    symmetric percentile method's over absolute values (collect_absolute_value)."""
    bins = collector.num_bins
    absolute = collector.method == "percentile" and collector.symmetric
    high = {n: max(abs(lowest[n][0]), abs(highest[n][0])) for n in lowest}
    edges: dict[str, Any] = {n: (nearest_zero[n], high[n]) if absolute else (-high[n], high[n]) for n in lowest}
    counts: dict[str, np.ndarray] = {}
    bounds: dict[str, np.ndarray] = {}
    for values in inputs:
        for name, value in values.items():
            hist, bounds[name] = np.histogram(np.absolute(value) if absolute else value, bins, range=edges[name])
            counts[name] = counts[name] + hist if name in counts else hist
    if absolute:
        return {n: (counts[n], bounds[n].astype(np.float32), lowest[n][0], highest[n][0]) for n in counts}
    return {n: (counts[n], bounds[n], lowest[n][0], highest[n][0], np.array(high[n], dtype=np.float32)) for n in counts}


def to_int8_qdq(source: Path, target: Path, cache: Path, method: str, keep_float: list[str]) -> list[Path]:
    """Write the symmetric Q/DQ graph TensorRT builds from, with the ranges `calibrate` measured by `method`."""
    model = onnx.load(str(source), load_external_data=False)
    with quiet():
        quantize_static(str(source), str(target), None, calibration_cache_path=str(cache), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=QUANTIZED_OPS, per_channel=True, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, calibrate_method=METHODS[method],
                        nodes_to_quantize=chosen_nodes(model, keep_float), use_external_data_format=_large(source),
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                       "QuantizeBias": False,  # int32 biases: TensorRT dequantizes int8 only
                                       # products stay float into the bias and residual adds
                                       "OpTypesToExcludeOutputQuantization": QUANTIZED_OPS,
                                       # MatMul weights are [in, out]: one scale per output column
                                       "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}})
    check_graph(target)
    return written(target)


def to_int8_dynamic(source: Path, target: Path, keep_float: list[str]) -> list[Path]:
    """Write the dynamically quantized graph (u8 activations, s8 weights) ONNX Runtime runs fast on CPU."""
    model = onnx.load(str(source), load_external_data=False)
    with quiet():
        # reduce_range: 7-bit weights. CPUs without VNNI (AVX2 only) multiply u8 by s8 in pairs summed
        # into 16 bits, which full-range weights overflow (seen here: a KV cache's cosine 0.985 -> 0.99+).
        quantize_dynamic(str(source), str(target), op_types_to_quantize=QUANTIZED_OPS, per_channel=True,
                         reduce_range=True,
                         weight_type=QuantType.QInt8, nodes_to_quantize=chosen_nodes(model, keep_float),
                         use_external_data_format=_large(source))
    check_graph(target)
    return written(target)


def sensitive_layers(qdq: Path, feeds: list[Feed], top: int | None = 5) -> list[dict[str, float | str]]:
    """The quantized layers whose inputs lose most to quantization on `feeds`, worst first (the `top`
    of them; None: all): signal-to-quantization-noise ratio in dB (lower is worse) of each Q/DQ pair,
    charged to every module that reads it."""
    model = onnx.load(str(qdq), load_external_data=False)
    layers: dict[str, list[str]] = {}  # tensor -> the modules of the products that read it (else that makes it)
    for node in model.graph.node:
        if node.op_type in QUANTIZED_OPS:
            for name in node.input:
                layers.setdefault(name.removesuffix("_DequantizeLinear_Output"), []).append(module_path(node))
    for node in model.graph.node:
        for name in node.output:
            layers.setdefault(name, [module_path(node)])
    with tempfile.TemporaryDirectory() as scratch:
        augmented = Path(scratch) / "augmented.onnx"
        qdq_loss_debug.modify_model_output_intermediate_tensors(
            str(qdq), str(augmented), op_types_for_saving=["QuantizeLinear", "DequantizeLinear"],
            save_as_external_data=_large(qdq))
        activations = qdq_loss_debug.collect_activations(str(augmented), Feeds(feeds))
    worst: dict[str, float] = {}
    for tensor, match in qdq_loss_debug.create_activation_matching(activations).items():
        sqnr = qdq_loss_debug.compute_signal_to_quantization_noice_ratio(match["pre_qdq"], match["post_qdq"])
        for layer in layers.get(tensor, [tensor]):  # an input shared by several products hurts each of them
            worst[layer] = min(worst.get(layer, np.inf), float(sqnr))
    ranked = sorted(worst.items(), key=lambda item: item[1])[:top]
    return [{"layer": layer, "sqnr_db": round(sqnr, 2)} for layer, sqnr in ranked]
