"""`python -m exporter triton ARTIFACT... --out model_repository/`: artifacts as a Triton model repository.

Per graph: `<model>/config.pbtxt` and `<model>/1/model.plan` (where the artifact has TensorRT engines)
or `<model>/1/model.onnx` with its external data beside it under the name the graph refers to. Inputs
and outputs come from the manifest, the batch axis becoming `max_batch_size` (the recipe's max) with
dynamic batching preferring the recipe's opt batch; other dynamic axes are -1. A causal LM becomes
two models, NAME-prefill and NAME-decode, with a README on driving them. `--with-tokenizer` adds
NAME-text, a Python-backend model taking text (runtime/triton_text_model.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import runtime
from runtime.errors import UserError
from runtime.manifest import Manifest
from runtime.session import find_manifest

DATA_TYPES = {"int64": "TYPE_INT64", "int32": "TYPE_INT32", "float32": "TYPE_FP32", "float16": "TYPE_FP16"}
QUEUE_DELAY_US = 100

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


def tensor_config(tensor: dict, batched: bool) -> str:
    dtype = DATA_TYPES.get(tensor["dtype"])
    if dtype is None:
        raise UserError(f"tensor {tensor['name']}: dtype {tensor['dtype']} has no Triton type here")
    dims = [d if isinstance(d, int) else -1 for d in tensor["shape"][1 if batched else 0:]]
    return f'  {{ name: "{tensor["name"]}" data_type: {dtype} dims: [ {", ".join(map(str, dims))} ] }}'


def model_config(name: str, platform: str, manifest: Manifest, graph: str, kind: str) -> str:
    declared = manifest.graphs[graph]
    batched = all(t["shape"][:1] == ["batch"] for t in declared["inputs"] + declared["outputs"])
    low, opt, high = manifest.shape_limits["batch"]
    lines = [f'name: "{name}"', f'platform: "{platform}"', f"max_batch_size: {high if batched else 0}",
             "input [", ",\n".join(tensor_config(t, batched) for t in declared["inputs"]), "]",
             "output [", ",\n".join(tensor_config(t, batched) for t in declared["outputs"]), "]",
             f"instance_group [ {{ kind: {kind} count: 1 }} ]"]
    if batched:
        lines.append(f"dynamic_batching {{ preferred_batch_size: [ {opt} ] "
                     f"max_queue_delay_microseconds: {QUEUE_DELAY_US} }}")
    return "\n".join(lines) + "\n"


TEXT_CONFIG = """name: "{name}"
backend: "python"
max_batch_size: 0
input [ {{ name: "REQUEST" data_type: TYPE_STRING dims: [ 1 ] }} ]
output [ {{ name: "RESULT" data_type: TYPE_STRING dims: [ 1 ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""


def fresh_version(out: Path, name: str) -> Path:
    """`out/name/1/`, empty: a model written again replaces the old one whole."""
    if (out / name).exists():
        shutil.rmtree(out / name)
    (out / name / "1").mkdir(parents=True)
    return out / name / "1"


def write_text_model(manifest_path: Path, manifest: Manifest, out: Path) -> str:
    """`NAME-text`: the Python-backend model that takes the helper's arguments as JSON text."""
    name = f"{manifest.name}-text"
    version = fresh_version(out, name)
    shutil.copy(Path(runtime.__file__).parent / "triton_text_model.py", version / "model.py")
    shutil.copy(manifest_path, version / manifest_path.name)
    shutil.copy(manifest_path.parent / manifest.tokenizer["file"], version / manifest.tokenizer["file"])
    (version.parent / "config.pbtxt").write_text(TEXT_CONFIG.format(name=name))
    return name


def write_repository(artifacts: list[Path], out: Path, device: str = "auto", with_tokenizer: bool = False
                     ) -> list[str]:
    """Write the models of `artifacts` into the repository `out`; returns the model names."""
    written = []
    for artifact in artifacts:
        manifest_path = find_manifest(artifact)
        manifest = Manifest.load(manifest_path)
        manifest.verify_files(manifest_path.parent)
        for graph, declared in manifest.graphs.items():
            name = manifest.name if graph == "model" else f"{manifest.name}-{graph}"
            version = fresh_version(out, name)
            engine = manifest.engines.get(graph)
            if engine:
                shutil.copy(manifest_path.parent / engine["file"], version / "model.plan")
                platform = "tensorrt_plan"
            else:
                source = manifest_path.parent / declared["file"]
                shutil.copy(source, version / "model.onnx")
                for data in manifest_path.parent.glob(f"{source.name}.data"):  # the name the graph refers to
                    shutil.copy(data, version / data.name)
                platform = "onnxruntime_onnx"
            kind = {"gpu": "KIND_GPU", "cpu": "KIND_CPU"}.get(device, "KIND_GPU" if engine else "KIND_CPU")
            (version.parent / "config.pbtxt").write_text(model_config(name, platform, manifest, graph, kind))
            written.append(name)
        if "prefill" in manifest.graphs:
            (out / f"{manifest.name}-prefill" / "README.md").write_text(CAUSAL_README.format(name=manifest.name))
        if with_tokenizer:
            written.append(write_text_model(manifest_path, manifest, out))
    return written
