"""Triton Python-backend model: text in, the runtime helper's answer out (`exporter triton --with-tokenizer`
copies this file as `<NAME>-text/1/model.py`; Triton's Python environment needs the `runtime` package).

A request carries one JSON object in its REQUEST string tensor: the helper's arguments, e.g.
{"question": "...", "context": "..."} for qa, or {"helper": "next_sentence", "a": ..., "b": ...} where a
head has several helpers. RESULT is the helper's result as JSON, as runtime.Session gives it: the same
tokenization, windows, batching and post-processing, with each graph call sent to the artifact's
ONNX/TensorRT model in this server (business logic scripting). An ensemble cannot express windows,
choices or a generation loop, so this model is the text endpoint itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend

from runtime import Session, UserError


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
            raise pb_utils.TritonModelException(response.error().message())
        return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in self.outputs[graph]}


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        directory = Path(args["model_repository"]) / args["model_version"]
        manifest_path = next(p for p in directory.glob("*.json") if not p.name.endswith(".tokenizer.json"))
        manifest = json.loads(manifest_path.read_text())
        name = manifest["name"]
        models = {graph: name if graph == "model" else f"{name}-{graph}" for graph in manifest["graphs"]}
        outputs = {graph: [t["name"] for t in g["outputs"]] for graph, g in manifest["graphs"].items()}
        self.session = Session(manifest_path, backend=TritonModels(models, outputs))

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                raw = pb_utils.get_input_tensor_by_name(request, "REQUEST").as_numpy().reshape(-1)[0]
                arguments = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
                helper = arguments.pop("helper", self.session.head.helpers[0])
                if helper not in self.session.head.helpers:
                    raise UserError(f"{helper} is not a helper of this model; it has {', '.join(self.session.head.helpers)}")
                result = getattr(self.session, helper)(**arguments)
                text = json.dumps(result.tolist() if isinstance(result, np.ndarray) else result)
                out = pb_utils.Tensor("RESULT", np.array([text.encode()], dtype=np.object_))
                responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            except (UserError, TypeError, ValueError, AttributeError) as err:  # a client's mistake: say so
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(err))))
        return responses
