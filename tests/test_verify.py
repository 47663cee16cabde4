"""`python -m exporter verify`: hashes, engines against this machine, a smoke inference; exit 0/1."""

from __future__ import annotations

import json
import shutil

from exporter.cli import main
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


def test_engine_from_another_tensorrt_fails(built, tmp_path, capsys):
    manifest = copy_artifact(built, "qa", tmp_path)
    (tmp_path / "qa.plan").write_bytes(b"an engine")
    edited = json.loads(manifest.read_text())
    edited["engines"] = {"model": {"file": "qa.plan"}}
    edited["tensorrt"].update(version="9.0.0", gpu="NVIDIA A10", compute_capability="8.6")
    manifest.write_text(json.dumps(edited))
    recorded = Manifest.load(manifest)  # with the engine's hash, as a build elsewhere would have it
    recorded.record_files(tmp_path, [*recorded.files, "qa.plan"])
    recorded.save(manifest)
    assert main(["verify", str(manifest)]) == 1
    out = capsys.readouterr().out
    assert "TensorRT 9.0.0 on NVIDIA A10" in out and ("rebuild" in out or "install TensorRT 9.0.0" in out)


def test_no_artifacts_is_a_usage_error(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == 2
    assert "no artifact manifests" in capsys.readouterr().err
