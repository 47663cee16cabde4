"""What can be proven about TensorRT without TensorRT: every graph we would hand it passes its ONNX
parser's published operator table, Q/DQ is symmetric, and the optimization profiles fit the graphs.
Where TensorRT and a GPU exist, the real engine build runs too."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import HEADS, tiny_limits
from exporter.tensorrt.engine import profile_shapes
from exporter.tensorrt.parser_check import TABLE, graph_problems, load_structure, profile_problems
from runtime import tensorrt_backend
from runtime.heads import HEADS as SPECS
from runtime.heads import expand
from runtime.manifest import Manifest


def tensorrt_graphs(manifest_path):
    manifest = Manifest.load(manifest_path)
    return manifest, {graph: manifest_path.parent / g.get("tensorrt_file", g["file"])
                      for graph, g in manifest.graphs.items()}


def test_operator_table_is_data_with_its_source():
    assert TABLE["source"].startswith("https://github.com/onnx/onnx-tensorrt/blob/")
    assert {"MatMul", "LayerNormalization", "QuantizeLinear", "DequantizeLinear", "Softmax"} <= set(TABLE["operators"])
    assert "MatMulInteger" not in TABLE["operators"] and "DynamicQuantizeLinear" not in TABLE["operators"]


@pytest.mark.parametrize("fixture", ["built", "built_fp16", "built_int8"])
@pytest.mark.parametrize("head", HEADS)
def test_every_graph_for_tensorrt_passes(request, fixture, head):
    manifest, graphs = tensorrt_graphs(request.getfixturevalue(fixture)[head][0])
    assert manifest.tensorrt["parser_check"]["problems"] == []
    for graph, path in graphs.items():
        assert graph_problems(path) == [], path
        shapes = profile_shapes(expand(SPECS[head].graphs[graph].inputs, manifest.config), manifest.shape_limits)
        assert profile_problems(path, shapes) == [], path


def test_causal_lm_profile_spans_past_and_new_tokens(built):
    manifest = Manifest.load(built["causal-lm"][0])
    shapes = profile_shapes(expand(SPECS["causal-lm"].graphs["decode"].inputs, manifest.config), manifest.shape_limits)
    batch, sequence, past = (manifest.shape_limits[a] for a in ("batch", "sequence", "past_sequence"))
    assert shapes["attention_mask"] == tuple((batch[i], past[i] + sequence[i]) for i in range(3))
    heads, size = manifest.config["num_attention_heads"], manifest.config["hidden_size"]
    assert shapes["past_key_values.1.value"][2] == (batch[2], heads, past[2], size // heads)


def planted(path, tmp_path, change):
    """A copy of the graph at `path`, changed by `change(model)`."""
    model = onnx.load(str(path))
    change(model)
    copy = tmp_path / "planted.onnx"
    onnx.save(model, str(copy))
    return copy


def test_a_planted_unsupported_op_is_caught(built, tmp_path):
    path = tensorrt_graphs(built["qa"][0])[1]["model"]

    def add_unique(model):  # Unique has no TensorRT importer
        model.graph.node.append(helper.make_node("Unique", ["start_logits"], ["unique_values"], name="planted"))

    problems = graph_problems(planted(path, tmp_path, add_unique))
    assert len(problems) == 1 and "Unique" in problems[0] and "'planted'" in problems[0]

    def add_contrib_op(model):  # ONNX Runtime's own ops (com.microsoft) are not ONNX
        model.graph.node.append(helper.make_node("FastGelu", ["start_logits"], ["y"], name="fast", domain="com.microsoft"))
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))

    assert any("com.microsoft.FastGelu" in p for p in graph_problems(planted(path, tmp_path, add_contrib_op)))


def test_the_dynamic_int8_form_is_not_for_tensorrt(built_int8):
    manifest_path = built_int8["qa"][0]
    problems = graph_problems(manifest_path.parent / Manifest.load(manifest_path).graphs["model"]["file"])
    assert any("MatMulInteger" in p for p in problems) and any("DynamicQuantizeLinear" in p for p in problems)


def test_asymmetric_or_malformed_qdq_is_caught(built_int8, tmp_path):
    path = tensorrt_graphs(built_int8["qa"][0])[1]["model"]
    model = onnx.load(str(path))
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear"
              and n.input[0] in {t.name for t in model.graph.initializer})

    def replace(name, array):
        def change(m):
            tensor = next(t for t in m.graph.initializer if t.name == name)
            tensor.CopyFrom(numpy_helper.from_array(array, name))
        return change

    zero = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == dq.input[2]))
    scale = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == dq.input[1]))
    cases = [
        (replace(dq.input[2], np.full_like(zero, 3)), "zero point is not 0"),
        (replace(dq.input[2], zero.astype(np.uint8)), "zero point is UINT8"),
        (replace(dq.input[1], -scale), "scales must be finite positive"),
        (replace(dq.input[1], np.concatenate([scale, scale])), "per-channel scales do not match"),
    ]
    for change, message in cases:
        copy = planted(path, tmp_path, change)
        for problems in (graph_problems(copy), graph_problems(load_structure(copy, limit=1024))):  # weights moved out
            assert any(message in p for p in problems), (message, problems)


def test_profiles_that_do_not_fit_are_caught(built):
    manifest_path = built["qa"][0]
    manifest, graphs = tensorrt_graphs(manifest_path)
    good = profile_shapes(expand(SPECS["qa"].graphs["model"].inputs, manifest.config), manifest.shape_limits)
    path = graphs["model"]
    assert any("rank" in p for p in profile_problems(path, {**good, "input_ids": ((1,), (2,), (4,))}))
    conflicting = {**good, "attention_mask": ((1, 8), (2, 32), (8, 48))}  # batch max 8 here, 4 elsewhere
    assert any("two ranges" in p for p in profile_problems(path, conflicting))
    assert any("min <= opt <= max" in p for p in profile_problems(path, {**good, "input_ids": ((4, 8), (2, 32), (4, 48))}))
    assert any("no profile shape" in p for p in profile_problems(path, {k: v for k, v in good.items() if k != "input_ids"}))


@pytest.mark.skipif(tensorrt_backend.usable() is not None, reason=f"TensorRT engines: {tensorrt_backend.usable()}")
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_engine_build_and_run(hf_checkpoints, tmp_path, precision):
    from exporter.pipeline.build import BuildOptions, build
    from runtime import Session, UserError

    path = build(BuildOptions(head="qa", checkpoint=str(hf_checkpoints["qa"][0]), out=tmp_path, precision=precision,
                              backend="tensorrt", eval_data="none", **tiny_limits("qa")), log=print)
    manifest = Manifest.load(path)
    assert manifest.validation["passed"] and "tensorrt" in manifest.validation["backends"]
    assert {"version", "gpu", "compute_capability"} <= set(manifest.tensorrt)
    assert (tmp_path / "qa.plan").exists()
    engine, onnx_session = Session(tmp_path / "qa.plan"), Session(tmp_path / "qa.json", backend="onnxruntime")
    assert engine.backend.startswith("tensorrt")
    question, context = "Who built it?", "It was built by Ada in the town."
    assert engine.answer(question, context)["start"] == onnx_session.answer(question, context)["start"]
    edited = json.loads(path.read_text())
    edited["tensorrt"]["version"] = "9.0.0"  # as if built elsewhere
    path.write_text(json.dumps(edited))
    with pytest.raises(UserError, match=r"built with TensorRT 9\.0\.0 .* this machine has TensorRT"):
        Session(tmp_path / "qa.plan")
