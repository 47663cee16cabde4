"""`python -m exporter triton`: every config.pbtxt parses as Triton's ModelConfig and matches the graphs."""

from __future__ import annotations

import onnx
import pytest

from exporter.cli import main
from runtime.manifest import Manifest

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
text_format = pytest.importorskip("google.protobuf.text_format")

TYPES = {onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.FLOAT: "TYPE_FP32"}


def test_repository_matches_the_graphs(built, built_int8, tmp_path, capsys):
    artifacts = [built["qa"][0], built["multiple-choice"][0], built["causal-lm"][0], built_int8["nsp"][0]]
    repository = tmp_path / "models"
    assert main(["triton", *map(str, artifacts), "--out", str(repository)]) == 0
    assert "wrote" in capsys.readouterr().out
    expected_models = {"qa", "multiple-choice", "causal-lm-prefill", "causal-lm-decode", "nsp"}
    assert {p.name for p in repository.iterdir()} == expected_models
    for model in expected_models:
        config = text_format.Parse((repository / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert config.name == model and config.platform == "onnxruntime_onnx"
        graph = onnx.load(str(repository / model / "1" / "model.onnx")).graph
        manifest = Manifest.load(next(a for a in artifacts if model.startswith(Manifest.load(a).name)))
        assert config.max_batch_size == manifest.shape_limits["batch"][2]
        assert list(config.dynamic_batching.preferred_batch_size) == [manifest.shape_limits["batch"][1]]
        assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
        for declared, values in ((config.input, graph.input), (config.output, graph.output)):
            assert [t.name for t in declared] == [v.name for v in values]
            for tensor, value in zip(declared, values):
                dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
                assert list(tensor.dims) == dims[1:], tensor.name  # the batch axis is max_batch_size's
                assert model_config_pb2.DataType.Name(tensor.data_type) == TYPES[value.type.tensor_type.elem_type]
    assert "past_key_values" in (repository / "causal-lm-prefill" / "README.md").read_text()
