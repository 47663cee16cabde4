"""What a manifest must hold before anything in it is trusted: the manifest is the artifact's root of
trust (it carries every file's hash), so it is checked like one.

Types and required fields; a known head whose declared graphs, inputs and outputs are exactly the
manifest's; shape limits ordered and within the model's positions; every file it names a plain
name inside the artifact's folder and listed with its hash. A problem is one line naming the field.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import UserError
from .heads import DYNAMIC_AXES, HEADS, expand

PRECISIONS = ("fp32", "fp16", "int8", "int4")
QUANTIZED = ("int8", "int4")  # integer weights: OpenVINO's float precision does not name their compute
SHA256 = re.compile(r"^[0-9a-f]{64}$")
GRAPH_FIELDS = frozenset({"file", "tensorrt_file", "inputs", "outputs"})
CONFIG_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
                "type_vocab_size")


class Invalid(UserError):
    def __init__(self, field: str, problem: str):
        super().__init__(f"manifest field {field}: {problem}")


def _typed(value: Any, kind: type | tuple[type, ...], field: str) -> Any:
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise Invalid(field, f"must be {names}, got {type(value).__name__}")
    return value


def _positive(value: Any, field: str, minimum: int = 1) -> int:
    if _typed(value, int, field) < minimum:
        raise Invalid(field, f"must be at least {minimum}, got {value}")
    return value


def plain_name(value: Any, field: str) -> str:
    """A file name inside the artifact's folder: no directories, not `.` or `..`."""
    name = _typed(value, str, field)
    if not name or "/" in name or "\\" in name or "\0" in name or name in (".", ".."):
        raise Invalid(field, f"{name!r} is not a plain file name inside the artifact's folder")
    return name


def _only(entry: dict[str, Any], known: set[str] | frozenset[str], field: str) -> None:
    """No fields but the known ones: an unknown one is a typo, a newer format, or smuggled."""
    unknown = sorted(set(entry) - set(known))
    if unknown:
        raise Invalid(f"{field}.{unknown[0]}" if field else unknown[0], "is not a field of this manifest format")


def check(data: dict[str, Any], known: set[str]) -> None:
    """Raise Invalid (a UserError) naming the first field that is wrong; `known`: the top-level fields."""
    _only(data, known, "")
    for field in ("name", "head", "precision"):
        _typed(data.get(field), str, field)
    _typed(data.get("created", ""), str, "created")
    for field in ("config", "graphs", "shape_limits", "tokenizer", "files", "validation"):
        _typed(data.get(field), dict, field)
    for field in ("task", "accuracy", "versions", "quantization", "engines", "tensorrt", "source"):
        _typed(data.get(field, {}), dict, field)
    plain_name(f"{data['name']}.json", "name")
    if data["head"] not in HEADS:
        raise Invalid("head", f"unknown head {data['head']!r} (this runtime knows {', '.join(HEADS)}); "
                      "upgrade the runtime package")
    if data["precision"] not in PRECISIONS:
        raise Invalid("precision", f"{data['precision']!r} is not one of {', '.join(PRECISIONS)}")
    config = data["config"]
    for size in CONFIG_SIZES:
        _positive(config.get(size), f"config.{size}")
    if not _typed(config.get("id2label"), dict, "config.id2label"):
        raise Invalid("config.id2label", "has no labels")
    if config["hidden_size"] % config["num_attention_heads"]:
        raise Invalid("config.num_attention_heads", "does not divide config.hidden_size")
    _typed(data["validation"].get("passed"), bool, "validation.passed")
    files = data["files"]
    for name, entry in files.items():
        plain_name(name, f"files[{name!r}]")
        _only(_typed(entry, dict, f"files[{name!r}]"), {"bytes", "sha256"}, f"files[{name!r}]")
        _positive(entry.get("bytes"), f"files[{name!r}].bytes", 0)
        if not SHA256.match(str(entry.get("sha256"))):
            raise Invalid(f"files[{name!r}].sha256", "must be 64 lowercase hex digits")
    _check_graphs(data)
    _check_limits(data["shape_limits"], data, config)
    tokenizer = data["tokenizer"]
    _listed(plain_name(tokenizer.get("file"), "tokenizer.file"), "tokenizer.file", files)
    if _positive(tokenizer.get("max_length"), "tokenizer.max_length") > data["shape_limits"]["sequence"][2]:
        raise Invalid("tokenizer.max_length", "exceeds the sequence limit")
    if tokenizer.get("padding_side") not in ("left", "right"):
        raise Invalid("tokenizer.padding_side", "must be 'left' or 'right'")
    for role, special in _typed(tokenizer.get("special_tokens"), dict, "tokenizer.special_tokens").items():
        token_id = _typed(_typed(special, dict, f"tokenizer.special_tokens.{role}").get("id"), int,
                          f"tokenizer.special_tokens.{role}.id")
        if not 0 <= token_id < config["vocab_size"]:
            raise Invalid(f"tokenizer.special_tokens.{role}.id", f"{token_id} is outside the vocabulary")
    for graph, engine in data.get("engines", {}).items():
        if graph not in data["graphs"]:
            raise Invalid(f"engines.{graph}", "names no graph of the artifact")
        _listed(plain_name(_typed(engine, dict, f"engines.{graph}").get("file"), f"engines.{graph}.file"),
                f"engines.{graph}.file", files)


def _listed(name: str, field: str, files: dict[str, Any]) -> None:
    if name not in files:
        raise Invalid(field, f"{name} is not listed in files (every file the artifact uses is hash-checked)")


def _check_graphs(data: dict[str, Any]) -> None:
    """The graphs, inputs and outputs the head declares, exactly (the runtime's checks rely on them)."""
    head, graphs = HEADS[data["head"]], data["graphs"]
    if set(graphs) != set(head.graphs):
        raise Invalid("graphs", f"the {head.name} head has graphs {', '.join(head.graphs)}, not {', '.join(graphs)}")
    for graph, spec in head.graphs.items():
        entry = _typed(graphs[graph], dict, f"graphs.{graph}")
        _only(entry, GRAPH_FIELDS, f"graphs.{graph}")
        for key in ("file", "tensorrt_file"):
            if key in entry or key == "file":
                _listed(plain_name(entry.get(key), f"graphs.{graph}.{key}"), f"graphs.{graph}.{key}", data["files"])
        for side, declared in (("inputs", spec.inputs), ("outputs", spec.outputs)):
            expected = [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}
                        for t in expand(declared, data["config"])]
            if entry.get(side) != expected:
                raise Invalid(f"graphs.{graph}.{side}", f"differ from what the {head.name} head declares")


def _check_limits(limits: dict[str, Any], data: dict[str, Any], config: dict[str, Any]) -> None:
    axes = {a for spec in HEADS[data["head"]].graphs.values() for t in (*spec.inputs, *spec.outputs)
            for a in t.shape if a in DYNAMIC_AXES and a != "total_sequence"}
    if set(limits) != axes:
        raise Invalid("shape_limits", f"must bound exactly {', '.join(sorted(axes))}")
    for axis, bounds in limits.items():
        field = f"shape_limits.{axis}"
        if not isinstance(bounds, list) or len(bounds) != 3:
            raise Invalid(field, "must be [min, opt, max]")
        low, opt, high = (_positive(b, field, 0 if axis == "past_sequence" else 1) for b in bounds)
        if not low <= opt <= high:
            raise Invalid(field, f"must be ordered min <= opt <= max, got {bounds}")
    positions = limits["sequence"][2] + limits.get("past_sequence", [0, 0, 0])[2]
    if positions > config["max_position_embeddings"]:
        raise Invalid("shape_limits.sequence", f"reaches {positions} positions, beyond the model's "
                      f"max_position_embeddings of {config['max_position_embeddings']}")
