"""Triton Python-backend models over an artifact (`python -m exporter triton` writes a `model.py` that
imports one of these; Triton's Python environment needs the `runtime` package).

Each model's config names its artifact in the parameter `artifact` (a manifest path, relative to the
model's version folder or absolute).

- `GraphModel` runs one graph of the artifact in this process with runtime.Session (ONNX Runtime),
  for servers without Triton's ONNX Runtime backend. Requests that Triton's dynamic batcher hands over
  together run as one call per shape; each is checked as Session.run checks it, and a bad one gets the
  runtime's message as its error while the others are answered.
- `TextModel` is the text endpoint: its REQUEST string is one JSON object, the helper's arguments, e.g.
  {"question": "...", "context": "..."} for qa, or {"helper": "next_sentence", "a": ..., "b": ...} where
  a head has several helpers. RESULT is the helper's result as JSON, as runtime.Session gives it: the
  same tokenization, windows, batching and post-processing, with each graph call sent to the artifact's
  model in this server (business logic scripting). An ensemble cannot express windows, choices or a
  generation loop, so this model is the text endpoint itself.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend

from .errors import UserError
from .manifest import Manifest
from .pinned import find_manifest, verify
from .session import Session


def artifact_path(args: dict[str, str]) -> Path:
    """The manifest named by the model config's `artifact` parameter."""
    named = Path(parameter(args, "artifact") or "")
    return named if named.is_absolute() else Path(args["model_repository"]) / args["model_version"] / named


def parameter(args: dict[str, str], key: str) -> str | None:
    """A string parameter of the model's config (None where it has none)."""
    entry = json.loads(args["model_config"]).get("parameters", {}).get(key)
    return None if entry is None else entry["string_value"]


def error_response(err: Exception) -> Any:
    """The runtime's refusal as the client's error (HTTP 400, gRPC INVALID_ARGUMENT); anything else as an
    internal error whose details stay in the server's log, never with the client."""
    if isinstance(err, UserError):
        error = pb_utils.TritonError(str(err), pb_utils.TritonError.INVALID_ARG)
    else:
        print(f"megatron-deploy: request failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        error = pb_utils.TritonError(f"internal error ({type(err).__name__}); the server's log has the details")
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


class GraphModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.graph = config["parameters"]["graph"]["string_value"]
        self.batched = config["max_batch_size"] > 0
        self.session = Session(artifact_path(args), backend="onnxruntime", graphs=[self.graph],
                               public_key=parameter(args, "public_key"))
        declared = self.session.manifest.graphs[self.graph]
        self.inputs = [t["name"] for t in declared["inputs"]]
        self.outputs = [t["name"] for t in declared["outputs"]]

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        groups: dict[Any, list[tuple[int, dict[str, np.ndarray]]]] = defaultdict(list)
        for i, request in enumerate(requests):
            try:
                feed = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs}
                self.session.check_inputs(feed, self.graph)
            except Exception as err:  # a client's mistake (UserError) or worse: this request's answer only
                responses[i] = error_response(err)
                continue
            shapes = tuple(feed[name].shape[1:] for name in self.inputs) if self.batched else i
            groups[shapes].append((i, feed))
        for members in groups.values():
            feed = {name: np.concatenate([f[name] for _, f in members]) for name in self.inputs}
            try:
                outputs = self.session.run(feed, self.graph)
            except Exception as err:  # together beyond a limit (Triton keeps batches within max_batch_size)
                for i, _ in members:
                    responses[i] = error_response(err)
                continue
            start = 0
            for i, member in members:
                end = start + (len(member[self.inputs[0]]) if self.batched else 0)
                responses[i] = pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor(name, outputs[name][start:end] if self.batched else outputs[name])
                    for name in self.outputs])
                start = end
        return responses


class TritonModels:
    """A runtime backend whose graphs are models of this Triton server."""

    name = "triton"

    def __init__(self, models: dict[str, str], outputs: dict[str, list[str]]):
        self.models, self.outputs = models, outputs

    def run(self, graph: str, feed: dict[str, Any], keep: frozenset[str] = frozenset()) -> dict[str, Any]:
        request = pb_utils.InferenceRequest(model_name=self.models[graph],
                                            inputs=[pb_utils.Tensor(k, np.ascontiguousarray(v)) for k, v in feed.items()],
                                            requested_output_names=self.outputs[graph])
        response = request.exec()
        if response.has_error():
            raise UserError(response.error().message())  # the graph model's message (a runtime check's)
        return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in self.outputs[graph]}


def client_mistake(err: Exception) -> Exception:
    """A request's JSON that the helper cannot take (an unknown argument, a value of the wrong kind, JSON
    nested too deeply) is the client's mistake, said in one line."""
    if isinstance(err, (TypeError, ValueError, AttributeError, RecursionError)):
        return UserError(f"bad REQUEST: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
    return err


class TextModel:
    def initialize(self, args: dict[str, str]) -> None:
        path = find_manifest(artifact_path(args))
        manifest = Manifest.load(path)
        # The graphs run elsewhere; still, where the artifact's files sit beside the manifest (as when
        # served in place), a tampered one leaves this model unavailable too.
        verify(path, [name for name in manifest.files if (path.parent / name).exists()])
        models = {graph: manifest.model_name(graph) for graph in manifest.graphs}
        outputs = {graph: [t["name"] for t in g["outputs"]] for graph, g in manifest.graphs.items()}
        self.session = Session(path, backend=TritonModels(models, outputs), public_key=parameter(args, "public_key"))

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                raw = pb_utils.get_input_tensor_by_name(request, "REQUEST").as_numpy().reshape(-1)[0]
                arguments = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
                if not isinstance(arguments, dict):
                    raise UserError("REQUEST must be one JSON object: the helper's arguments")
                helper = arguments.pop("helper", self.session.head.helpers[0])
                if helper not in self.session.head.helpers:
                    raise UserError(f"{helper} is not a helper of this model; it has {', '.join(self.session.head.helpers)}")
                result = getattr(self.session, helper)(**arguments)
                text = json.dumps(result.tolist() if isinstance(result, np.ndarray) else result)
                out = pb_utils.Tensor("RESULT", np.array([text.encode()], dtype=np.object_))
                responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            except Exception as err:  # one request's failure is its answer alone
                responses.append(error_response(client_mistake(err)))
        return responses
