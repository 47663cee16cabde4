"""int4 artifacts (ONNX Runtime's MatMulNBits): every weighted product in 4 bits, the causal LM's
vocabulary projection included; gated like int8, repaired by moving the products that lose most to 8
bits, then to float; opened by Session, verify and bench like any other artifact."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from exporter.cli import main
from exporter.pipeline.build import BuildOptions, build
from exporter.pipeline.quantized import Int4
from exporter.precision.int4 import int4_nodes, untied
from exporter.precision.int8 import CLASSIFIER_OUTPUTS
from runtime import Session
from runtime.manifest import Manifest

from test_task_accuracy import outlier_checkpoint


def graphs_of(manifest_path: Path) -> dict[str, onnx.ModelProto]:
    manifest = Manifest.load(manifest_path)
    return {graph: onnx.load(str(manifest_path.parent / g["file"])) for graph, g in manifest.graphs.items()}


@pytest.mark.parametrize("head", ["qa", "causal-lm", "sequence-classification", "token-classification", "mlm"])
def test_every_weighted_product_is_4_bit_and_the_artifact_runs_as_any_other(built_int4, built, head, tmp_path):
    manifest_path, _ = built_int4[head]
    manifest = Manifest.load(manifest_path)
    assert manifest.precision == "int4" and manifest.validation["passed"]
    assert manifest.quantization["block_size"] == 32 and manifest.quantization["symmetric"] is True
    assert "MatMulNBits" in manifest.quantization["form"] and manifest.quantization["eight_bits"] == []
    assert set(manifest.validation["forms"]) == {"onnxruntime", "openvino"}  # OpenVINO reads MatMulNBits
    assert manifest.tensorrt == {"not_built": manifest.tensorrt["not_built"]} and "MatMulNBits" in manifest.tensorrt["not_built"]
    fp32_graphs = graphs_of(built[head][0])
    for graph, model in graphs_of(manifest_path).items():
        fp32 = fp32_graphs[graph]
        # every product int8 would quantize is MatMulNBits at 4 bits here (the pooler's Gemm stays float)
        expected = int4_nodes(onnx.load(str(untied_copy(fp32, tmp_path / f"{graph}.onnx"))), [])
        nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
        assert len(nbits) == len(expected) > 0
        assert all(next(a.i for a in n.attribute if a.name == "bits") == 4 for n in nbits)
        weights = {t.name: t for t in model.graph.initializer}
        left = [weights[n.input[1]] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
        assert all(w.dims[-1] <= CLASSIFIER_OUTPUTS for w in left)  # only the heads' classifiers stay float
        if head == "causal-lm":  # the projection onto the vocabulary reads 4-bit weights, not the embeddings' table
            assert not any(n.op_type == "Transpose" and n.input[0] in weights for n in model.graph.node)
    graph_bytes = lambda path: sum(f.stat().st_size for f in path.parent.iterdir() if ".onnx" in f.name
                                   and f.name.startswith(f"{Manifest.load(path).name}."))
    assert graph_bytes(manifest_path) < graph_bytes(built[head][0])
    assert main(["verify", str(manifest_path)]) == 0
    for backend in ("onnxruntime", "openvino", "auto"):
        session = Session(manifest_path, backend=backend)
        assert session.precision == "int4"
        if head == "causal-lm":
            assert session.generate("the river", max_new_tokens=4) == Session(manifest_path).generate("the river", max_new_tokens=4)


def untied_copy(model: onnx.ModelProto, path: Path) -> Path:
    """The fp32 graph with its tied projection untied, as the int4 build quantizes it."""
    onnx.save(model, str(path))
    return untied(path)


def test_bench_times_an_int4_causal_lm_on_every_backend(built_int4, capsys):
    assert main(["bench", str(built_int4["causal-lm"][0]), "--seq", "8", "--new-tokens", "3", "--iterations", "1",
                 "--warmup", "0"]) == 0
    printed = capsys.readouterr().out
    assert "onnxruntime/CPU" in printed and "openvino/CPU" in printed and "int4" in printed


def test_int4_missing_its_bound_moves_the_worst_products_to_8_bits_then_to_float(tmp_path):
    # one weight of each query/key/value column 5000x the rest (the function unchanged: its input
    # channel scaled down as much): a block holding it keeps nothing else, at 4 bits or at 8
    checkpoint = outlier_checkpoint(tmp_path / "qa-outlier", scale=1 / 5000)
    said: list[str] = []
    manifest = Manifest.load(build(BuildOptions(head="qa", precision="int4", checkpoint=str(checkpoint),
                                                out=tmp_path / "out"), log=said.append))
    record, steps = manifest.quantization, manifest.quantization["repair"]
    hurt = {f"bert.encoder.layer.1.attention.self.{p}" for p in ("query", "key", "value")}
    assert set(record["repaired_layers"]) == hurt and set(record["kept_float"]) == hurt and record["eight_bits"] == []
    moves = [line for line in said if line.startswith("- int4 misses its accuracy bound")]
    assert len(moves) == 6 and all("at 8 bits" in m for m in moves[::2]) and all("in float" in m for m in moves[1::2])
    assert [s["off_four_bits"] for s in steps] == [0, 1, 1, 2, 2, 3, 3]
    fp32 = manifest.accuracy["reference"]
    lost = [s["metric"][fp32] - s["metric"]["onnxruntime"] for s in steps]
    assert lost[0] > 2.0 >= lost[-1] and manifest.accuracy["passed"]
    model = onnx.load(str(tmp_path / "out" / "qa.onnx"))
    assert sum(n.op_type == "MatMulNBits" for n in model.graph.node) == 24 - 3


def test_the_repair_stops_before_a_quarter_of_the_products_leave_4_bits():
    layers = [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(4) for p in ("query", "key", "value")]
    plan = {"eight_bits": [], "kept_float": []}
    int4 = Int4.__new__(Int4)  # the stepping rule alone, over made-up measurements
    int4.forced, int4.log, int4._ranking, int4.structure = [], lambda _: None, None, None
    int4.off = lambda p: len(p["eight_bits"]) + len(p["kept_float"])
    # each layer loses less than the one before; at 8 bits, less than any at 4
    int4.measure = lambda: [{"layer": layer, "sqnr_db": i + (100 if layer in plan["eight_bits"] else 0)}
                            for i, layer in enumerate(layers) if layer not in plan["kept_float"]]
    taken = []
    for step in int4.steps(plan, total=24):
        if isinstance(step, str):
            taken.append(step)
            break
        (layer, _), plan = step
        taken.append((layer, len(plan["eight_bits"]), len(plan["kept_float"])))
    # 6 of 24 at 8 bits is a quarter; then the worst of them, measured again, goes to float, and so on
    assert taken[:6] == [(layers[i], i + 1, 0) for i in range(6)]
    assert taken[6:12] == [(layers[i], 5 - i, i + 1) for i in range(6)]
    assert "int4 repair stopped: 6 of the 24 products are off 4 bits" in taken[12] and len(taken) == 13


@pytest.mark.parametrize("section, message", [
    ("block_size = 17", "int4.block_size must be one of 16, 32, 64, 128, 256"),
    ('method = "gptq"', "int4.method must be one of rtn, hqq"),
    ('method = "hqq"', "hqq fits a zero point per block"),
    ("bits = 3", "unknown int4 keys: bits"),
])
def test_a_bad_int4_recipe_exits_2_in_one_line_before_any_work(tmp_path, capsys, section, message):
    recipe = tmp_path / "qa.toml"
    recipe.write_text(f"[int4]\n{section}\n")
    assert main(["build", "--head", "qa", "--precision", "int4", "--recipe", str(recipe), "--out",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_tensorrt_engines_for_int4_are_refused_in_one_line(tmp_path, capsys):
    assert main(["build", "--head", "qa", "--precision", "int4", "--backend", "tensorrt", "--out",
                 str(tmp_path / "out")]) == 2
    assert "no TensorRT engines for int4" in capsys.readouterr().err


def test_the_decode_floor_benchmark_prints_each_precision_beside_its_floor(built, built_int4, tmp_path):
    result = subprocess.run([sys.executable, "benchmarks/decode_floor.py", str(built["causal-lm"][0]),
                             str(built_int4["causal-lm"][0]), "--prompt", "8", "--new-tokens", "4", "--iterations", "1",
                             "--profile", "--kernels", "--json", str(tmp_path / "floor.json")],
                            cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads((tmp_path / "floor.json").read_text())
    rows = {(r["precision"], r["backend"]): r for r in figures["rows"]}
    fp32, int4 = rows[("fp32", "onnxruntime/CPU")], rows[("int4", "onnxruntime/CPU")]
    assert int4["weights_mb"] < fp32["weights_mb"] / 3  # 4-bit weights and their scales against fp32's
    assert all(r["floor_ms"] > 0 and r["per_token_ms"] > 0 and r["first_token_ms"] > 0 for r in rows.values())
    assert "MatMulNBits" in figures["profiles"]["causal-lm (int4)"] and "MatMul" in figures["profiles"]["causal-lm (fp32)"]
    assert set(figures["int4_kernels"]) == {"onnxruntime MatMulNBits", "pytorch int4pack"}
    assert "x floor" in result.stdout and "read bandwidth" in result.stdout
