"""Building int8: calibration data from files, methods, reproducibility, degenerate data, --keep-float,
what --backend does where TensorRT is absent, and quantizing a graph piece by piece."""

from __future__ import annotations

import functools
import json
import shutil

import numpy as np
import onnx
import pytest
from onnxruntime.quantization import qdq_loss_debug
from onnxruntime.quantization.calibrate import create_calibrator, load_tensors_data

from conftest import run_onnx, tiny_limits
from exporter.precision import calibration, int8
from exporter.pipeline.build import BuildOptions, ValidationFailed, build, report_sensitive
from exporter.cli import main
from exporter.precision.int8 import (METHODS, QUANTIZED_OPS, Feeds, calibrate, chosen_nodes, dynamic_int8, module_path,
                               qdq_int8, quantization_noise, to_int8_dynamic, to_int8_qdq)
from exporter.export.to_onnx import written
from exporter.model.samples import synthetic_inputs
from exporter.tensorrt.parser_check import graph_problems
from runtime import Session, UserError, tensorrt_backend
from runtime.heads import HEADS, expand
from runtime.manifest import Manifest

QUESTIONS = [{"question": f"Who built bridge {i}?", "context": f"Bridge {i} over the river was built by "
              f"engineers from the town of Ashford in the year {1800 + i}."} for i in range(12)]


def build_qa(hf_checkpoints, out, **options):
    options.setdefault("eval_data", "none")  # random weights: judged by their logits
    return build(BuildOptions(head="qa", checkpoint=str(hf_checkpoints["qa"][0]), out=out, precision="int8",
                              **tiny_limits("qa"), **options), log=lambda message: None)


def test_jsonl_with_the_heads_fields(hf_checkpoints, tmp_path):
    data = tmp_path / "squad.jsonl"
    data.write_text("\n".join(json.dumps(q) for q in QUESTIONS) + "\n")
    manifest = Manifest.load(build_qa(hf_checkpoints, tmp_path / "a", calibration_data=str(data),
                                      calibration_samples=10))
    assert manifest.validation["passed"]
    assert (manifest.quantization["samples"], manifest.quantization["data"]) == (10, str(data))
    session = Session(tmp_path / "a" / "qa.json")
    assert session.answer("Who built it?", "It was built by Ada.")["answer"]


def test_calibration_is_reproducible(hf_checkpoints, tmp_path):
    first = Manifest.load(build_qa(hf_checkpoints, tmp_path / "a"))
    second = Manifest.load(build_qa(hf_checkpoints, tmp_path / "b"))
    assert first.files["qa.qdq.onnx"]["sha256"] == second.files["qa.qdq.onnx"]["sha256"]
    assert first.files["qa.onnx"]["sha256"] == second.files["qa.onnx"]["sha256"]


def test_degenerate_calibration_fails_validation(hf_checkpoints, tmp_path, capsys):
    padding = tmp_path / "padding.txt"
    padding.write_text("[PAD] [PAD] [PAD] [PAD] [PAD] [PAD]\n" * 40)
    code = main(["build", "--head", "qa", "--checkpoint", str(hf_checkpoints["qa"][0]), "--precision", "int8",
                 "--calibration-data", str(padding), "--out", str(tmp_path / "out"), "--max-sequence", "48",
                 "--max-batch", "4"])
    captured = capsys.readouterr()
    assert code == 1
    assert "calibration data is degenerate" in captured.err and "--calibration-data" in captured.err
    assert "--keep-float" in captured.out  # the report of the layers int8 hurts most
    assert not (tmp_path / "out" / "qa.json").exists() and (tmp_path / "out" / "qa.failed").is_dir()
    failed = Manifest.load(tmp_path / "out" / "qa.failed" / "qa.json")
    assert failed.quantization["sensitive_layers"][0]["layer"].startswith("bert.encoder.layer.")


def test_the_failure_report_gives_one_pattern_for_the_product_that_loses_most_in_many_layers():
    def report(*layers: str) -> list[str]:
        lines: list[str] = []
        report_sensitive([{"layer": layer, "sqnr_db": 34.0} for layer in layers], lines.append)
        return lines

    mostly_one_kind = report("bert.encoder.layer.20.output.dense", "bert.encoder.layer.33.output.dense",
                             "bert.encoder.layer.2.attention.self.query")
    assert "--keep-float 'bert.encoder.layer.20.output.dense'" in mostly_one_kind[1]
    assert "2 of these 3" in mostly_one_kind[2] and "--keep-float 'bert.encoder.layer.*.output.dense'" in mostly_one_kind[2]
    assert len(report("bert.encoder.layer.20.output.dense", "bert.encoder.layer.2.attention.self.query")) == 2
    assert len(report()) == 1  # nothing ranked: nothing to suggest


def test_accuracy_under_the_bound_fails_validation(hf_checkpoints, tmp_path):
    recipe = tmp_path / "strict.toml"
    recipe.write_text("[shape_limits]\nbatch = [1, 2, 4]\nsequence = [8, 32, 48]\n"
                      "[tolerance.int8]\nmin_cosine = 0.9999999\n")
    with pytest.raises(ValidationFailed, match="cosine"):
        build_qa(hf_checkpoints, tmp_path / "out", recipe=str(recipe))


def test_keep_float_leaves_layers_unquantized(hf_checkpoints, tmp_path):
    manifest = Manifest.load(build_qa(hf_checkpoints, tmp_path, keep_float=["bert.encoder.layer.0.*"]))
    assert manifest.quantization["kept_float"] == ["bert.encoder.layer.0.*"]
    qdq = onnx.load(str(tmp_path / "qa.qdq.onnx"))
    modules = {n.name: module_path(n) for n in qdq.graph.node}  # the products keep their names and scopes
    in_qdq = {modules[n.name] for n in qdq.graph.node if any(i.endswith("_DequantizeLinear_Output") for i in n.input)}
    dynamic = onnx.load(str(tmp_path / "qa.onnx"))
    in_dynamic = {modules[n.name.removesuffix("_quant")] for n in dynamic.graph.node if n.op_type == "MatMulInteger"}
    for quantized in (in_qdq, in_dynamic):
        assert any(".layer.1." in m for m in quantized) and not any(".layer.0." in m for m in quantized), quantized
    with pytest.raises(UserError, match="matches no quantized layer"):
        build_qa(hf_checkpoints, tmp_path / "x", keep_float=["no.such.layer"])


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_other_calibration_methods(hf_checkpoints, tmp_path, method):
    manifest = Manifest.load(build_qa(hf_checkpoints, tmp_path, calibration_method=method, calibration_samples=8))
    assert manifest.validation["passed"] and manifest.quantization["method"] == method


def test_causal_lm_calibrates_both_graphs(hf_checkpoints, tmp_path):
    path = build(BuildOptions(head="causal-lm", checkpoint=str(hf_checkpoints["causal-lm"][0]), out=tmp_path,
                              precision="int8", eval_data="none", **tiny_limits("causal-lm")), log=lambda message: None)
    manifest = Manifest.load(path)
    assert {g["tensorrt_file"] for g in manifest.graphs.values()} == {"causal-lm.prefill.qdq.onnx",
                                                                      "causal-lm.decode.qdq.onnx"}
    assert Session(tmp_path / "causal-lm.prefill.qdq.onnx").generate("the river", max_new_tokens=3) is not None


@pytest.mark.parametrize("text, error", [
    ("not json\n", "not JSON"),
    ('{"question": "Who?"}\n', "field 'context' must be a text"),
    ("[1, 2]\n", "expected an object"),
])
def test_bad_jsonl_names_the_line(tmp_path, text, error):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "Who?", "context": "Ada."}\n' + text)
    with pytest.raises(UserError, match=rf"bad.jsonl:2: {error}"):
        calibration.read_examples(data, HEADS["qa"], 8, 4)


def test_bad_calibration_files(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        calibration.read_examples(tmp_path / "missing.txt", HEADS["qa"], 8, 4)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="expected a .txt"):
        calibration.read_examples(tmp_path / "data.csv", HEADS["qa"], 8, 4)
    (tmp_path / "one.txt").write_text("only one line\n")
    with pytest.raises(UserError, match="no examples"):  # qa takes a question and a context per example
        calibration.read_examples(tmp_path / "one.txt", HEADS["qa"], 8, 4)
    lines = tmp_path / "lines.txt"
    lines.write_text("a prompt\n" + "".join(f"choice {i}\n" for i in range(4)))
    assert calibration.read_examples(lines, HEADS["multiple-choice"], 8, 4) == [
        {"prompt": "a prompt", "choices": [f"choice {i}" for i in range(4)]}]


@pytest.mark.skipif(tensorrt_backend.usable() is None, reason="TensorRT and a GPU are here")
def test_backend_flags_without_tensorrt(hf_checkpoints, tmp_path, capsys):
    common = ["build", "--head", "qa", "--checkpoint", str(hf_checkpoints["qa"][0]), "--max-sequence", "48",
              "--max-batch", "4", "--out", str(tmp_path)]
    assert main([*common, "--backend", "tensorrt"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "cannot build TensorRT engines here" in error
    assert not (tmp_path / "qa.json").exists()
    assert main(common) == 0
    out = capsys.readouterr().out
    assert sum("no TensorRT engine will be built" in line for line in out.splitlines()) == 1
    manifest = Manifest.load(tmp_path / "qa.json")
    assert manifest.engines == {} and manifest.tensorrt["parser_check"]["problems"] == []


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_calibration_measures_what_onnxruntimes_calibrators_do(built, tmp_path, method):
    """Our lean calibration (weights held once, one input's tensors at a time) gives the ranges ONNX
    Runtime's calibrators give on all the inputs at once, exactly."""
    # A copy: calibrating writes its measuring graph beside the graph, and the methods run in parallel workers
    graph = tmp_path / "qa.onnx"
    for file in written(built["qa"][0].parent / "qa.onnx"):
        shutil.copy(file, tmp_path / file.name)
    rng = np.random.default_rng(0)
    feeds = [{"input_ids": rng.integers(5, 100, (2, 16), dtype=np.int64),
              "attention_mask": np.ones((2, 16), np.int64), "token_type_ids": np.zeros((2, 16), np.int64)}
             for _ in range(3)]
    cache = tmp_path / "ranges.json"
    calibrate(graph, feeds, method, cache, log=lambda message: None)
    ours = load_tensors_data(cache)
    theirs = create_calibrator(graph, QUANTIZED_OPS, str(tmp_path / "augmented.onnx"), METHODS[method])
    theirs.collect_data(Feeds(feeds))  # all inputs in one call, as quantize_static does
    expected = theirs.compute_data()
    assert ours.calibration_method == expected.calibration_method
    assert sorted(ours.keys()) == sorted(expected.keys()) and len(ours.keys()) > 8
    for name in expected.keys():
        np.testing.assert_array_equal(ours[name].range_value, expected[name].range_value, err_msg=name)
    assert not list(graph.parent.glob(".*measuring*"))  # the measuring graph is gone


def graph_feeds(manifest: Manifest, graph: str, count: int) -> list[dict[str, np.ndarray]]:
    """`count` padded inputs of one of an artifact's graphs (a causal LM decode step's with a past)."""
    from exporter.model.config import MegatronBertConfig

    spec, config = HEADS[manifest.head], MegatronBertConfig.from_hf_dict(manifest.config)
    sizes = {"batch": 2, "sequence": 9, "choices": 3, "past_sequence": 4, "total_sequence": 13}
    inputs = expand(spec.graphs[graph].inputs, manifest.config)
    return [{k: v.numpy() for k, v in synthetic_inputs(inputs, sizes, config, spec.padding_side, seed=s).items()}
            for s in range(count)]


@pytest.mark.parametrize("form", ["dynamic", "qdq"])
def test_quantizing_piece_by_piece_computes_what_quantizing_the_whole_graph_does(built, tmp_path, form):
    """Every graph of every head, quantized one activation's readers at a time, gives ONNX Runtime's
    whole-graph quantization's outputs to the bit, with the same int8 weights."""
    for head, (manifest_path, _) in built.items():
        manifest = Manifest.load(manifest_path)
        for graph, entry in manifest.graphs.items():
            fp32 = manifest_path.parent / entry["file"]
            feeds = graph_feeds(manifest, graph, 3)
            cache = tmp_path / f"{head}-{graph}.ranges.json"
            calibrate(fp32, feeds, "minmax", cache, log=lambda message: None)
            whole, pieces = tmp_path / f"{head}-{graph}-whole.onnx", tmp_path / f"{head}-{graph}-pieces.onnx"
            nodes = chosen_nodes(onnx.load(str(fp32), load_external_data=False), [])
            with int8.quiet():
                if form == "dynamic":
                    dynamic_int8(fp32, whole, nodes)
                    to_int8_dynamic(fp32, pieces, [])
                else:
                    qdq_int8(cache, "minmax", fp32, whole, nodes)
                    to_int8_qdq(fp32, pieces, cache, "minmax", [])
            expected, actual = run_onnx(whole, feeds[0]), run_onnx(pieces, feeds[0])
            assert expected.keys() == actual.keys()
            for name in expected:
                np.testing.assert_array_equal(actual[name], expected[name], err_msg=f"{head} {graph} {name}")
            weights = [{t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer
                        if t.data_type == onnx.TensorProto.INT8} for path in (whole, pieces)]
            assert weights[0].keys() == weights[1].keys() and len(weights[0]) >= len(nodes) > 0, (head, graph)
            for name in weights[0]:
                np.testing.assert_array_equal(weights[1][name], weights[0][name], err_msg=f"{head} {graph} {name}")


def test_each_piece_holds_a_sliver_of_the_weights_and_large_graphs_stream_to_external_data(built, tmp_path,
                                                                                           monkeypatch):
    """A graph over 256 MiB (here: as if) gets its int8 weights written piece by piece to external data, with
    the scales and zero points left in the graph file where TensorRT's checks (and ONNX Runtime) read them."""
    manifest_path = built["qa"][0]
    fp32 = manifest_path.parent / "qa.onnx"
    weights = sum(t.ByteSize() for t in onnx.load(str(fp32)).graph.initializer)
    feeds = graph_feeds(Manifest.load(manifest_path), "model", 2)
    cache = tmp_path / "ranges.json"
    calibrate(fp32, feeds, "minmax", cache, log=lambda message: None)
    forms = {"dynamic": dynamic_int8, "qdq": functools.partial(qdq_int8, cache, "minmax")}
    pieces: list[int] = []

    def measured(quantize, piece, out, nodes):
        pieces.append(sum(t.ByteSize() for t in onnx.load(str(piece)).graph.initializer))
        quantize(piece, out, nodes)

    nodes = chosen_nodes(onnx.load(str(fp32)), [])
    monkeypatch.setattr("exporter.export.to_onnx.EXTERNAL_DATA_OVER", 0)  # as if this tiny graph were over 256 MiB
    monkeypatch.setattr(int8, "INLINE_UNDER", 64)  # and its tensors as large as a real one's
    for form, quantizer in forms.items():
        streamed, whole = tmp_path / f"{form}-streamed.onnx", tmp_path / f"{form}-whole.onnx"
        with int8.quiet():
            int8.in_pieces(fp32, streamed, lambda model: int8.chosen_nodes(model, []), functools.partial(measured, quantizer))
            quantizer(fp32, whole, nodes)
        assert (tmp_path / f"{form}-streamed.onnx.data").stat().st_size > weights / 5  # int8 and float weights
        model = onnx.load(str(streamed), load_external_data=False)
        external = {t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
        assert len(external) >= len(nodes) and not any(n.endswith(("_scale", "_zero_point")) for n in external)
        if form == "qdq":
            assert graph_problems(streamed) == []
        expected, actual = run_onnx(whole, feeds[0]), run_onnx(streamed, feeds[0])
        for name in expected:
            np.testing.assert_array_equal(actual[name], expected[name], err_msg=f"{form} {name}")
    assert len(pieces) > 8 and max(pieces) < weights / 4


def test_quantization_noise_is_what_onnxruntimes_qdq_debugger_measures(built_int8, tmp_path):
    """Each activation's signal-to-quantization-noise ratio, measured one input at a time, equals what
    qdq_loss_debug gives holding every input's tensors at once."""
    manifest_path = built_int8["qa"][0]
    qdq = manifest_path.parent / "qa.qdq.onnx"
    feeds = graph_feeds(Manifest.load(manifest_path), "model", 3)
    ours = quantization_noise(qdq, feeds)
    augmented = tmp_path / "augmented.onnx"
    qdq_loss_debug.modify_model_output_intermediate_tensors(str(qdq), str(augmented),
                                                            op_types_for_saving=["QuantizeLinear", "DequantizeLinear"])
    matched = qdq_loss_debug.create_activation_matching(qdq_loss_debug.collect_activations(str(augmented), Feeds(feeds)))
    theirs = {tensor: qdq_loss_debug.compute_signal_to_quantization_noice_ratio(m["pre_qdq"], m["post_qdq"])
              for tensor, m in matched.items() if m.get("pre_qdq") is not None}
    assert ours.keys() == theirs.keys() and len(ours) > 4
    for tensor, sqnr in theirs.items():
        assert ours[tensor] == pytest.approx(sqnr, abs=1e-4), tensor
