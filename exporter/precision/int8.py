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
import functools
import heapq
import io
import logging
import math
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import onnx
import onnxruntime
from onnx import external_data_helper
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_dynamic, quantize_static)
from onnxruntime.quantization.calibrate import HistogramCollector, TensorsData, save_tensors_data

from runtime.errors import UserError
from runtime.threads import ort_options

from exporter.export import to_onnx
from exporter.export.to_onnx import check_graph, written
from exporter.precision.calibration import CALIBRATION_METHODS

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


def large(path: Path) -> bool:
    """Whether a graph with its weights is over the size whose quantized graph keeps external data: its
    file and every external-data file it names (an untied graph names two). A file over 64 MiB holds its
    weights itself (a piece), and is not read again to find out."""
    size = path.stat().st_size
    if size > 2**26:
        return size > to_onnx.EXTERNAL_DATA_OVER
    model = onnx.load(str(path), load_external_data=False)
    files = {entry.value for t in model.graph.initializer for entry in t.external_data if entry.key == "location"}
    return size + sum((path.parent / f).stat().st_size for f in files) > to_onnx.EXTERNAL_DATA_OVER


# ONNX Runtime's calibrators' settings for the histogram methods (create_calibrator's defaults)
HISTOGRAMS = {"entropy": {"num_bins": 128, "num_quantized_bins": 128, "symmetric": False, "percentile": 99.999},
              "percentile": {"num_bins": 2048, "num_quantized_bins": 128, "symmetric": True, "percentile": 99.999}}


def value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Every tensor's type and shape by name, inferred from the graph alone (weights not loaded)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    return {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}


def calibration_tensors(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """What ONNX Runtime's calibrators measure for MatMul/Gemm: their float inputs and outputs that are
    not weights (types inferred from the graph alone)."""
    infos = {name: v for name, v in value_infos(model).items()
             if v.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
    weights = {t.name for t in model.graph.initializer}
    names = dict.fromkeys(name for node in model.graph.node if node.op_type in QUANTIZED_OPS
                          for name in [*node.input, *node.output] if name in infos and name not in weights)
    return [infos[name] for name in names]


def measuring(source: Path, model: onnx.ModelProto, tensors: list[onnx.ValueInfoProto]) -> onnxruntime.InferenceSession:
    """A session of `source`'s graph (`model`, loaded without its weights) with `tensors` among its
    outputs: the weights are read from their file once, by ONNX Runtime alone."""
    outputs = {o.name for o in model.graph.output}
    model.graph.output.extend(v for v in tensors if v.name not in outputs)
    graph = source.with_name(f".{source.stem}.measuring.onnx")  # beside the weights it refers to
    onnx.save(model, str(graph))
    try:
        options = ort_options()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL  # as calibrators do
        return onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    finally:
        graph.unlink()


def calibrate(source: Path, feeds: list[Feed], method: str, cache: Path, log: Callable[[str], None]) -> None:
    """Measure the ranges of the tensors int8 quantizes into ONNX Runtime's calibration cache (`cache`),
    as its calibrators would on all of `feeds` at once, but holding the weights once and one input's
    tensors at a time: its calibrators hold the graph's weights in Python beside the session's copy
    (quantize_static a third) and every input's tensors together, too much for a 3.9B model in 24 GB.
    The measuring graph is the fp32 one, weights left in its file, with the tensors as outputs."""
    model = onnx.load(str(source), load_external_data=False)
    measured = calibration_tensors(model)
    names = [v.name for v in measured]
    session = measuring(source, model, measured)

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


def qdq_int8(cache: Path, method: str, source: Path, target: Path, nodes: list[str]) -> None:
    """ONNX Runtime's symmetric Q/DQ quantization of `nodes`, with the ranges `calibrate` measured by `method`."""
    quantize_static(str(source), str(target), None, calibration_cache_path=str(cache), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=QUANTIZED_OPS, per_channel=True, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, calibrate_method=METHODS[method], nodes_to_quantize=nodes,
                    use_external_data_format=large(source),
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                   "QuantizeBias": False,  # int32 biases: TensorRT dequantizes int8 only
                                   # products stay float into the bias and residual adds
                                   "OpTypesToExcludeOutputQuantization": QUANTIZED_OPS,
                                   # MatMul weights are [in, out]: one scale per output column
                                   "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}})


def dynamic_int8(source: Path, target: Path, nodes: list[str]) -> None:
    """ONNX Runtime's dynamic quantization of `nodes`."""
    # reduce_range: 7-bit weights. CPUs without VNNI (AVX2 only) multiply u8 by s8 in pairs summed
    # into 16 bits, which full-range weights overflow (seen here: a KV cache's cosine 0.985 -> 0.99+).
    quantize_dynamic(str(source), str(target), op_types_to_quantize=QUANTIZED_OPS, per_channel=True,
                     reduce_range=True, weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
                     use_external_data_format=large(source))


def to_int8_qdq(source: Path, target: Path, cache: Path, method: str, keep_float: list[str],
                log: Callable[[str], None] = lambda _: None) -> list[Path]:
    """Write the symmetric Q/DQ graph TensorRT builds from, with the ranges `calibrate` measured by `method`."""
    return in_pieces(source, target, lambda model: chosen_nodes(model, keep_float),
                     functools.partial(qdq_int8, cache, method), log)


def to_int8_dynamic(source: Path, target: Path, keep_float: list[str],
                    log: Callable[[str], None] = lambda _: None) -> list[Path]:
    """Write the dynamically quantized graph (u8 activations, s8 weights) ONNX Runtime runs fast on CPU."""
    return in_pieces(source, target, lambda model: chosen_nodes(model, keep_float), dynamic_int8, log)


def in_pieces(source: Path, target: Path, choose: Callable[[onnx.ModelProto], list[str]],
              quantize: Callable[[Path, Path, list[str]], None], log: Callable[[str], None] = lambda _: None) -> list[Path]:
    """Quantize the products `choose(model)` names in `source` into `target` by ONNX Runtime's quantizer
    (`quantize(piece, out, nodes)`), one
    small graph at a time: the products that read one activation (which share its quantization) and
    that activation's other readers (which the Q/DQ form rewires to its dequantized copy), with their
    weights. Given the whole graph, ONNX Runtime's quantizers hold every fp32 weight they replaced
    until they have saved, beside the loaded model and the int8 weights (345M: 3.4x the weights; a
    3.9B model would need about 45 GiB); this way one piece's weights are held at a time, and each
    piece's quantized weights go straight to the target's external-data file. The result computes
    what the whole graph's quantization gives, to the bit (tested)."""
    model = onnx.load(str(source), load_external_data=False)
    weights = {t.name: t for t in model.graph.initializer}
    infos = value_infos(model)
    chosen = set(choose(model))
    activation = {n.name: next(i for i in n.input if i not in weights) for n in model.graph.node if n.name in chosen}
    pieces: dict[str, list[onnx.NodeProto]] = {a: [] for a in activation.values()}
    placed: dict[str, int] = {}  # node -> its position in the graph, which its piece's nodes take
    for position, node in enumerate(model.graph.node):
        read = activation.get(node.name) or next((i for i in node.input if i in pieces), None)
        if read is not None:
            pieces[read].append(node)
            placed[node.name] = position
    nodes = [(position, node) for position, node in enumerate(model.graph.node) if node.name not in placed]
    opsets = {o.domain: o.version for o in model.opset_import}
    with Tensors(target, source.parent, external=large(source)) as tensors, \
            tempfile.TemporaryDirectory() as scratch, quiet():
        piece, out = Path(scratch) / "piece.onnx", Path(scratch) / "quantized.onnx"
        for count, members in enumerate(pieces.values(), 1):
            made = {o for n in members for o in n.output}
            inputs = dict.fromkeys(i for n in members for i in n.input if i and i not in weights and i not in made)
            graph = onnx.helper.make_graph(
                members, "piece", [infos[i] for i in inputs], [infos[o] for o in made],
                [tensors.loaded(weights[i]) for i in dict.fromkeys(i for n in members for i in n.input if i in weights)])
            onnx.save(onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version),
                      str(piece))
            quantize(piece, out, [n.name for n in members if n.name in chosen])
            result = onnx.load(str(out))
            nodes.extend((placed[members[0].name], copied(n)) for n in result.graph.node)
            opsets.update((o.domain, max(o.version, opsets.get(o.domain, 0))) for o in result.opset_import)
            tensors.add(result.graph.initializer)
            if count == len(pieces) or count % max(1, len(pieces) // 4) == 0:
                log(f"  quantized {count}/{len(pieces)} pieces")
        del model.graph.node[:]
        model.graph.node.extend(in_order(nodes))
        read = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        tensors.add(tensors.loaded(t) for t in weights.values() if t.name in read and t.name not in tensors.names)
    del model.graph.initializer[:]
    model.graph.initializer.extend(tensors.kept)
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(domain, version) for domain, version in opsets.items())
    onnx.save(model, str(target))
    check_graph(target)
    return written(target)


def copied(node: onnx.NodeProto) -> onnx.NodeProto:
    """A node of its own: one still part of a loaded model keeps that whole model (its weights) alive."""
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def in_order(nodes: list[tuple[int, onnx.NodeProto]]) -> list[onnx.NodeProto]:
    """`nodes` (position, node) sorted so that each comes after the nodes making what it reads, otherwise
    by position (a piece's nodes take its first member's, though some of them read tensors made later)."""
    maker = {output: k for k, (_, node) in enumerate(nodes) for output in node.output}
    waits_for = [{maker[i] for i in node.input if i in maker} for _, node in nodes]
    readers: dict[int, list[int]] = {}
    for k, makers in enumerate(waits_for):
        for m in makers:
            readers.setdefault(m, []).append(k)
    ready = [(position, k) for k, (position, _) in enumerate(nodes) if not waits_for[k]]
    heapq.heapify(ready)
    ordered = []
    while ready:
        _, k = heapq.heappop(ready)
        ordered.append(nodes[k][1])
        for reader in readers.get(k, []):
            waits_for[reader].discard(k)
            if not waits_for[reader]:
                heapq.heappush(ready, (nodes[reader][0], reader))
    return ordered


# Raw tensors under this stay in the graph file, as onnx's own external-data writer leaves them (and
# typed ones, like ONNX Runtime's scales and zero points): shape inference and our TensorRT checks read
# small constants only from there.
INLINE_UNDER = 1024


class Tensors:
    """A graph's initializers, written to its external-data file as they come (`external`) or kept inline."""

    def __init__(self, target: Path, source_folder: Path, external: bool):
        self.source_folder, self.location = source_folder, f"{target.name}.data"
        self.file = (target.parent / self.location).open("wb") if external else None
        self.kept: list[onnx.TensorProto] = []
        self.names: set[str] = set()

    def loaded(self, tensor: onnx.TensorProto) -> onnx.TensorProto:
        """A copy of `tensor` with its data read in from the source's external-data file."""
        copy = onnx.TensorProto()
        copy.CopyFrom(tensor)
        if external_data_helper.uses_external_data(copy):
            external_data_helper.load_external_data_for_tensor(copy, str(self.source_folder))
            copy.data_location = onnx.TensorProto.DEFAULT
            del copy.external_data[:]
        return copy

    def add(self, tensors: Iterable[onnx.TensorProto]) -> None:
        for tensor in tensors:
            if tensor.name in self.names:
                continue
            self.names.add(tensor.name)
            if self.file is not None and len(tensor.raw_data) >= INLINE_UNDER:
                data = tensor.raw_data
                # made anew, not cleared: a cleared field's bytes stay in the message's memory
                stored = onnx.TensorProto(name=tensor.name, dims=tensor.dims, data_type=tensor.data_type,
                                          data_location=onnx.TensorProto.EXTERNAL)
                for key, value in {"location": self.location, "offset": self.file.tell(), "length": len(data)}.items():
                    stored.external_data.add(key=key, value=str(value))
                self.file.write(data)
                tensor = stored
            self.kept.append(tensor)

    def __enter__(self) -> Tensors:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.file is not None:
            self.file.close()


def quantization_noise(qdq: Path, feeds: list[Feed]) -> dict[str, float]:
    """Each quantized activation's signal-to-quantization-noise ratio in dB over all `feeds`, as ONNX
    Runtime's qdq_loss_debug computes it (tested equal), measured one input at a time: qdq_loss_debug
    keeps every Q/DQ output of every input, the weights' dequantized copies among them (1.3B, 4 inputs:
    4.6x the fp32 weights)."""
    model = onnx.load(str(qdq), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    dequantized = {n.input[0]: n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    pairs = {n.input[0]: dequantized[n.output[0]] for n in model.graph.node
             if n.op_type == "QuantizeLinear" and n.input[0] not in weights and n.output[0] in dequantized}
    infos = value_infos(model)
    names = [name for pair in pairs.items() for name in pair]
    session = measuring(qdq, model, [infos[name] for name in names])
    signal = dict.fromkeys(pairs, 0.0)
    noise = dict.fromkeys(pairs, 0.0)
    for feed in feeds:
        values = dict(zip(names, session.run(names, feed)))
        for tensor, after in pairs.items():
            x = values[tensor].astype(np.float64)
            signal[tensor] += float(np.sum(x * x))
            noise[tensor] += float(np.sum((x - values[after]) ** 2))
    tiny = float(np.finfo("float").eps)
    return {t: 20 * math.log10(max(math.sqrt(signal[t]), tiny) / max(math.sqrt(noise[t]), tiny)) for t in pairs}


def sensitive_layers(qdq: Path, feeds: list[Feed], top: int | None = 5) -> list[dict[str, float | str]]:
    """The quantized layers whose inputs lose most to quantization on `feeds`, worst first (the `top`
    of them; None: all), by `quantization_noise` (dB, lower is worse), charged to every module that
    reads the activation."""
    model = onnx.load(str(qdq), load_external_data=False)
    layers: dict[str, list[str]] = {}  # tensor -> the modules of the products that read it (else that makes it)
    for node in model.graph.node:
        if node.op_type in QUANTIZED_OPS:
            for name in node.input:
                layers.setdefault(name.removesuffix("_DequantizeLinear_Output"), []).append(module_path(node))
    for node in model.graph.node:
        for name in node.output:
            layers.setdefault(name, [module_path(node)])
    worst: dict[str, float] = {}
    for tensor, sqnr in quantization_noise(qdq, feeds).items():
        for layer in layers.get(tensor, [tensor]):  # an input shared by several products hurts each of them
            worst[layer] = min(worst.get(layer, np.inf), sqnr)
    ranked = sorted(worst.items(), key=lambda item: item[1])[:top]
    return [{"layer": layer, "sqnr_db": round(sqnr, 2)} for layer, sqnr in ranked]
