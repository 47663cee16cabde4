"""fp16 and int8 artifacts of every head: within their bounds of the reference (checked here again
against transformers, not only as the manifest says), with precision where it belongs in the graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import HEADS, head_inputs, hf_outputs, padded_batch, run_onnx
from exporter.tensorrt.parser_check import graph_problems
from exporter.validation.logits import compare
from runtime import openvino_backend
from runtime.manifest import Manifest

OPENVINO = ("openvino",) if openvino_backend.usable() is None else ()  # validated too where it is installed
ENCODER_HEADS = [h for h in HEADS if h != "causal-lm"]


def pooled_rows(manifest: Manifest) -> list[dict]:
    return [c for c in manifest.validation["cases"] if c["case"] == "all"]


def assert_within(manifest: Manifest, hf, head: str, files: list[str]) -> None:
    """The graphs at `files` agree with transformers on a padded batch within the manifest's bounds."""
    bounds = manifest.validation["tolerance"]
    inputs = head_inputs(head, padded_batch(hf.config.vocab_size, batch=3, length=37))
    expected = hf_outputs(head, hf, inputs)
    for file in files:
        actual = run_onnx(file, inputs)
        for name, value in expected.items():
            _, cosine, argmax = compare(value.numpy(), actual[name], name in ("logits", "start_logits", "end_logits",
                                                                               "prediction_logits"),
                                        bounds.get("tie_margin", 0.0))
            assert cosine >= bounds["min_cosine"], (file, name, cosine)
            assert argmax is None or argmax >= bounds["min_argmax"], (file, name, argmax)


@pytest.mark.parametrize("head", HEADS)
def test_fp16_artifact(head, built_fp16):
    path, hf = built_fp16[head]
    manifest = Manifest.load(path)
    assert manifest.precision == "fp16" and manifest.validation["passed"]
    for row in pooled_rows(manifest):  # argmax agrees with fp32 PyTorch on >= 99% of positions
        assert row["argmax"] is None or row["argmax"] >= 0.99, row
    for graph in manifest.graphs.values():
        model = onnx.load(str(path.parent / graph["file"]))
        weights = [t for t in model.graph.initializer if len(t.dims) == 2]
        assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
        # LayerNorm and Softmax compute in fp32: the converter casts their inputs up
        produced = {o: n for n in model.graph.node for o in n.output}
        for node in model.graph.node:
            if node.op_type in ("LayerNormalization", "Softmax"):
                source = produced.get(node.input[0])
                assert source is not None and source.op_type == "Cast", node.name
        assert graph_problems(path.parent / graph["file"]) == []
    if head != "causal-lm":
        assert_within(manifest, hf, head, [path.parent / manifest.graphs["model"]["file"]])


@pytest.mark.parametrize("head", HEADS)
def test_int8_artifact(head, built_int8):
    path, hf = built_int8[head]
    manifest = Manifest.load(path)
    assert manifest.precision == "int8" and manifest.validation["passed"]
    assert {r["backend"] for r in pooled_rows(manifest)} == {"onnxruntime", "onnxruntime q/dq", *OPENVINO}
    q = manifest.quantization
    assert q["method"] == "entropy" and q["samples"] > 1 and q["distinct_tokens"] >= 16
    assert "MatMulInteger" in q["forms"]["onnxruntime"] and "Q/DQ" in q["forms"]["tensorrt"]
    for graph in manifest.graphs.values():
        dynamic = onnx.load(str(path.parent / graph["file"]))
        assert "MatMulInteger" in {n.op_type for n in dynamic.graph.node}
        assert_symmetric_qdq(path.parent / graph["tensorrt_file"])
    if head != "causal-lm":
        graph = manifest.graphs["model"]
        assert_within(manifest, hf, head, [path.parent / graph["file"], path.parent / graph["tensorrt_file"]])


def assert_symmetric_qdq(path) -> None:
    """What TensorRT needs: int8 zero points of 0, weights per output channel, and Q/DQ in front of
    the matrix products only: LayerNorm, softmax, GELU and the adds read float."""
    model = onnx.load(str(path))
    assert graph_problems(path) == []
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = model.graph.node
    dequantized = {n.output[0]: n for n in nodes if n.op_type == "DequantizeLinear"}
    assert dequantized
    per_channel = 0
    for node in nodes:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zero = initializers[node.input[2]]
            assert zero.dtype == np.int8 and not zero.any()
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers:  # a weight
            weight, scale = initializers[node.input[0]], initializers[node.input[1]]
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            assert scale.shape == (weight.shape[axis],)
            per_channel += 1
        for name in node.input:
            if name in dequantized:  # (a Gather may share the LayerNorm output a product reads)
                assert node.op_type in ("MatMul", "Gemm", "Gather"), (node.op_type, name)
    assert per_channel > 0
