"""`python -m exporter triton ARTIFACT... --out model_repository/`: artifacts as a Triton model repository.

One model per graph, in one of two forms:
- native (default): `<model>/1/model.plan` (platform tensorrt_plan, where the artifact has engines) or
  `<model>/1/model.onnx` with its external data beside it under the name the graph refers to
  (onnxruntime_onnx), for servers with those backends;
- `--python-backend`: a Python-backend model that runs the graph in process with runtime.Session
  (runtime.triton_models.GraphModel), for servers with only the Python backend (such as the one in
  nvidia-pytriton, which `exporter serve` starts).
Inputs and outputs come from the manifest, the batch axis becoming `max_batch_size` (the recipe's max)
with dynamic batching; other dynamic axes are -1. A causal LM becomes two models, NAME-prefill and
NAME-decode, with a README on driving them. `--with-tokenizer` adds NAME-text, a Python-backend model
taking text (runtime.triton_models.TextModel).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import UserError
from runtime.manifest import Manifest
from runtime.pinned import find_manifest, verify

DATA_TYPES = {"int64": "TYPE_INT64", "int32": "TYPE_INT32", "float32": "TYPE_FP32", "float16": "TYPE_FP16"}
QUEUE_DELAY_US = 100
TEXT_INSTANCES = 4  # text requests mostly wait on their graph calls: let several be in flight

CAUSAL_README = """# {name}: a causal LM as two models

Triton runs one graph per request, so generation is a client loop (runtime.Session.generate does the
same against the graphs directly):

1. `{name}-prefill` with the prompt: `input_ids`, `attention_mask` (1 per token) and `position_ids`
   (0..n-1). It returns `logits` for the last position and `present.{{i}}.key|value`, the KV cache.
2. Pick the next token from `logits` (argmax for greedy).
3. `{name}-decode` with that token as `input_ids` [batch, 1], `attention_mask` grown by one (covering
   cache + new token), `position_ids` = number of tokens so far - 1, and the previous step's
   `present.*` sent as `past_key_values.*`. Repeat from 2 until [SEP] or enough tokens.

With left-padded batches, position ids count only real tokens. Keep the cache on the server side with
Triton's sequence batching or pass it back as shown; limits are in {name}.json (past_sequence).
"""

LAUNCHER = '''"""Written by `python -m exporter triton`: the model is runtime.triton_models.{model}."""
import site

for directory in {site_dirs!r}:  # where this server's Python finds the runtime package
    site.addsitedir(directory)

from runtime.triton_models import {model} as TritonPythonModel  # noqa: E402,F401
'''


@dataclass
class RepositoryOptions:
    device: str = "auto"  # instance kind: auto (GPU for engines, else CPU), gpu or cpu
    with_tokenizer: bool = False  # add NAME-text
    python_backend: bool = False  # graphs run by runtime.Session on Triton's Python backend
    queue_delay_us: int | None = QUEUE_DELAY_US  # dynamic batching's wait; None: no dynamic batching
    in_place: bool = False  # Python-backend models read the artifact where it is (exporter serve), not a copy
    site_dirs: tuple[str, ...] = ()  # added to the Python backend's path (exporter serve: its own Python's)
    public_key: Path | None = None  # Python-backend models open only artifacts signed by its private key


def tensor_config(tensor: dict, batched: bool) -> str:
    dtype = DATA_TYPES.get(tensor["dtype"])
    if dtype is None:
        raise UserError(f"tensor {tensor['name']}: dtype {tensor['dtype']} has no Triton type here")
    dims = [d if isinstance(d, int) else -1 for d in tensor["shape"][1 if batched else 0:]]
    return f'  {{ name: "{tensor["name"]}" data_type: {dtype} dims: [ {", ".join(map(str, dims))} ] }}'


def parameters(values: dict[str, str]) -> list[str]:
    return [f'parameters {{ key: "{k}" value: {{ string_value: {json.dumps(v, ensure_ascii=False)} }} }}' for k, v in values.items()]


def model_parameters(artifact: str, options: RepositoryOptions, **more: str) -> str:
    """A Python-backend model's parameters: its artifact, the public key it requires, and `more`."""
    key = {"public_key": str(options.public_key.resolve())} if options.public_key is not None else {}
    return "\n".join(parameters({**more, "artifact": artifact, **key})) + "\n"


def model_config(name: str, manifest: Manifest, graph: str, kind: str, serving: str,
                 options: RepositoryOptions) -> str:
    """`serving`: a platform (tensorrt_plan, onnxruntime_onnx) or "python"."""
    declared = manifest.graphs[graph]
    batched = all(t["shape"][:1] == ["batch"] for t in declared["inputs"] + declared["outputs"])
    low, opt, high = manifest.shape_limits["batch"]
    lines = [f'name: "{name}"', 'backend: "python"' if serving == "python" else f'platform: "{serving}"',
             f"max_batch_size: {high if batched else 0}",
             "input [", ",\n".join(tensor_config(t, batched) for t in declared["inputs"]), "]",
             "output [", ",\n".join(tensor_config(t, batched) for t in declared["outputs"]), "]",
             f"instance_group [ {{ kind: {kind} count: 1 }} ]"]
    if batched and options.queue_delay_us is not None and batch_independent(manifest, kind):
        # An engine runs fastest at its profile's opt batch; ONNX Runtime has no such size, so the
        # Python form takes whatever has queued.
        preferred = "" if serving == "python" else f"preferred_batch_size: [ {opt} ] "
        lines.append(f"dynamic_batching {{ {preferred}max_queue_delay_microseconds: {options.queue_delay_us} }}")
    return "\n".join(lines) + "\n"


def batch_independent(manifest: Manifest, kind: str) -> bool:
    """Whether a row's answer is the same whatever is batched beside it. Not for int8 on a CPU: its
    dynamic form scales activations per call, over the whole batch (the GPU form, Q/DQ, has fixed scales)."""
    return not (manifest.precision == "int8" and kind == "KIND_CPU")


TEXT_CONFIG = """name: "{name}"
backend: "python"
max_batch_size: 0
input [ {{ name: "REQUEST" data_type: TYPE_STRING dims: [ 1 ] }} ]
output [ {{ name: "RESULT" data_type: TYPE_STRING dims: [ 1 ] }} ]
instance_group [ {{ kind: KIND_CPU count: {instances} }} ]
"""


def fresh_version(out: Path, name: str) -> Path:
    """`out/name/1/`, empty: a model written again replaces the old one whole."""
    if (out / name).exists():
        shutil.rmtree(out / name)
    (out / name / "1").mkdir(parents=True)
    return out / name / "1"


def place(source: Path, target: Path) -> None:
    """A hard link where the file system allows (a 345M artifact is 1.3 GB), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy(source, target)


def artifact_reference(manifest_path: Path, files: list[str], version: Path, options: RepositoryOptions) -> str:
    """What a Python-backend model's `artifact` parameter names: the artifact in place, or `files` placed
    beside the model."""
    if options.in_place:
        return str(manifest_path)
    for name in [manifest_path.name, *files]:
        place(manifest_path.parent / name, version / name)
    return manifest_path.name


def write_python_model(version: Path, model: str, config: str, options: RepositoryOptions) -> None:
    (version / "model.py").write_text(LAUNCHER.format(model=model, site_dirs=options.site_dirs))
    (version.parent / "config.pbtxt").write_text(config)


def write_text_model(manifest_path: Path, manifest: Manifest, out: Path, options: RepositoryOptions) -> str:
    """`NAME-text`: the Python-backend model that takes the helper's arguments as JSON text."""
    name = f"{manifest.name}-text"
    version = fresh_version(out, name)
    reference = artifact_reference(manifest_path, [manifest.tokenizer["file"]], version, options)
    config = TEXT_CONFIG.format(name=name, instances=TEXT_INSTANCES) + model_parameters(reference, options)
    write_python_model(version, "TextModel", config, options)
    return name


def write_graph_model(manifest_path: Path, manifest: Manifest, graph: str, out: Path,
                      options: RepositoryOptions) -> str:
    name = manifest.model_name(graph)
    version = fresh_version(out, name)
    declared, engine = manifest.graphs[graph], manifest.engines.get(graph)
    gpu = options.device == "gpu" or (options.device == "auto" and engine is not None and not options.python_backend)
    kind = "KIND_GPU" if gpu else "KIND_CPU"
    if options.python_backend:
        reference = artifact_reference(manifest_path, list(manifest.files), version, options)
        config = model_config(name, manifest, graph, kind, "python", options)
        write_python_model(version, "GraphModel", config + model_parameters(reference, options, graph=graph), options)
        return name
    if engine and gpu:
        shutil.copy(manifest_path.parent / engine["file"], version / "model.plan")
        platform = "tensorrt_plan"
    else:
        # int8 has two forms: MatMulInteger for CPUs, Q/DQ (`tensorrt_file`) for GPU providers
        source = manifest_path.parent / (declared.get("tensorrt_file", declared["file"]) if gpu else declared["file"])
        shutil.copy(source, version / "model.onnx")
        for data in manifest_path.parent.glob(f"{source.name}.data"):  # the name the graph refers to
            shutil.copy(data, version / data.name)
        platform = "onnxruntime_onnx"
    (version.parent / "config.pbtxt").write_text(model_config(name, manifest, graph, kind, platform, options))
    return name


def write_repository(artifacts: list[Path], out: Path, options: RepositoryOptions | None = None) -> list[str]:
    """Write the models of `artifacts` into the repository `out`; returns the model names. Every artifact
    is read and checked before anything is written."""
    options = options or RepositoryOptions()
    loaded: dict[str, tuple[Path, Manifest]] = {}
    for artifact in artifacts:
        manifest_path = find_manifest(artifact)
        manifest = Manifest.load(manifest_path)
        if manifest.name in loaded:
            raise UserError(f"{artifact}: another artifact given is also named {manifest.name!r}; each needs its own "
                            "model names in a repository (build with --name)")
        if not options.in_place:  # in place, the server's Session checks them as it loads
            verify(manifest_path)
        loaded[manifest.name] = manifest_path, manifest
    written = []
    for manifest_path, manifest in loaded.values():
        written += [write_graph_model(manifest_path, manifest, graph, out, options) for graph in manifest.graphs]
        if "prefill" in manifest.graphs:
            (out / f"{manifest.name}-prefill" / "README.md").write_text(CAUSAL_README.format(name=manifest.name))
        if options.with_tokenizer:
            written.append(write_text_model(manifest_path, manifest, out, options))
    return written


def infer_inputs(client: Any, feed: dict[str, np.ndarray]) -> list[Any]:
    """A request's inputs for tritonclient (`client`: tritonclient.http or tritonclient.grpc) from named
    arrays: int and float tensors by their numpy type, object arrays as BYTES (a text model's REQUEST)."""
    inputs = []
    for name, value in feed.items():
        datatype = "BYTES" if value.dtype == object else DATA_TYPES[str(value.dtype)].removeprefix("TYPE_")
        tensor = client.InferInput(name, list(value.shape), datatype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return inputs
