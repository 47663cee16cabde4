"""`python -m exporter build-all`: an index, nothing rebuilt when nothing changed, failures contained."""

from __future__ import annotations

import json

from exporter.cli import main

SMALL = "[shape_limits]\nbatch = [1, 2, 2]\nsequence = [1, 8, 16]\n"


def recipes(directory, failing=False):
    directory.mkdir()
    (directory / "nsp.toml").write_text(SMALL)
    (directory / "qa.toml").write_text(SMALL.replace("[1, 8, 16]", "[8, 12, 16]"))
    if failing:  # a bound no artifact can meet
        (directory / "base.toml").write_text(SMALL + "[tolerance.fp32]\nmin_cosine = 1.5\n")
    return directory


def test_a_failing_recipe_fails_the_run_but_not_the_others(tmp_path, capsys):
    args = ["build-all", "--recipes", str(recipes(tmp_path / "recipes", failing=True)), "--precisions", "fp32",
            "--out", str(tmp_path / "out")]
    assert main(args) == 1
    index = {e["name"]: e for e in json.loads((tmp_path / "out" / "index.json").read_text())["artifacts"]}
    assert not index["base-fp32"]["passed"] and "validation failed" in index["base-fp32"]["error"]
    assert index["nsp-fp32"]["passed"] and index["qa-fp32"]["passed"]
    assert (tmp_path / "out" / "qa-fp32.json").exists() and not (tmp_path / "out" / "base-fp32.json").exists()
    assert "1 failed (base-fp32)" in capsys.readouterr().out


def test_each_heads_graphs_are_exported_once_an_index_is_written_and_nothing_unchanged_is_rebuilt(
        tmp_path, monkeypatch, capsys):
    from exporter.export import to_onnx

    monkeypatch.setenv("MEGATRON_DEPLOY_CACHE", str(tmp_path / "cache"))  # nothing kept from other tests
    exports: list[str] = []
    real = to_onnx._export
    monkeypatch.setattr(to_onnx, "_export", lambda model, spec, graph, config, path: exports.append(path.name)
                        or real(model, spec, graph, config, path))
    args = ["build-all", "--recipes", str(recipes(tmp_path / "recipes")), "--precisions", "fp32,fp16,int8",
            "--out", str(tmp_path / "out")]
    assert main(args) == 0
    assert sorted(exports) == ["nsp-fp32.onnx", "qa-fp32.onnx"]  # fp16 and int8 start from the same graph
    index = json.loads((tmp_path / "out" / "index.json").read_text())["artifacts"]
    assert {(e["name"], e["passed"], e["backend"]) for e in index} == {
        (f"{h}-{p}", True, "onnxruntime") for h in ("nsp", "qa") for p in ("fp32", "fp16", "int8")}
    assert all((tmp_path / "out" / e["manifest"]).exists() and e["validation"]["passed"] for e in index)
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("unchanged since the last build, skipped") == 6 and "- exporting" not in out
    (tmp_path / "recipes" / "qa.toml").write_text(SMALL.replace("[1, 8, 16]", "[8, 10, 16]"))  # qa changed
    assert main(args) == 0
    assert capsys.readouterr().out.count("skipped") == 3
