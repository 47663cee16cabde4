"""Each head, declared once: its graphs, their inputs and outputs with symbolic shapes.

The exporter traces and validates what is declared here, the manifest records it, and the runtime's
task helpers read it. Shapes name their axes:
- dynamic axes (sized per call, bounded by the artifact's shape limits): batch, sequence, choices,
  past_sequence, total_sequence (= past_sequence + sequence);
- model axes (fixed by the config): hidden, vocab, labels, heads, head_size.
A tensor name with `{layer}` stands for one tensor per encoder layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DYNAMIC_AXES = ("batch", "choices", "sequence", "past_sequence", "total_sequence")
Shape = tuple[str | int, ...]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: Shape


@dataclass(frozen=True)
class GraphSpec:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class HeadSpec:
    name: str
    summary: str
    graphs: dict[str, GraphSpec]  # "model", or "prefill" and "decode" for the causal LM
    logits: tuple[str, ...]  # outputs whose last axis is a choice among classes (argmax is checked)
    helpers: tuple[str, ...]  # the runtime.Session task helpers that serve this head
    # The text fields of one example, as the helper names its arguments (calibration .jsonl keys);
    # a trailing "?" marks an optional one, "[]" a list of texts.
    fields: tuple[str, ...] = ("text",)
    padding_side: str = "right"


def _ids(name: str, *axes: str) -> TensorSpec:
    return TensorSpec(name, "int64", axes)


def _floats(name: str, *axes: str | int) -> TensorSpec:
    return TensorSpec(name, "float32", axes)


ENCODER_INPUTS = (_ids("input_ids", "batch", "sequence"), _ids("attention_mask", "batch", "sequence"),
                  _ids("token_type_ids", "batch", "sequence"))
CHOICE_INPUTS = tuple(_ids(t.name, "batch", "choices", "sequence") for t in ENCODER_INPUTS)
PAST = (_floats("past_key_values.{layer}.key", "batch", "heads", "past_sequence", "head_size"),
        _floats("past_key_values.{layer}.value", "batch", "heads", "past_sequence", "head_size"))


def _present(length_axis: str) -> tuple[TensorSpec, ...]:
    return (_floats("present.{layer}.key", "batch", "heads", length_axis, "head_size"),
            _floats("present.{layer}.value", "batch", "heads", length_axis, "head_size"))


def _encoder_head(name: str, summary: str, outputs: tuple[TensorSpec, ...], logits: tuple[str, ...],
                  helpers: tuple[str, ...], fields: tuple[str, ...] = ("text",),
                  inputs: tuple[TensorSpec, ...] = ENCODER_INPUTS) -> HeadSpec:
    return HeadSpec(name, summary, {"model": GraphSpec(inputs, outputs)}, logits, helpers, fields)


HEADS: dict[str, HeadSpec] = {head.name: head for head in (
    _encoder_head("base", "the encoder's hidden states and pooled [CLS] vector",
                  (_floats("last_hidden_state", "batch", "sequence", "hidden"),
                   _floats("pooler_output", "batch", "hidden")), (), ("embed",)),
    _encoder_head("mlm", "masked language model: vocabulary logits per position",
                  (_floats("logits", "batch", "sequence", "vocab"),), ("logits",), ("fill_mask",)),
    HeadSpec("causal-lm", "left-to-right language model with an explicit KV cache", {
        "prefill": GraphSpec(
            (_ids("input_ids", "batch", "sequence"), _ids("attention_mask", "batch", "sequence"),
             _ids("position_ids", "batch", "sequence")),
            (_floats("logits", "batch", "vocab"), *_present("sequence"))),
        "decode": GraphSpec(
            (_ids("input_ids", "batch", "sequence"), _ids("attention_mask", "batch", "total_sequence"),
             _ids("position_ids", "batch", "sequence"), *PAST),
            (_floats("logits", "batch", "vocab"), *_present("total_sequence"))),
    }, ("logits",), ("generate", "generate_stream"), padding_side="left"),
    _encoder_head("nsp", "next-sentence prediction: is sentence B the continuation of A",
                  (_floats("logits", "batch", 2),), ("logits",), ("next_sentence",), ("a", "b")),
    _encoder_head("pretraining", "masked LM and next-sentence prediction together",
                  (_floats("prediction_logits", "batch", "sequence", "vocab"),
                   _floats("seq_relationship_logits", "batch", 2)),
                  ("prediction_logits", "seq_relationship_logits"), ("fill_mask", "next_sentence"), ("a", "b?")),
    _encoder_head("sequence-classification", "one label (or score) per text or text pair",
                  (_floats("logits", "batch", "labels"),), ("logits",), ("classify",), ("text", "text_pair?")),
    _encoder_head("multiple-choice", "scores each of several candidate continuations",
                  (_floats("logits", "batch", "choices"),), ("logits",), ("choose",), ("prompt", "choices[]"),
                  inputs=CHOICE_INPUTS),
    _encoder_head("token-classification", "one label per token (named entities, tags)",
                  (_floats("logits", "batch", "sequence", "labels"),), ("logits",), ("tag",)),
    _encoder_head("qa", "extractive question answering: answer-span start and end logits",
                  (_floats("start_logits", "batch", "sequence"), _floats("end_logits", "batch", "sequence")),
                  ("start_logits", "end_logits"), ("answer",), ("question", "context")),
)}


def parse_field(declared: str) -> tuple[str, bool, bool]:
    """A declared field -> (name, required, is a list): "choices[]" -> ("choices", True, True),
    "text_pair?" -> ("text_pair", False, False)."""
    return declared.rstrip("?").removesuffix("[]"), not declared.endswith("?"), declared.endswith("[]")


def field_problem(example: dict[str, Any], head: HeadSpec) -> str | None:
    """What is wrong with an example's texts for `head`'s helper (a missing or mistyped field), or None."""
    for name, required, is_list in (parse_field(f) for f in head.fields):
        value = example.get(name)
        if value is None and not required:
            continue
        ok = (isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)) if is_list \
            else isinstance(value, str)
        if not ok:
            return f"field {name!r} must be {'a list of texts' if is_list else 'a text'}"
    return None


def model_axes(config: dict[str, Any]) -> dict[str, int]:
    """The sizes of the model axes, from a Hugging Face-style config dict."""
    return {"hidden": config["hidden_size"], "vocab": config["vocab_size"],
            "labels": len(config["id2label"]), "heads": config["num_attention_heads"],
            "head_size": config["hidden_size"] // config["num_attention_heads"]}


def expand(tensors: tuple[TensorSpec, ...], config: dict[str, Any]) -> list[TensorSpec]:
    """The concrete tensors of a graph: model axes sized, per-layer names spelled out layer by layer
    (past_key_values.0.key, past_key_values.0.value, past_key_values.1.key, ...)."""
    sizes = model_axes(config)
    sized = [TensorSpec(t.name, t.dtype, tuple(sizes.get(a, a) if isinstance(a, str) else a for a in t.shape))
             for t in tensors]
    fixed = [t for t in sized if "{layer}" not in t.name]
    per_layer = [t for t in sized if "{layer}" in t.name]  # declared last, after the fixed tensors
    return fixed + [TensorSpec(t.name.format(layer=i), t.dtype, t.shape)
                    for i in range(config["num_hidden_layers"]) for t in per_layer]


def graph_file(name: str, graph: str, suffix: str = ".onnx") -> str:
    """`qa.onnx` for a single-graph head, `NAME.prefill.onnx` / `NAME.decode.onnx` for the causal LM."""
    return f"{name}{suffix}" if graph == "model" else f"{name}.{graph}{suffix}"
