"""`python -m exporter verify`: hashes, engines against this machine, a smoke inference; exit 0/1."""

from __future__ import annotations

import json
import shutil

from exporter.cli import main
from runtime.files import sha256_of
from runtime.manifest import Manifest


def copy_artifact(built, head, directory):
    manifest = built[head][0]
    for name in [manifest.name, *Manifest.load(manifest).files]:
        shutil.copy(manifest.parent / name, directory / name)
    return directory / manifest.name


def test_good_artifacts_pass(built, tmp_path, capsys):
    for head in ("qa", "causal-lm", "multiple-choice"):
        copy_artifact(built, head, tmp_path)
    assert main(["verify", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("ok   ") == 3 and "FAIL" not in out


def test_tampered_file_fails(built, tmp_path, capsys):
    manifest = copy_artifact(built, "qa", tmp_path)
    graph = tmp_path / "qa.onnx"
    graph.write_bytes(graph.read_bytes()[:-1] + b"\0")
    assert main(["verify", str(manifest)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "qa.onnx" in out and "sha256" in out.lower()


def test_a_file_only_its_owner_can_read_is_named(built, tmp_path, capsys):
    manifest = copy_artifact(built, "qa", tmp_path)
    for path in tmp_path.iterdir():
        path.chmod(0o644)
    assert main(["verify", str(manifest)]) == 0 and "warning" not in capsys.readouterr().out
    (tmp_path / "qa.onnx").chmod(0o600)
    assert main(["verify", str(manifest)]) == 0  # it runs here, for its owner: a warning, not a failure
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "qa.onnx " in warnings[0] and "0600" in warnings[0]
    assert f"chmod a+r {tmp_path / 'qa.onnx'}" in warnings[0]
    for path in tmp_path.iterdir():  # private throughout: a choice, not a slip
        path.chmod(0o600)
    assert main(["verify", str(manifest)]) == 0 and "warning" not in capsys.readouterr().out


def test_engine_from_another_tensorrt_fails(built, tmp_path, capsys):
    manifest = copy_artifact(built, "qa", tmp_path)
    (tmp_path / "qa.plan").write_bytes(b"an engine")
    edited = json.loads(manifest.read_text())
    edited["engines"] = {"model": {"file": "qa.plan"}}
    edited["tensorrt"].update(version="9.0.0", gpu="NVIDIA A10", compute_capability="8.6")
    # with the engine's hash, as a build elsewhere would have it
    edited["files"]["qa.plan"] = {"bytes": 9, "sha256": sha256_of(tmp_path / "qa.plan")}
    manifest.write_text(json.dumps(edited))
    assert main(["verify", str(manifest)]) == 1
    out = capsys.readouterr().out
    assert "TensorRT 9.0.0 on NVIDIA A10" in out and ("rebuild" in out or "install TensorRT 9.0.0" in out)


def test_no_artifacts_is_a_usage_error(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == 2
    assert "no artifact manifests" in capsys.readouterr().err
