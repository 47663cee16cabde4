"""Task accuracy: each head's metric on an evaluation set, measured through `Session`'s own helpers.

An evaluation set is JSON lines: each example holds the fields the head's helper takes (as
`runtime.heads` names them: qa `question` and `context`, ...) and the gold answer:

| head | gold fields | metrics (percent; the first decides by default) |
| --- | --- | --- |
| qa | `answers`: texts | exact_match, f1 (SQuAD's normalization) |
| sequence-classification | `label` | accuracy |
| nsp | `is_next` | accuracy |
| token-classification | `entities`: [{entity_group, start, end}] | entity_f1 (exact span and type) |
| multiple-choice | `label`: index of the right choice | accuracy |
| mlm, pretraining | `answer`: the word under the one [MASK] | top1 |
| base | `match`: a text whose embedding should be the nearest | retrieval_top1 (mean pooling, cosine) |
| causal-lm | none: `text` is the gold | next_token_accuracy, greedy_match (continuations of the first half equal to the reference's) |

Every metric also records each example's prediction, so another run can be compared with it
(`agreement`: the share of predictions equal to the reference's). A prediction that cannot be made
(no answer span found, say) counts as wrong; nothing is skipped.
"""

from __future__ import annotations

import copy
import re
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError
from .files import json_lines
from .heads import HEADS, field_problem, parse_field
from .manifest import Manifest
from .session import Session

Example = dict[str, Any]
Scores = dict[str, float]


Each = Callable[[Example, Any], float]  # (example, its prediction) -> its value in [0, 1]


@dataclass(frozen=True)
class Metric:
    gold: tuple[str, ...]  # the fields beside the helper's that an example must hold
    names: tuple[str, ...]  # what it measures; the first is the default deciding metric
    # (session, examples, the reference's predictions or None) -> scores, predictions
    run: Callable[[Session, list[Example], list[Any] | None], tuple[Scores, list[Any]]]
    # The metrics that are the mean of a value per example, predicted from that example alone: they can
    # be scored part by part, and bounded before the last example (early stopping)
    each: dict[str, Each] = field(default_factory=dict)


# ---- the metrics --------------------------------------------------------------------------------

def normalize(text: str) -> str:
    """SQuAD's answer normalization: lower case, no punctuation, no articles, single spaces."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def token_f1(predicted: str, gold: str) -> float:
    p, g = normalize(predicted).split(), normalize(gold).split()
    common = sum((Counter(p) & Counter(g)).values())
    if not p or not g:
        return float(p == g)
    if not common:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def percent(values: list[float] | list[bool]) -> float:
    return round(100.0 * float(np.mean(values)), 2) if values else 0.0


def means(each: dict[str, Each], examples: list[Example], predicted: list[Any]) -> Scores:
    return {name: percent([value(e, p) for e, p in zip(examples, predicted)]) for name, value in each.items()}


def _mean_metric(gold: tuple[str, ...], predict: Callable[[Session, list[Example]], list[Any]], each: dict[str, Each]
                 ) -> Metric:
    """A metric that is the mean of `each` over examples predicted one by one (in batches)."""
    def run(session: Session, examples: list[Example], _: list[Any] | None) -> tuple[Scores, list[Any]]:
        predicted = predict(session, examples)
        return means(each, examples, predicted), predicted
    return Metric(gold, tuple(each), run, each)


def _answers(session: Session, examples: list[Example]) -> list[Any]:
    return [f["answer"] for f in session.answer([e["question"] for e in examples], [e["context"] for e in examples])]


QA_EACH: dict[str, Each] = {
    "exact_match": lambda e, p: float(max(normalize(p) == normalize(a) for a in e["answers"])),
    "f1": lambda e, p: max(token_f1(p, a) for a in e["answers"])}


def _labels(session: Session, examples: list[Example]) -> list[Any]:
    pairs = [e["text_pair"] for e in examples] if all("text_pair" in e for e in examples) else None
    return [r["label"] for r in session.classify([e["text"] for e in examples], pairs)]


def _is_next(session: Session, examples: list[Example]) -> list[Any]:
    return [r["is_next"] for r in session.next_sentence([e["a"] for e in examples], [e["b"] for e in examples])]


def _entities(session: Session, examples: list[Example], _: list[Any] | None) -> tuple[Scores, list[Any]]:
    found = session.tag([e["text"] for e in examples])
    predicted = [sorted((g["entity_group"], g["start"], g["end"]) for g in groups) for groups in found]
    right = guessed = gold = 0
    for spans, example in zip(predicted, examples):
        truth = {(g["entity_group"], g["start"], g["end"]) for g in example["entities"]}
        right, guessed, gold = right + len(truth & set(spans)), guessed + len(spans), gold + len(truth)
    precision, recall = right / max(guessed, 1), right / max(gold, 1)
    f1 = 2 * precision * recall / (precision + recall) if right else 0.0
    return {"entity_f1": round(100.0 * f1, 2)}, [[list(s) for s in spans] for spans in predicted]


def _choices(session: Session, examples: list[Example]) -> list[Any]:
    return [r["choice"] for r in session.choose([e["prompt"] for e in examples], [e["choices"] for e in examples])]


def _masked(text_field: str) -> Metric:
    def predict(session: Session, examples: list[Example]) -> list[Any]:
        texts = [e[text_field] for e in examples]
        if any(t.count("[MASK]") != 1 for t in texts):
            raise UserError(f"every {text_field!r} of a masked-word evaluation set must hold exactly one [MASK]")
        return [found[0]["token_str"] for found in session.fill_mask(texts, top_k=1)]
    return _mean_metric(("answer",), predict, {"top1": lambda e, p: float(p == e["answer"].lower())})


def _retrieval(session: Session, examples: list[Example], _: list[Any] | None) -> tuple[Scores, list[Any]]:
    queries = session.embed([e["text"] for e in examples], pooling="mean")
    documents = session.embed([e["match"] for e in examples], pooling="mean")
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    documents = documents / np.linalg.norm(documents, axis=1, keepdims=True)
    predicted = [int(i) for i in (queries @ documents.T).argmax(axis=1)]
    return {"retrieval_top1": percent([p == i for i, p in enumerate(predicted)])}, predicted


GREEDY_TOKENS = 12


def _causal(session: Session, examples: list[Example], reference: list[Any] | None) -> tuple[Scores, list[Any]]:
    """Next-token accuracy over each text (every prefix through the prefill graph, in batches), and
    greedy continuations of each text's first half."""
    right, total = 0, 0
    cls = session.special.get("cls")
    batch = session.manifest.shape_limits["batch"][2]
    for example in examples:
        ids = ([cls] if cls is not None else []) + session.tokenizer.encode(example["text"], add_special_tokens=False).ids
        ids = ids[:session.manifest.shape_limits["sequence"][2] + 1]  # what fits the artifact
        for first in range(1, len(ids), batch):
            ends = range(first, min(first + batch, len(ids)))
            rows, length = len(ends), max(ends)
            feed = {name: np.zeros((rows, length), dtype=np.int64)
                    for name in ("input_ids", "attention_mask", "position_ids")}
            for row, end in enumerate(ends):  # left padding, as generation does
                feed["input_ids"][row, length - end:] = ids[:end]
                feed["attention_mask"][row, length - end:] = 1
                feed["position_ids"][row, length - end:] = np.arange(end)
            feed["input_ids"][feed["attention_mask"] == 0] = session.special.get("pad", 0)
            logits = session.run(feed, "prefill")["logits"]
            right += int((logits.argmax(axis=-1) == np.array([ids[end] for end in ends])).sum())
            total += rows
    prompts = [" ".join(e["text"].split()[:max(1, len(e["text"].split()) // 2)]) for e in examples]
    predicted = session.generate(prompts, max_new_tokens=GREEDY_TOKENS)
    scores = {"next_token_accuracy": round(100.0 * right / max(total, 1), 2)}
    scores["greedy_match"] = percent([p == r for p, r in zip(predicted, reference)]) if reference else 100.0
    return scores, predicted


METRICS: dict[str, Metric] = {
    "qa": _mean_metric(("answers",), _answers, QA_EACH),
    "sequence-classification": _mean_metric(("label",), _labels, {"accuracy": lambda e, p: float(p == str(e["label"]))}),
    "nsp": _mean_metric(("is_next",), _is_next, {"accuracy": lambda e, p: float(p == bool(e["is_next"]))}),
    "token-classification": Metric(("entities",), ("entity_f1",), _entities),
    "multiple-choice": _mean_metric(("label",), _choices, {"accuracy": lambda e, p: float(p == int(e["label"]))}),
    "mlm": _masked("text"),
    "pretraining": _masked("a"),
    "base": Metric(("match",), ("retrieval_top1",), _retrieval),
    "causal-lm": Metric((), ("next_token_accuracy", "greedy_match"), _causal),
}


# ---- evaluation sets ------------------------------------------------------------------------------

def read_examples(path: str | Path, head: str) -> list[Example]:
    """Every example of an evaluation set, each checked to hold the head's fields and gold answer."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"evaluation set {path}: no such file")
    metric = METRICS[head]
    allowed = {parse_field(f)[0] for f in HEADS[head].fields} | set(metric.gold)
    examples = []
    for number, example in json_lines(path, "evaluation set "):
        extra = sorted(set(example) - allowed)
        if extra:
            raise UserError(f"evaluation set {path}:{number}: field {extra[0]!r} is not one the {head} head takes "
                            f"(it takes {', '.join(sorted(allowed))})")
        problem = field_problem(example, HEADS[head])
        if problem:
            raise UserError(f"evaluation set {path}:{number}: {problem}")
        missing = [g for g in metric.gold if g not in example]
        if missing:
            raise UserError(f"evaluation set {path}:{number}: field {missing[0]!r} (the gold answer) is missing")
        examples.append(example)
    if not examples:
        raise UserError(f"evaluation set {path}: no examples in it")
    return examples


class _Probe:
    """A backend that runs nothing: it answers every call with ones of the shapes the graph declares,
    and counts the token positions it was given."""

    name = "probe"

    def __init__(self, manifest: Manifest):
        self.graphs = manifest.graphs
        self.tokens = 0

    def run(self, graph: str, feed: dict[str, Any], keep: frozenset[str] = frozenset()) -> dict[str, Any]:
        self.tokens += feed["input_ids"].size
        sizes = {axis: size for spec in self.graphs[graph]["inputs"]
                 for axis, size in zip(spec["shape"], feed[spec["name"]].shape) if isinstance(axis, str)}
        return {t["name"]: np.ones([sizes[a] if isinstance(a, str) else a for a in t["shape"]], np.float32)
                for t in self.graphs[graph]["outputs"]}


def fitting(session: Session, examples: list[Example]) -> tuple[list[Example], list[str], list[int]]:
    """The examples this artifact can measure, why each of the others cannot (a text longer than its
    limits, say), and the token positions each one that fits runs: each is put to the head's helper
    on a copy of `session` whose graphs run nothing, so what fits is exactly what the helper accepts."""
    probe, backend = copy.copy(session), _Probe(session.manifest)
    probe._backend = backend
    kept, reasons, tokens = [], [], []
    for example in examples:
        before = backend.tokens
        try:
            METRICS[session.head.name].run(probe, [example], None)
        except UserError as err:
            reasons.append(str(err))
            continue
        kept.append(example)
        tokens.append(backend.tokens - before)
    return kept, reasons, tokens


def evaluate(session: Session, examples: list[Example], reference: list[Any] | None = None
             ) -> tuple[Scores, list[Any]]:
    """The head's metrics on `examples` (percent), and each example's prediction. With `reference`
    (another run's predictions), also `agreement`: the share of predictions equal to those."""
    scores, predicted = METRICS[session.head.name].run(session, examples, reference)
    if reference is not None:
        scores["agreement"] = percent([p == r for p, r in zip(predicted, reference)])
    return scores, predicted
