"""The manifest is checked like the root of trust it is; the runtime refuses values the graph would
misread; names cannot clash; `verify` checks every artifact of a folder and needs only the runtime."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from exporter.cli import main
from runtime import Session, UserError
from test_runtime_session import copy_artifact, qa_inputs, refused_and_still_usable

ROOT = Path(__file__).resolve().parent.parent


def edited(built, tmp_path, change, head="qa") -> Path:
    """A copy of the `head` artifact whose manifest `change` edited by hand."""
    path = copy_artifact(built[head][0], tmp_path / "edited")
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("change, field", [
    (lambda m: m.update(graphs=None), "manifest field graphs: must be dict"),
    (lambda m: m["graphs"]["model"].update(file="../../outside.onnx"), "graphs.model.file: '../../outside.onnx' is not"),
    (lambda m: m["graphs"]["model"].update(file="/etc/passwd"), "graphs.model.file"),
    (lambda m: m["tokenizer"].update(file="../../../../etc/passwd"), "tokenizer.file"),
    (lambda m: m.update(files={}), "graphs.model.file: qa.onnx is not listed in files"),
    (lambda m: m.update(head="nsp"), "graphs.model.outputs: differ from what the nsp head declares"),
    (lambda m: m.update(head="summarize"), "unknown head 'summarize'"),
    (lambda m: m["shape_limits"].update(sequence=[8, 128, 4096]), "beyond the model's max_position_embeddings"),
    (lambda m: m["shape_limits"].update(batch=[4, 2, 16]), "shape_limits.batch: must be ordered"),
    (lambda m: m["shape_limits"].update(batch=["1", 2, 16]), "shape_limits.batch: must be int"),
    (lambda m: m["config"].update(vocab_size=-1), "config.vocab_size: must be at least 1"),
    (lambda m: m["files"]["qa.onnx"].update(sha256="x"), "sha256: must be 64"),
    (lambda m: m.pop("validation"), "validation: must be dict"),
    (lambda m: m.update(extra=1), "manifest field extra: is not a field of this manifest format"),
    (lambda m: m["graphs"]["model"].update(extra=1), "graphs.model.extra: is not a field"),
    (lambda m: m["files"]["qa.onnx"].update(extra=1), "files['qa.onnx'].extra: is not a field"),
    (lambda m: m.update(format=True), "not an artifact manifest (no format version)"),
    (lambda m: m.update(format=0), "manifest field format: 0 is not a format version"),
    (lambda m: m.update(format=-7), "manifest field format: -7 is not a format version"),
    (lambda m: m.update(name="other"), "manifest field name: 'other' is not this file's name ('qa')"),
])
def test_a_hand_edited_manifest_is_refused_naming_the_field(built, tmp_path, capsys, change, field):
    path = edited(built, tmp_path, change)
    with pytest.raises(UserError) as err:
        Session(path)
    assert field in str(err.value) and "\n" not in str(err.value)
    assert main(["verify", str(path)]) == 1
    assert field in capsys.readouterr().out


def test_a_symlink_out_of_the_folder_is_refused(built, tmp_path):
    path = copy_artifact(built["qa"][0], tmp_path / "qa")
    outside = tmp_path / "outside.onnx"
    (path.parent / "qa.onnx").rename(outside)
    (path.parent / "qa.onnx").symlink_to(outside)
    with pytest.raises(UserError, match="symlink leading out of the artifact's folder"):
        Session(path)


@pytest.mark.parametrize("name, value, message", [
    ("input_ids", -1, "input_ids must lie in [0, 128)"),
    ("input_ids", 128, "input_ids must lie in [0, 128)"),
    ("token_type_ids", -1, "token_type_ids must lie in [0, 2)"),
    ("token_type_ids", 2, "token_type_ids must lie in [0, 2)"),
    ("attention_mask", 7, "attention_mask must hold only 0 and 1"),
])
def test_ids_out_of_range_are_refused_before_the_backend(built, name, value, message):
    feed = qa_inputs()
    feed[name][0, 3] = value
    refused_and_still_usable(Session(built["qa"][0]), feed, message)


def test_position_ids_beyond_the_model_are_refused(built):
    session = Session(built["causal-lm"][0])
    ids = np.full((1, 4), 20, dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.array([[0, 1, 2, 64]])}
    with pytest.raises(UserError, match=r"position_ids must lie in \[0, 64\)"):
        session.run(feed, "prefill")


@pytest.mark.parametrize("head, call, message", [
    ("qa", lambda s: s.run(None), "inputs must be a dict of input names to numpy arrays, got NoneType"),
    ("qa", lambda s: s.answer("who", "the cat", handle_impossible_answer="yes"),
     "handle_impossible_answer must be true or false, got 'yes'"),
    ("qa", lambda s: s.answer("who " * 60, "the cat"), "the question is 180 tokens, too long for this artifact's "
     "window of 48 tokens"),  # the tiny vocabulary spells "who" in 3 tokens
    ("qa", lambda s: s.answer("who " * 10, "the cat", doc_stride=20), "which leaves 15 tokens of context per window, "
     "no more than doc_stride 20; pass a doc_stride below 15"),
    ("qa", lambda s: s.answer("who", "the cat " * 125_000), "a text of 1000000 characters is longer than this "
     "session takes (100000"),
    ("causal-lm", lambda s: s.generate("hello \ud800"), "not valid Unicode (surrogates not allowed at character 6)"),
    ("causal-lm", lambda s: list(s.generate_stream("hello \ud800")), "not valid Unicode"),
    ("causal-lm", lambda s: s.generate("the", do_sample=True, seed=-1), "seed must be an integer of at least 0"),
    ("causal-lm", lambda s: s.generate("the", do_sample=True, seed="x"), "seed must be an integer of at least 0"),
    ("causal-lm", lambda s: s.generate("the", do_sample="no"), "do_sample must be true or false, got 'no'"),
    ("qa", lambda s: s.answer(None, "context"), "expected a text or a list of texts, got NoneType"),
    ("qa", lambda s: s.answer("who", None), "expected a text or a list of texts, got NoneType"),
    ("qa", lambda s: s.answer(["who", 3], ["a", "b"]), "holding other things"),
    ("qa", lambda s: s.answer("who", "the cat", top_k=0), "top_k must be an integer of at least 1"),
    ("qa", lambda s: s.answer("who", "the cat", max_answer_len=0), "max_answer_len must be an integer of at least 1"),
    ("qa", lambda s: s.answer("who", "the cat", doc_stride=-1), "doc_stride must be an integer of at least 0"),
    ("causal-lm", lambda s: s.generate(None), "expected a text or a list of texts"),
    ("causal-lm", lambda s: s.generate("the", max_new_tokens=0), "max_new_tokens must be an integer of at least 1"),
    ("causal-lm", lambda s: s.generate("the", do_sample=True, temperature=math.nan), "temperature must be a finite"),
    ("causal-lm", lambda s: s.generate("the", do_sample=True, temperature=math.inf), "temperature must be a finite"),
    ("causal-lm", lambda s: s.generate("the", top_p=math.nan), "top_p must be a finite"),
    ("causal-lm", lambda s: s.generate("the", top_k=-1), "top_k must be an integer of at least 0"),
    ("causal-lm", lambda s: s.generate("the", stop="."), "stop must be a list of strings"),
    ("mlm", lambda s: s.fill_mask("a [MASK]", top_k=0), "top_k must be an integer of at least 1"),
    ("sequence-classification", lambda s: s.classify("fine", top_k=-2), "top_k must be an integer of at least 1"),
])
def test_helper_arguments_are_typed_and_ranged(built, head, call, message):
    with pytest.raises(UserError) as err:
        call(Session(built[head][0]))
    assert message in str(err.value)


@pytest.mark.parametrize("name", ["qa.tokenizer", "index", "x.tokenizer", "qa.qdq"])
def test_a_name_that_would_clash_or_is_reserved_is_refused(built, tmp_path, capsys, name):
    copy_artifact(built["qa"][0], tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    code = main(["build", "--head", "nsp", "--name", name, "--out", str(tmp_path / "out"), "--eval-data", "none"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert name in err and ("clash" in err or "reserved" in err)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_verify_checks_every_artifact_of_a_folder_with_the_runtime_alone(built, tmp_path):
    """Broken manifests beside good artifacts: each is named, the rest still checked; torch, onnx and
    the exporter's other libraries unavailable, as on a serving install (`pip install .`)."""
    folder = tmp_path / "folder"
    folder.mkdir()
    for head in ("qa", "nsp", "mlm"):
        for file in copy_artifact(built[head][0], tmp_path / head).parent.iterdir():
            file.rename(folder / file.name)
    for name, change in (("nsp.json", lambda m: m.update(graphs=None)), ("mlm.json", lambda m: m.update(head=7))):
        data = json.loads((folder / name).read_text())
        change(data)
        (folder / name).write_text(json.dumps(data))
    blocked = "import sys\nfor m in ('torch', 'onnx', 'onnxscript', 'onnx_ir', 'safetensors', 'polygraphy'):\n" \
              "    sys.modules[m] = None\nfrom exporter.cli import main\nsys.exit(main(['verify', sys.argv[1]]))"
    result = subprocess.run([sys.executable, "-c", blocked, str(folder)], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert f"ok   {folder / 'qa.json'}" in lines
    assert f"FAIL {folder / 'nsp.json'}" in lines and f"FAIL {folder / 'mlm.json'}" in lines
    assert "manifest field graphs" in result.stdout and "manifest field head" in result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("after", [0.2, 1.5])
def test_ctrl_c_during_start_up_or_work_exits_130_without_a_traceback(tmp_path, after):
    """At 0.2 s the CLI is still importing torch; at 1.5 s it is at work."""
    import signal
    import time

    process = subprocess.Popen([sys.executable, "-m", "exporter", "build", "--head", "qa", "--out", str(tmp_path),
                                "--eval-data", "none"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    time.sleep(after)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines() == ["interrupted; nothing was written"]


def test_names_that_extend_another_artifacts_are_refused_both_ways(built, tmp_path):
    """`qa.v2` beside `qa` would own `qa.v2.onnx`, which `qa`'s name covers, and block `qa`'s next build."""
    from exporter.pipeline.build import check_name_is_free

    out = copy_artifact(built["qa"][0], tmp_path / "out").parent
    for name in ("qa.v2", "qa.prefill", "qa.sig"):
        with pytest.raises(UserError, match="clash|reserved"):
            check_name_is_free(out, name)
    (out / "qa.json").rename(out / "qa.v2.json")
    data = json.loads((out / "qa.v2.json").read_text())
    (out / "qa.v2.json").write_text(json.dumps({**data, "name": "qa.v2"}))
    with pytest.raises(UserError, match="clash with the artifact 'qa.v2'"):
        check_name_is_free(out, "qa")
    check_name_is_free(out, "qb")


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_a_deeply_nested_manifest_is_one_line_everywhere(built, tmp_path, capsys):
    from exporter.pipeline.build import check_name_is_free

    path = copy_artifact(built["qa"][0], tmp_path / "out")
    copy_artifact(built["nsp"][0], tmp_path / "nsp")
    for file in (tmp_path / "nsp").iterdir():
        file.rename(path.parent / file.name)
    path.write_text(nested(100_000))
    with pytest.raises(UserError, match="nested too deeply"):
        Session(path)
    assert main(["verify", str(path.parent)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL {path}" in out and "nested too deeply" in out and f"ok   {path.parent / 'nsp.json'}" in out
    check_name_is_free(path.parent, "other")  # a build into that folder is not stopped by it


@pytest.mark.parametrize("victim", ["qa.json", "qa.onnx"])
def test_a_named_pipe_in_place_of_a_file_is_refused_at_once(built, tmp_path, capsys, victim):
    import os
    import threading

    path = copy_artifact(built["qa"][0], tmp_path / "out")
    (path.parent / victim).unlink()
    os.mkfifo(path.parent / victim)
    outcome = {}

    def open_and_verify():
        try:
            Session(path)
        except UserError as err:
            outcome["session"] = str(err)
        outcome["verify"] = main(["verify", str(path)])

    worker = threading.Thread(target=open_and_verify, daemon=True)
    worker.start()
    worker.join(5)
    assert not worker.is_alive(), "blocked on the named pipe"
    assert "a named pipe, not a regular file" in outcome["session"] and outcome["verify"] == 1


def test_an_artifact_link_leading_out_of_the_folder_is_refused(built, tmp_path, capsys):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(built["qa"][0].parent, out, symlinks=True)
    current = out / ".qa.artifact"
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(out / os.readlink(current), elsewhere)
    current.unlink()
    current.symlink_to(elsewhere)
    with pytest.raises(UserError, match="a symlink leading out of its folder"):
        Session(out / "qa.json")
    assert main(["verify", str(out / "qa.json")]) == 1
    assert "a symlink leading out of its folder" in capsys.readouterr().out


def test_a_graph_with_smaller_tables_than_its_manifest_states_fails_verify_not_production(built, tmp_path, capsys):
    """A vocabulary-128 graph under a manifest that says 256 (hashes all consistent): verify's smoke input
    reads every table's last row, and the runtime says what is wrong in one line."""
    path = edited(built, tmp_path, lambda m: m["config"].update(vocab_size=256))
    assert main(["verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert "graph failed on inputs its manifest allows" in out and "Traceback" not in out
    feed = qa_inputs()
    feed["input_ids"][0, 1] = 200
    with pytest.raises(UserError, match="graph failed on inputs its manifest allows") as err:
        Session(path, backend="onnxruntime").run(feed)
    assert "\n" not in str(err.value)


def test_a_graph_its_backend_cannot_load_is_one_line(built, tmp_path):
    """Garbage where the graph should be, its hash recorded as if built so: refused in one line."""
    import hashlib

    def garbage(manifest):
        manifest["files"]["qa.onnx"] = {"bytes": 4096, "sha256": hashlib.sha256(b"\x07" * 4096).hexdigest()}

    path = edited(built, tmp_path, garbage)
    (path.parent / "qa.onnx").write_bytes(b"\x07" * 4096)
    with pytest.raises(UserError, match="graphs cannot be opened here") as err:
        Session(path, backend="onnxruntime")
    assert "\n" not in str(err.value)
