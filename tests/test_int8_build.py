"""Building int8: calibration data from files, methods, reproducibility, degenerate data, --keep-float,
and what --backend does where TensorRT is absent."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnxruntime.quantization.calibrate import create_calibrator, load_tensors_data

from conftest import tiny_limits
from exporter import calibration
from exporter.build import BuildOptions, ValidationFailed, build
from exporter.cli import main
from exporter.quantize import METHODS, QUANTIZED_OPS, Feeds, calibrate, module_path
from runtime import Session, UserError, tensorrt_backend
from runtime.heads import HEADS
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
    graph = built["qa"][0].parent / "qa.onnx"
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
    assert not list(graph.parent.glob(".*calibrating*"))  # the measuring graph is gone


def test_an_int8_build_the_quantizer_could_not_finish_is_refused_at_the_start(hf_checkpoints, tmp_path, monkeypatch):
    from exporter import checkpoints
    from exporter.config import MegatronBertConfig

    config = MegatronBertConfig.from_hf_dict(json.loads((hf_checkpoints["qa"][0] / "config.json").read_text()))
    weights = config.parameters * 4
    monkeypatch.setattr(checkpoints, "available_memory", lambda: weights)  # the weights fit; the quantizer's 3.4x not
    with pytest.raises(UserError, match="dynamic quantizer needs about .* --skip-memory-check"):
        build_qa(hf_checkpoints, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    assert Manifest.load(build_qa(hf_checkpoints, tmp_path / "b", memory_check=False)).validation["passed"]
