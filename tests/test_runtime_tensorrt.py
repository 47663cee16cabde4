"""The TensorRT backend: chosen for engines where TensorRT and a GPU exist, a clear error elsewhere.
The real engine test runs only where TensorRT and a CUDA GPU are present."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from runtime import Session, UserError
from runtime.files import sha256_of
from runtime.tensorrt_backend import usable


def with_engine(built, tmp_path, engine_bytes: bytes):
    """A copy of the qa artifact whose manifest lists a qa.plan engine with these bytes."""
    source = built["qa"][0]
    manifest = json.loads(source.read_text())
    for name in manifest["files"]:
        shutil.copy(source.parent / name, tmp_path / name)
    (tmp_path / "qa.plan").write_bytes(engine_bytes)
    manifest["engines"] = {"model": {"file": "qa.plan"}}
    manifest["tensorrt"] = {"version": "10.99.0", "gpu": "NVIDIA Imaginary GPU", "compute_capability": "9.9"}
    manifest["files"]["qa.plan"] = {"bytes": len(engine_bytes), "sha256": sha256_of(tmp_path / "qa.plan")}
    (tmp_path / "qa.json").write_text(json.dumps(manifest))
    return tmp_path / "qa.json"


def test_auto_picks_a_cpu_backend_without_engines(built):
    assert Session(built["qa"][0]).backend.startswith(("onnxruntime/", "openvino/"))
    with pytest.raises(UserError, match="has no TensorRT engines"):
        Session(built["qa"][0], backend="tensorrt")


@pytest.mark.skipif(usable() is None, reason="TensorRT and a GPU are present: the real test below runs")
def test_engines_without_tensorrt_are_a_clear_error_and_onnx_still_serves(built, tmp_path):
    manifest = with_engine(built, tmp_path, b"not really an engine")
    with pytest.raises(UserError, match="cannot run TensorRT engines here: .*use backend='onnxruntime'"):
        Session(tmp_path / "qa.plan")
    session = Session(manifest)  # auto: no TensorRT here, so ONNX Runtime or OpenVINO
    assert session.backend.startswith(("onnxruntime/", "openvino/")) and session.answer("who sat", "the cat sat")["answer"]


@pytest.mark.skipif(usable() is not None, reason=f"needs TensorRT and a CUDA GPU: {usable()}")
def test_engine_session_matches_onnxruntime(built, tmp_path):  # pragma: no cover - runs on GPU hosts
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

    qa = built["qa"][0]
    profile = Profile()
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        profile.add(name, min=(1, 1), opt=(4, 48), max=(4, 48))
    engine = EngineBytesFromNetwork(NetworkFromOnnxPath(str(qa.with_suffix(".onnx"))),
                                    config=CreateConfig(profiles=[profile]))()
    manifest = with_engine(built, tmp_path, engine)
    data = json.loads(manifest.read_text())
    data["tensorrt"]["version"] = trt.__version__
    manifest.write_text(json.dumps(data))
    engine_session, onnx_session = Session(tmp_path / "qa.plan"), Session(qa)
    assert engine_session.backend.startswith("tensorrt/")
    ids = np.full((2, 12), 20, dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    for name, value in onnx_session.run(feed).items():
        np.testing.assert_allclose(engine_session.run(feed)[name], value, atol=1e-3)
    on_engine, on_onnx = (s.answer("who sat", "the cat sat") for s in (engine_session, onnx_session))
    assert (on_engine["start"], on_engine["end"]) == (on_onnx["start"], on_onnx["end"])
