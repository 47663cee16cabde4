"""Will TensorRT's ONNX parser take this graph? Checked without TensorRT, from its published tables.

`onnx_operators.json` is the operator table of onnx-tensorrt (the parser inside
TensorRT) for TensorRT 10, as data: each supported op with the data types it accepts. A graph passes
when every node is a standard-domain op in that table, every input it reads has one of the op's types,
uint8 appears only at the graph's edges, and every Q/DQ pair is what TensorRT can run: int8 with zero
points of 0 and finite positive float scales, per tensor or per channel along a real axis. Optimization
profiles are checked against the graph's inputs: ranks, fixed dims, and one range per named axis.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from exporter.tensorrt.engine import Shapes

TABLE = json.loads((Path(__file__).parent / "onnx_operators.json").read_text())
TYPE_NAMES = {TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16",
              TensorProto.INT32: "INT32", TensorProto.INT64: "INT64", TensorProto.INT8: "INT8",
              TensorProto.UINT8: "UINT8", TensorProto.BOOL: "BOOL", TensorProto.DOUBLE: "DOUBLE",
              TensorProto.INT4: "INT4", TensorProto.FLOAT8E4M3FN: "FP8"}
QDQ = ("QuantizeLinear", "DequantizeLinear")
WEIGHT = "weight moved out by load_structure"


def load_structure(path: Path, limit: int = 2**20) -> onnx.ModelProto:
    """The graph without its large weights (over `limit` bytes; they become typed inputs): the checks need only
    their type and shape, and shape inference over a 1.3 GB model would copy it twice. Scales and zero
    points, which the Q/DQ checks read, stay."""
    model = onnx.load(str(path), load_external_data=False)
    large = [t for t in model.graph.initializer if len(t.raw_data) > limit or t.data_location == TensorProto.EXTERNAL]
    for tensor in large:
        model.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims,
                                                                    doc_string=WEIGHT))
        model.graph.initializer.remove(tensor)
    return model


def _inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """The graph's real inputs (not the weights load_structure turned into inputs)."""
    return [v for v in graph.input if v.doc_string != WEIGHT]


def graph_problems(path: Path | onnx.ModelProto) -> list[str]:
    """What in the graph TensorRT's ONNX parser would refuse (empty: nothing)."""
    model = load_structure(path) if isinstance(path, Path) else path
    problems = []
    low, high = TABLE["opsets"]
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if not low <= opset <= high:
        problems.append(f"opset {opset} is outside TensorRT's {low}-{high}")
    graph = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output, *graph.value_info)}
    types.update({t.name: t.data_type for t in graph.initializer})
    initializers = {t.name: t for t in graph.initializer}
    edges = {v.name for v in (*_inputs(graph), *graph.output)}
    dims = {t.name: list(t.dims) for t in graph.initializer}
    dims.update({v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.input if v.doc_string == WEIGHT})
    for node in graph.node:
        where = f"{node.op_type} node {node.name!r}"
        if node.domain not in ("", "ai.onnx") or node.op_type not in TABLE["operators"]:
            problems.append(f"{where}: {node.domain + '.' if node.domain else ''}{node.op_type} is not an op "
                            "TensorRT's ONNX parser supports")
            continue
        allowed = set(TABLE["operators"][node.op_type]["types"])
        data_inputs = node.input[:1] if node.op_type in QDQ else node.input  # scales and zero points: below
        for name in data_inputs:
            kind = TYPE_NAMES.get(types.get(name, 0))
            if kind and kind not in allowed:
                problems.append(f"{where}: input {name!r} is {kind}; TensorRT takes {', '.join(sorted(allowed))}")
            if kind == "UINT8" and name not in edges:
                problems.append(f"{where}: uint8 tensor {name!r} inside the graph (TensorRT: inputs/outputs only)")
        if node.op_type in QDQ:
            problems += _qdq_problems(node, where, initializers, dims)
    return problems


def _qdq_problems(node: onnx.NodeProto, where: str, initializers: dict[str, TensorProto],
                  dims: dict[str, list[int]]) -> list[str]:
    """TensorRT runs symmetric int8 only: zero points 0 (int8), positive scales, a valid channel axis."""
    scale = initializers.get(node.input[1]) if len(node.input) > 1 else None
    if scale is None:
        return [f"{where}: its scale is not a constant"]
    problems = []
    scales = numpy_helper.to_array(scale)
    if scale.data_type != TensorProto.FLOAT or not (np.isfinite(scales).all() and (scales > 0).all()):
        problems.append(f"{where}: scales must be finite positive float32")
    zero = initializers.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if zero is not None:
        if zero.data_type != TensorProto.INT8:
            problems.append(f"{where}: zero point is {TensorProto.DataType.Name(zero.data_type)}; TensorRT takes int8")
        if numpy_helper.to_array(zero).any():
            problems.append(f"{where}: zero point is not 0 (TensorRT's int8 is symmetric)")
    if scales.size > 1:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = dims.get(node.input[0])
        if shape is not None and not (-len(shape) <= axis < len(shape) and shape[axis] == scales.size):
            problems.append(f"{where}: {scales.size} per-channel scales do not match axis {axis} of {shape}")
    return problems


def profile_problems(path: Path | onnx.ModelProto, shapes: Shapes) -> list[str]:
    """Does the optimization profile fit the graph's inputs?"""
    graph = (load_structure(path) if isinstance(path, Path) else path).graph
    problems: list[str] = []
    ranges: dict[str, tuple[int, int, int]] = {}
    for value in _inputs(graph):
        if value.name not in shapes:
            problems.append(f"input {value.name!r} has no profile shape")
            continue
        low, opt, high = shapes[value.name]
        dims = value.type.tensor_type.shape.dim
        if not len(dims) == len(low) == len(opt) == len(high):
            problems.append(f"input {value.name!r}: the graph has rank {len(dims)}, the profile {len(low)}")
            continue
        for i, dim in enumerate(dims):
            bounds = (low[i], opt[i], high[i])
            if not 1 <= bounds[0] <= bounds[1] <= bounds[2]:
                problems.append(f"input {value.name!r} dim {i}: min <= opt <= max fails for {bounds}")
            if dim.HasField("dim_value") and set(bounds) != {dim.dim_value}:
                problems.append(f"input {value.name!r} dim {i} is fixed at {dim.dim_value}, the profile says {bounds}")
            elif dim.HasField("dim_param") and ranges.setdefault(dim.dim_param, bounds) != bounds:
                problems.append(f"axis {dim.dim_param!r} has two ranges: {ranges[dim.dim_param]} and {bounds}")
    problems += [f"the profile names {name!r}, which is not an input"
                 for name in set(shapes) - {v.name for v in _inputs(graph)}]
    return problems
