"""Calibration data for INT8: representative model inputs, made by the tokenizer from real text.

A `.txt` holds one text per line; a head that reads several texts (qa: question and context, nsp: a
and b, multiple-choice: a prompt and its choices) takes them from consecutive lines. A `.jsonl` holds
one example per line with the head's fields as `runtime.heads` names them (qa: `question`, `context`;
multiple-choice: `prompt`, `choices`; ...). The first N examples are used in file order, one input of
batch 1 each, so the same data always calibrates the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
from tokenizers import Tokenizer

from runtime.errors import UserError
from runtime.files import json_lines
from runtime.heads import HeadSpec, field_problem, parse_field

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")  # how activation ranges are chosen
Example = dict[str, Any]  # field -> a text, or a list of texts for a "[]" field
Feed = dict[str, np.ndarray]


def read_examples(path: Path, spec: HeadSpec, count: int, choices: int) -> list[Example]:
    """The first `count` examples of a .txt or .jsonl file (`choices`: lines per list field of a .txt)."""
    if not path.is_file():
        raise UserError(f"--calibration-data {path}: no such file")
    if count < 1:
        raise UserError(f"--calibration-samples must be at least 1, got {count}")
    lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    lines = [line for line in lines if line]
    fields = [parse_field(f) for f in spec.fields]
    if path.suffix == ".jsonl":
        examples = [_json_example(path, number, item, spec) for number, item in json_lines(path, "")]
    elif path.suffix == ".txt":
        required = [(name, is_list) for name, needed, is_list in fields if needed]
        per_example = sum(choices if is_list else 1 for _, is_list in required)
        examples = []
        for start in range(0, len(lines) - per_example + 1, per_example):
            taken = iter(lines[start:start + per_example])
            examples.append({name: [next(taken) for _ in range(choices)] if is_list else next(taken)
                             for name, is_list in required})
    else:
        raise UserError(f"--calibration-data {path}: expected a .txt (one text per line) or a .jsonl "
                        f"(one example per line with {', '.join(spec.fields)})")
    if not examples:
        raise UserError(f"--calibration-data {path}: no examples in it for the {spec.name} head")
    return examples[:count]


def _json_example(path: Path, number: int, item: dict[str, Any], spec: HeadSpec) -> Example:
    problem = field_problem(item, spec)
    if problem:
        raise UserError(f"{path}:{number}: {problem}")
    names = (parse_field(f)[0] for f in spec.fields)
    return {name: item[name] for name in names if item.get(name) is not None}


def encoder_feed(example: Example, spec: HeadSpec, tokenizer: Tokenizer, limits: dict[str, list[int]],
                 pad_id: int) -> Feed:
    """input_ids / attention_mask / token_type_ids of batch 1 ([1, choices, sequence] for choices)."""
    names = [parse_field(f)[0] for f in spec.fields]
    first, second = example[names[0]], example.get(names[1]) if len(names) > 1 else None
    if isinstance(second, list):  # one row per choice
        encodings = [tokenizer.encode(first, choice) for choice in second[:limits["choices"][2]]]
    else:
        encodings = [tokenizer.encode(first, second) if second else tokenizer.encode(first)]
    length = max(max(len(e.ids) for e in encodings), limits["sequence"][0])
    feed = {name: np.zeros((len(encodings), length), dtype=np.int64)
            for name in ("input_ids", "attention_mask", "token_type_ids")}
    feed["input_ids"][:] = pad_id
    for row, e in enumerate(encodings):
        feed["input_ids"][row, :len(e.ids)] = e.ids
        feed["attention_mask"][row, :len(e.ids)] = 1
        feed["token_type_ids"][row, :len(e.ids)] = e.type_ids
    if isinstance(second, list):
        return {k: v[None] for k, v in feed.items()}
    return feed


def causal_feeds(example: Example, tokenizer: Tokenizer, limits: dict[str, list[int]], cls_id: int | None,
                 run_prefill: Callable[[Feed], dict[str, np.ndarray]]) -> dict[str, Feed]:
    """A prefill input for the text, and a decode input continuing its prefix with the cache the fp32
    prefill graph (`run_prefill`) makes of it, as generation does."""
    ids = ([cls_id] if cls_id is not None else []) + tokenizer.encode(example["text"], add_special_tokens=False).ids
    ids = ids[:min(limits["sequence"][2], limits["past_sequence"][2] + 1)]
    ids = ids if len(ids) >= 2 else ids + ids  # a decode step needs a prefix
    prefill = _causal_feed(ids[:-1], 0)
    cache = run_prefill(prefill)
    decode = _causal_feed(ids[-1:], len(ids) - 1)
    decode["attention_mask"] = np.ones((1, len(ids)), dtype=np.int64)
    decode.update({name.replace("present", "past_key_values"): value for name, value in cache.items()
                   if name.startswith("present.")})
    return {"prefill": _causal_feed(ids, 0), "decode": decode}


def _causal_feed(ids: list[int], start: int) -> Feed:
    return {"input_ids": np.array([ids], dtype=np.int64), "attention_mask": np.ones((1, len(ids)), dtype=np.int64),
            "position_ids": np.arange(start, start + len(ids), dtype=np.int64)[None]}


def same_shapes(feeds: list[Feed], left: bool, pad_id: int) -> list[Feed]:
    """The inputs padded to one shape, as rows of one padded batch are (masked out; the causal LM's on
    the left, with a zero cache before its past): ONNX Runtime's histogram calibrators (entropy,
    percentile) stack each tensor over all inputs."""
    def axis(name: str) -> int:
        return 2 if name.startswith("past_key_values.") else -1

    sizes = {name: max(f[name].shape[axis(name)] for f in feeds) for name in feeds[0]}
    padded = []
    for feed in feeds:
        out = {}
        for name, value in feed.items():
            widths = [(0, 0)] * value.ndim
            extra = sizes[name] - value.shape[axis(name)]
            widths[axis(name)] = (extra, 0) if left else (0, extra)
            out[name] = np.pad(value, widths, constant_values=pad_id if name == "input_ids" else 0)
        padded.append(out)
    return padded


def truncating(tokenizer: Tokenizer, max_length: int) -> Tokenizer:
    """A copy of the tokenizer that cuts encodings to the artifact's max length."""
    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.no_padding()
    copy.enable_truncation(max_length)
    return copy
