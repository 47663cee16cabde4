"""`python -m exporter`: the README's command, exit codes, one-line errors, nothing half-written."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import save_hf
from exporter import cli
from runtime.manifest import Manifest
from runtime.pinned import verify

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--max-batch", "2", "--max-sequence", "16", "--eval-data", "none"]  # quick builds that are not the point


def exporter(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exporter", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """`python -m exporter ARGS` run by this test process (for errors found before any export, where a
    process of its own would spend its time importing torch): the exit status and what it printed."""
    capsys.readouterr()
    try:
        code = cli.main(list(args))
    except SystemExit as stopped:  # argparse's refusals
        code = stopped.code
    printed = capsys.readouterr()
    return subprocess.CompletedProcess(["python", "-m", "exporter", *args], code, printed.out, printed.err)


def visible(folder: Path) -> dict[str, bytes]:
    """The artifact files users see in `folder` (links into the hidden version folders), with contents."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith(".") and p.is_file()}


def assert_user_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for word in words:
        assert word in lines[0]


def test_readme_main_command_builds_the_demo_qa_artifact(tmp_path):
    readme = (ROOT / "README.md").read_text()
    command = next(line.split("&&")[-1].strip() for line in readme.splitlines() if "python -m exporter build" in line)
    assert command == "python -m exporter build --head qa --precision fp16"
    result = exporter(*shlex.split(command)[3:], "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "validating" in result.stdout and "start_logits" in result.stdout  # progress and the result table
    assert "task accuracy (qa.jsonl)" in result.stdout and "exact_match" in result.stdout  # the metric decides fp16
    manifest = Manifest.load(tmp_path / "qa.json")
    assert (manifest.head, manifest.precision, manifest.validation["passed"]) == ("qa", "fp16", True)
    assert manifest.accuracy["passed"] and manifest.source["checkpoint"].endswith("exporter/sources/demo/qa")
    assert sorted(visible(tmp_path)) == ["qa.json", "qa.onnx", "qa.tokenizer.json"]


def test_heads_lists_every_head_with_inputs_and_outputs():
    result = exporter("heads")
    assert result.returncode == 0
    for head in ("base", "mlm", "causal-lm", "nsp", "pretraining", "sequence-classification",
                 "multiple-choice", "token-classification", "qa"):
        assert f"\n{head}: " in "\n" + result.stdout
    assert "past_key_values.{layer}.key[batch,heads,past_sequence,head_size]" in result.stdout
    assert "start_logits[batch,sequence]" in result.stdout


def test_help_names_every_option():
    result = exporter("build", "--help")
    for option in ("--head", "--precision", "--checkpoint", "--tokenizer", "--out", "--name", "--recipe",
                   "--max-batch", "--max-sequence", "--max-choices", "--max-past"):
        assert option in result.stdout


@pytest.mark.parametrize("args, words", [
    (["--head", "summarize"], ["invalid choice", "summarize"]),
    (["--head", "qa", "--checkpoint", "/no/such/checkpoint"], ["/no/such/checkpoint"]),
    (["--head", "qa", "--max-sequence", "1000"], ["max_position_embeddings", "128"]),
    (["--head", "qa", "--max-choices", "4"], ["no choices axis"]),
    (["--head", "qa", "--checkpoint", "exporter/sources/demo/base"], ["no weights for this head", "--allow-random-head"]),
    (["--head", "qa", "--checkpoint", "demo-random", "--config", "x.json"], ["--config", "has none"]),
    (["--head", "qa", "--config", "/no/such/config.json"], ["/no/such/config.json", "no such config"]),
    (["--head", "qa", "--precision", "int8", "--keep-float", "nothing.*"], ["--keep-float", "matches no quantized layer"]),
    (["--head", "qa", "--name", "../elsewhere"], ["plain file name"]),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, args, words):
    monkeypatch.chdir(ROOT)  # relative paths as from the project's folder
    out = tmp_path / "out"
    assert_user_error(in_process(capsys, "build", *args, "--out", str(out)), *words)
    assert not out.exists()


def test_a_bad_thread_count_in_the_environment_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEGATRON_DEPLOY_THREADS", "all")
    assert_user_error(in_process(capsys, "build", "--head", "qa", "--out", str(tmp_path / "out")),
                      "MEGATRON_DEPLOY_THREADS='all'", "whole number")
    assert not (tmp_path / "out").exists()


def test_a_bad_calibration_set_is_refused_before_any_work(tmp_path):
    result = exporter("build", "--head", "qa", "--precision", "int8", "--calibration-data", "/no/such.txt",
                      "--out", str(tmp_path))
    assert_user_error(result, "--calibration-data", "no such file")
    assert "loading" not in result.stdout and "exporting" not in result.stdout


def test_corrupt_checkpoint(tmp_path, capsys):
    save_hf("qa", tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"not a safetensors file")
    out = tmp_path / "out"
    assert_user_error(in_process(capsys, "build", "--head", "qa", "--checkpoint", str(tmp_path / "ckpt"),
                                 "--out", str(out)), "model.safetensors")
    assert not out.exists()


@pytest.mark.parametrize("out", ["/proc/megatron-artifacts", "{tmp}/a-file/artifacts"])
def test_unwritable_output_dir(tmp_path, capsys, out):
    (tmp_path / "a-file").write_text("")
    assert_user_error(in_process(capsys, "build", "--head", "qa", *SMALL, "--out", out.format(tmp=tmp_path)), "--out")
    assert os.listdir(tmp_path) == ["a-file"]


def test_failed_validation_exits_1_and_keeps_the_previous_artifact(tmp_path, capsys):
    assert cli.main(["build", "--head", "nsp", *SMALL, "--out", str(tmp_path)]) == 0
    before = visible(tmp_path)
    strict = tmp_path.parent / "strict.toml"
    strict.write_text("[tolerance.fp32]\nmin_cosine = 1.5  # impossible\n")
    assert cli.main(["build", "--head", "nsp", *SMALL, "--out", str(tmp_path), "--recipe", str(strict)]) == 1
    assert "validation failed" in capsys.readouterr().err
    assert {f: (tmp_path / f).read_bytes() for f in before} == before
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == sorted([*before, "nsp.failed"])
    failed = Manifest.load(tmp_path / "nsp.failed" / "nsp.json")
    assert failed.validation["passed"] is False and failed.validation["tolerance"]["min_cosine"] == 1.5


def test_interrupted_build_leaves_the_previous_artifact(tmp_path, monkeypatch, capsys):
    assert cli.main(["build", "--head", "mlm", *SMALL, "--out", str(tmp_path)]) == 0
    before = visible(tmp_path)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("exporter.pipeline.build.validate", interrupt)
    assert cli.main(["build", "--head", "mlm", "--max-sequence", "8", "--eval-data", "none", "--out", str(tmp_path)]) == 130
    assert visible(tmp_path) == before
    assert not [p for p in os.listdir(tmp_path) if ".building-" in p]  # no staging folder left either
    verify(tmp_path / "mlm.json")


def test_flags_override_the_recipe_and_limits_follow_the_model(tmp_path, capsys):
    save_hf("token-classification", tmp_path / "ckpt")  # 64 positions; the recipe asks for 512
    assert cli.main(["build", "--head", "token-classification", "--checkpoint", str(tmp_path / "ckpt"),
                     "--out", str(tmp_path / "out"), "--max-batch", "3", "--name", "tagger"]) == 0
    assert "lowered" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "out" / "tagger.json").read_text())
    assert manifest["shape_limits"] == {"batch": [1, 3, 3], "sequence": [1, 64, 64]}
    assert manifest["tokenizer"]["max_length"] == 64
    assert manifest["graphs"]["model"]["file"] == "tagger.onnx"
    assert {c["sizes"]["batch"] for c in manifest["validation"]["cases"] if c["case"] != "all"} == {1, 3}


def test_version_and_help_for_every_command_and_argument(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"python -m exporter {version('megatron-deploy')}"
    top = cli.parser()
    commands = next(a for a in top._actions if isinstance(a, cli.argparse._SubParsersAction))
    assert {c.dest for c in commands._choices_actions} == set(commands.choices)
    for choice in commands._choices_actions:
        assert choice.help, f"{choice.dest}: no help in the command list"
    for name, command in commands.choices.items():
        assert command.description, f"{name}: no description"
        for action in command._actions:
            if not isinstance(action, cli.argparse._HelpAction):
                assert action.help, f"{name} {'/'.join(action.option_strings) or action.dest}: no help text"


@pytest.mark.parametrize("args, words", [
    (["build", "--head", "qa", "--checkpoint", "/tmp/nope/my-model"], ["no such checkpoint"]),
    (["build", "--head", "qa", "--eval-data", "/tmp/nope/eval.jsonl"], ["--eval-data", "no such file"]),
    (["bench", "artifacts/nope.json"], ["no such artifact"]),
    (["serve", "artifacts/nope.onnx"], ["no manifest nope.json beside it"]),
])
def test_a_missing_path_is_said_at_once_before_any_heavy_import(args, words):
    """Under 5 s: no torch, no ONNX Runtime session, no export first (the margin is for a loaded machine)."""
    import time

    started = time.monotonic()
    result = exporter(*args)
    assert_user_error(result, *words)
    assert time.monotonic() - started < 5 and result.stdout == ""


def test_every_build_default_that_help_gives_is_the_one_that_applies():
    """Each option is declared once: the defaults --help states are recipes/defaults.toml's values (what a
    recipe that says nothing of them gets) and the option fields' own."""
    import argparse
    import tomllib
    from dataclasses import MISSING, fields

    from exporter.pipeline.options import BuildOptions
    from exporter.pipeline.recipes import load_recipe
    from exporter.tensorrt.engine import EngineOptions

    defaults = tomllib.loads((ROOT / "recipes" / "defaults.toml").read_text())
    commands = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: " ".join(a.help.split()) for a in commands.choices["build"]._actions}
    from_recipes = {"checkpoint": defaults["checkpoint"], "calibration_data": defaults["calibration"]["data"],
                    "calibration_method": defaults["calibration"]["method"],
                    "calibration_samples": defaults["calibration"]["samples"],
                    "max_batch": defaults["shape_limits"]["batch"][2],
                    "max_sequence": defaults["shape_limits"]["sequence"][2]}
    for dest, value in from_recipes.items():
        assert f"(default: the recipe's, {value} in recipes/defaults.toml)" in helps[dest], (dest, helps[dest])
    assert load_recipe("nsp").calibration["method"] == defaults["calibration"]["method"]  # nsp.toml leaves it
    for declared in (BuildOptions, EngineOptions):
        for f in fields(declared):
            flag = f.metadata.get("flag")
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            if flag and not flag.recipe and default not in (None, False, True, [], MISSING) and "(default:" not in flag.help:
                assert f"(default: {default})" in helps[f.name], (f.name, helps[f.name])
    assert cli.parser().parse_args(["build", "--head", "qa"]).calibration_method is None  # the recipe decides
