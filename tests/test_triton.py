"""`python -m exporter triton`: every config.pbtxt parses as Triton's ModelConfig and matches the graphs."""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import assert_same_result
from exporter.cli import main
from runtime import Session
from runtime.heads import HEADS as SPECS
from runtime.manifest import Manifest

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
text_format = pytest.importorskip("google.protobuf.text_format")
json_format = pytest.importorskip("google.protobuf.json_format")

TYPES = {onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.FLOAT: "TYPE_FP32"}


def test_repository_matches_the_graphs(built, built_int8, built_int4, tmp_path, capsys):
    artifacts = [built["qa"][0], built["multiple-choice"][0], built["causal-lm"][0], built_int8["nsp"][0],
                 built_int4["token-classification"][0]]
    repository = tmp_path / "models"
    assert main(["triton", *map(str, artifacts), "--out", str(repository)]) == 0
    assert "wrote" in capsys.readouterr().out
    expected_models = {"qa", "multiple-choice", "causal-lm-prefill", "causal-lm-decode", "nsp", "token-classification"}
    assert {p.name for p in repository.iterdir()} == expected_models
    for model in expected_models:
        config = text_format.Parse((repository / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert config.name == model and config.platform == "onnxruntime_onnx"
        graph = onnx.load(str(repository / model / "1" / "model.onnx")).graph
        manifest = Manifest.load(next(a for a in artifacts if model.startswith(Manifest.load(a).name)))
        assert config.max_batch_size == manifest.shape_limits["batch"][2]
        assert (manifest.precision == "int4") == any(n.op_type == "MatMulNBits" for n in graph.node)
        if manifest.precision == "int8":  # its CPU form scales per call: another request's rows would move its answer
            assert not config.HasField("dynamic_batching")
        else:
            assert list(config.dynamic_batching.preferred_batch_size) == [manifest.shape_limits["batch"][1]]
        assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
        for declared, values in ((config.input, graph.input), (config.output, graph.output)):
            assert [t.name for t in declared] == [v.name for v in values]
            for tensor, value in zip(declared, values):
                dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
                assert list(tensor.dims) == dims[1:], tensor.name  # the batch axis is max_batch_size's
                assert model_config_pb2.DataType.Name(tensor.data_type) == TYPES[value.type.tensor_type.elem_type]
    assert "past_key_values" in (repository / "causal-lm-prefill" / "README.md").read_text()
    # two artifacts of one name would share models: refused before anything is written
    assert main(["triton", str(artifacts[0]), str(artifacts[0]), "--out", str(tmp_path / "twice")]) == 2
    assert "also named 'qa'" in capsys.readouterr().err and not (tmp_path / "twice").exists()


class TritonStub(types.ModuleType):
    """`triton_python_backend_utils` at its documented interface; BLS requests run the repository's
    ONNX models with ONNX Runtime, as the server would."""

    def __init__(self, repository):
        super().__init__("triton_python_backend_utils")
        stub = self

        class Tensor:
            def __init__(self, name, array):
                self._name, self._array = name, array

            def name(self):
                return self._name

            def as_numpy(self):
                return self._array

        class TritonError:
            UNKNOWN, INVALID_ARG = 0, 3

            def __init__(self, message, code=UNKNOWN):
                self._message, self.code = message, code

            def message(self):
                return self._message

        class InferenceResponse:
            def __init__(self, output_tensors, error=None):
                self._tensors, self._error = output_tensors, error

            def has_error(self):
                return self._error is not None

            def error(self):
                return self._error

            def output_tensors(self):
                return self._tensors

        class InferenceRequest:
            def __init__(self, model_name, inputs, requested_output_names):
                self.model, self.inputs, self.names = model_name, inputs, requested_output_names

            def exec(self):
                stub.calls.append(self.model)
                session = ort.InferenceSession(str(repository / self.model / "1" / "model.onnx"))
                values = session.run(self.names, {t.name(): t.as_numpy() for t in self.inputs})
                return InferenceResponse([Tensor(n, v) for n, v in zip(self.names, values)])

        self.calls = []
        self.Tensor, self.TritonError, self.InferenceResponse, self.InferenceRequest = (
            Tensor, TritonError, InferenceResponse, InferenceRequest)
        self.TritonModelException = type("TritonModelException", (Exception,), {})
        self.get_input_tensor_by_name = lambda request, name: next(t for t in request.inputs() if t.name() == name)
        self.get_output_tensor_by_name = lambda response, name: next(
            t for t in response.output_tensors() if t.name() == name)


def model_args(repository, model):
    """What Triton's Python backend passes to initialize(): the config as JSON among them."""
    config = text_format.Parse((repository / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    return {"model_repository": str(repository / model), "model_version": "1",
            "model_config": json_format.MessageToJson(config, preserving_proto_field_name=True)}


class ClientRequest:
    def __init__(self, stub, arguments):
        self.tensor = stub.Tensor("REQUEST", np.array([json.dumps(arguments).encode()], dtype=np.object_))

    def inputs(self):
        return [self.tensor]


def test_text_model_answers_as_the_runtime_does(built, tmp_path, monkeypatch):
    heads = ("qa", "pretraining", "causal-lm")
    repository = tmp_path / "models"
    assert main(["triton", *(str(built[h][0]) for h in heads), "--out", str(repository), "--with-tokenizer"]) == 0
    stub = TritonStub(repository)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", stub)
    context = "The bridge over the river was built by engineers from the town in the year 1850. " * 6
    cases = {
        "qa": [{"question": "Who built the bridge?", "context": context, "top_k": 2}],
        "pretraining": [{"helper": "fill_mask", "text": "the river [MASK] through the town"},
                        {"helper": "next_sentence", "a": "The river is long.", "b": "It flows west."}],
        "causal-lm": [{"prompt": "the river", "max_new_tokens": 5}],
    }
    for head, requests in cases.items():
        config = text_format.Parse((repository / f"{head}-text" / "config.pbtxt").read_text(),
                                   model_config_pb2.ModelConfig())
        assert config.backend == "python" and config.input[0].name == "REQUEST"
        spec = importlib.util.spec_from_file_location(f"model_{head}", repository / f"{head}-text" / "1" / "model.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        model = module.TritonPythonModel()
        model.initialize(model_args(repository, f"{head}-text"))
        session = Session(built[head][0])
        responses = model.execute([ClientRequest(stub, r) for r in requests])
        for request, response in zip(requests, responses):
            assert not response.has_error(), response.error().message()
            result = json.loads(stub.get_output_tensor_by_name(response, "RESULT").as_numpy()[0].decode())
            arguments = dict(request)
            helper = arguments.pop("helper", SPECS[head].helpers[0])
            assert_same_result(result, json.loads(json.dumps(getattr(session, helper)(**arguments))))
    assert {"qa", "pretraining", "causal-lm-prefill", "causal-lm-decode"} <= set(stub.calls)
    wrong = model.execute([ClientRequest(stub, {"helper": "answer", "question": "?", "context": "."})])[0]
    assert wrong.has_error() and "not a helper" in wrong.error().message()


class TensorRequest:
    def __init__(self, stub, feed):
        self.tensors = [stub.Tensor(name, value) for name, value in feed.items()]

    def inputs(self):
        return self.tensors


def test_python_backend_form_runs_each_graph_with_the_runtime(built, tmp_path, monkeypatch):
    repository = tmp_path / "models"
    causal = built["causal-lm"][0]
    assert main(["triton", str(causal), "--out", str(repository), "--python-backend", "--no-dynamic-batching"]) == 0
    stub = TritonStub(repository)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", stub)
    monkeypatch.delitem(sys.modules, "runtime.triton_models", raising=False)
    triton_models = importlib.import_module("runtime.triton_models")
    session = Session(causal)
    models = {}
    for graph in ("prefill", "decode"):
        config = text_format.Parse((repository / f"causal-lm-{graph}" / "config.pbtxt").read_text(),
                                   model_config_pb2.ModelConfig())
        assert config.backend == "python" and config.parameters["graph"].string_value == graph
        assert not config.HasField("dynamic_batching")
        assert [t.name for t in config.input] == [t["name"] for t in session.manifest.graphs[graph]["inputs"]]
        version = repository / f"causal-lm-{graph}" / "1"
        # the artifact travels with the repository (hard links where possible), so the shipped form is whole
        assert {p.name for p in version.iterdir()} >= {"model.py", *session.manifest.files}
        assert (version / config.parameters["artifact"].string_value).exists()
        models[graph] = triton_models.GraphModel()
        models[graph].initialize(model_args(repository, f"causal-lm-{graph}"))
        assert set(models[graph].session._backend.sessions) == {graph}  # only its own graph is loaded
    prompts = [np.array([[5, 6, 7]], np.int64), np.array([[8, 9, 10]], np.int64), np.array([[5, 6]], np.int64)]
    feeds = [{"input_ids": p, "attention_mask": np.ones_like(p), "position_ids": np.arange(p.shape[1])[None]}
             for p in prompts]
    bad = {**feeds[0], "input_ids": np.full_like(prompts[0], 10**6)}
    responses = models["prefill"].execute([TensorRequest(stub, f) for f in (feeds[0], bad, feeds[1], feeds[2])])
    assert responses[1].has_error() and "input_ids must lie in" in responses[1].error().message()
    for feed, response in zip(feeds, (responses[0], responses[2], responses[3])):
        assert not response.has_error()
        np.testing.assert_allclose(stub.get_output_tensor_by_name(response, "logits").as_numpy(),
                                   session.run(feed, "prefill")["logits"], rtol=1e-5, atol=1e-6)


def test_gpu_repository_of_an_int8_artifact_ships_the_qdq_graph(built_int8, tmp_path):
    artifact = built_int8["qa"][0]
    assert "tensorrt_file" in Manifest.load(artifact).graphs["model"]
    ops = {}
    for device in ("gpu", "cpu"):
        repository = tmp_path / device
        assert main(["triton", str(artifact), "--out", str(repository), "--device", device]) == 0
        ops[device] = {node.op_type for node in onnx.load(str(repository / "qa" / "1" / "model.onnx")).graph.node}
    assert "QuantizeLinear" in ops["gpu"] and "MatMulInteger" not in ops["gpu"]
    assert "MatMulInteger" in ops["cpu"] and "QuantizeLinear" not in ops["cpu"]
