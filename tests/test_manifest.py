"""The manifest: everything the runtime needs to know about an artifact, and nothing it must guess."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import onnx
import pytest
import torch

from exporter.pipeline.build import BuildOptions, build
from runtime.errors import UserError
from runtime.files import sha256_of
from runtime.pinned import verify
from runtime.manifest import FORMAT_VERSION, Manifest


def test_manifest_records_the_artifact(built):
    path, hf = built["sequence-classification"]
    manifest = Manifest.load(path)
    assert (manifest.format, manifest.name, manifest.head, manifest.precision) == (
        FORMAT_VERSION, "sequence-classification", "sequence-classification", "fp32")
    assert manifest.config["hidden_size"] == 32 and manifest.config["id2label"] == {"0": "LABEL_0", "1": "LABEL_1"}
    graph = manifest.graphs["model"]
    assert graph["inputs"][0] == {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}
    assert graph["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", 2]}]
    assert manifest.shape_limits == {"batch": [1, 4, 4], "sequence": [1, 48, 48]}
    assert manifest.tokenizer["file"] == "sequence-classification.tokenizer.json"
    assert manifest.tokenizer["padding_side"] == "right" and manifest.tokenizer["max_length"] == 48
    assert manifest.tokenizer["special_tokens"]["cls"] == {"token": "[CLS]", "id": 2}
    assert manifest.validation["passed"] and manifest.validation["tolerance"]["max_abs"] == 1e-4
    assert {c["case"] for c in manifest.validation["cases"]} == {"min", "opt", "max", "odd", "all"}
    assert set(manifest.versions) >= {"torch", "onnx", "onnxruntime", "exporter"}
    assert manifest.source["kind"] == "huggingface"
    assert manifest.source["sha256"] == sha256_of(Path(manifest.source["checkpoint"]) / "model.safetensors")
    for name, recorded in manifest.files.items():
        assert recorded == {"bytes": (path.parent / name).stat().st_size, "sha256": sha256_of(path.parent / name)}
    verify(path)


def test_causal_lm_manifest_spells_out_the_cache(built):
    manifest = Manifest.load(built["causal-lm"][0])
    decode = manifest.graphs["decode"]
    names = [t["name"] for t in decode["inputs"]]
    assert names == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key",
                     "past_key_values.0.value", "past_key_values.1.key", "past_key_values.1.value"]
    assert decode["inputs"][1]["shape"] == ["batch", "total_sequence"]
    assert decode["outputs"][1] == {"name": "present.0.key", "dtype": "float32",
                                    "shape": ["batch", 4, "total_sequence", 8]}
    assert manifest.tokenizer["padding_side"] == "left"
    assert manifest.shape_limits["past_sequence"][2] == 16


def test_tampered_file_and_newer_format_are_refused(built, tmp_path):
    path = built["qa"][0]
    manifest = Manifest.load(path)
    for name in [path.name, *manifest.files]:
        (tmp_path / name).write_bytes((path.parent / name).read_bytes())
    verify(tmp_path / "qa.json")
    (tmp_path / "qa.onnx").write_bytes((tmp_path / "qa.onnx").read_bytes()[:-1] + b"\0")
    with pytest.raises(UserError, match="sha256 mismatch"):
        verify(tmp_path / "qa.json")

    newer = json.loads(path.read_text())
    newer["format"] = FORMAT_VERSION + 1
    (tmp_path / "qa.json").write_text(json.dumps(newer))
    with pytest.raises(UserError, match="newer than this runtime reads"):
        Manifest.load(tmp_path / "qa.json")
    (tmp_path / "qa.json").write_text("{not json")
    with pytest.raises(UserError, match="not a readable manifest"):
        Manifest.load(tmp_path / "qa.json")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_large_models_use_external_data(tmp_path, monkeypatch, precision):
    """Past 256 MiB the weights go to NAME.onnx.data; shrink the threshold to prove it on a small model."""
    monkeypatch.setattr("exporter.export.to_onnx.EXTERNAL_DATA_OVER", 0)
    path = build(BuildOptions(head="base", precision=precision, out=tmp_path, max_batch=2, max_sequence=16,
                              eval_data="none"),
                 log=lambda message: None)
    manifest = Manifest.load(path)
    assert set(manifest.files) == {"base.onnx", "base.onnx.data", "base.tokenizer.json"}
    assert manifest.validation["passed"]
    graph = onnx.load(str(tmp_path / "base.onnx"), load_external_data=False)
    large = [t for t in graph.graph.initializer if len(t.dims) == 2 and t.dims[0] * t.dims[1] >= 4096]
    assert large and all(t.data_location == onnx.TensorProto.EXTERNAL for t in large)
    # onnx refuses external data behind a symlink: load from the published version's own folder.
    weights = onnx.load(str((tmp_path / "base.onnx").resolve())).graph.initializer
    assert {t.data_type for t in weights if len(t.dims) == 2} == {
        onnx.TensorProto.FLOAT16 if precision == "fp16" else onnx.TensorProto.FLOAT}
    assert torch.__version__  # the build ran with the exporter's torch, not a stub


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_every_published_file_has_the_mode_the_umask_gives(tmp_path, monkeypatch, precision):
    """Whichever library wrote a file (ONNX Runtime's quantizer writes its external data private), a
    server running as another user can read the artifact. External data forced on; umask 027 -> 0640."""
    monkeypatch.setattr("exporter.export.to_onnx.EXTERNAL_DATA_OVER", 0)
    old = os.umask(0o027)
    try:
        path = build(BuildOptions(head="base", precision=precision, checkpoint="demo-random", out=tmp_path,
                                  max_batch=2, max_sequence=16, eval_data="none"), log=lambda message: None)
    finally:
        os.umask(old)
    files = [path.name, *Manifest.load(path).files]
    assert "base.onnx.data" in files and (precision != "int8" or "base.qdq.onnx.data" in files)
    assert {name: oct(stat.S_IMODE((tmp_path / name).stat().st_mode)) for name in files} == {
        name: oct(0o640) for name in files}
