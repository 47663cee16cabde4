"""Post-processing for the task helpers: raw head outputs (numpy) in, plain dicts and lists out.

Pure functions of the outputs and the tokenizer's encodings, so the same logic applies to any
backend's outputs (and, in tests, to the reference PyTorch head's). Results follow the shapes of
the well-known pipelines (labels with scores, entity groups with character offsets, answer spans).
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
from tokenizers import Encoding, Tokenizer

AGGREGATIONS = ("none", "simple", "first", "max", "average")
POOLINGS = ("cls", "mean", "pooler")


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# ---- sequence-level heads ------------------------------------------------------------------------

def classify(logits: np.ndarray, id2label: dict[int, str], problem_type: str | None, top_k: int | None
             ) -> list[Any]:
    """Per row: {"label", "score"} (top_k=1) or the top_k of them, best first (top_k=None: all).
    Scores are softmax probabilities, sigmoid for multi-label, the raw value for regression."""
    if problem_type == "regression" or logits.shape[-1] == 1:
        return [{"label": id2label[0], "score": float(row[0])} for row in logits]
    scores = sigmoid(logits) if problem_type == "multi_label_classification" else softmax(logits)
    results: list[Any] = []
    for row in scores:
        ranked = [{"label": id2label[i], "score": float(row[i])} for i in np.argsort(-row, kind="stable")]
        results.append(ranked[0] if top_k == 1 else ranked[:top_k])
    return results


def next_sentence(logits: np.ndarray) -> list[dict[str, Any]]:
    """Logit 0 says sentence B continues A (BERT's convention)."""
    return [{"is_next": bool(p[0] > p[1]), "score": float(p[0])} for p in softmax(logits)]


def choose(logits: np.ndarray, choices: list[list[str]]) -> list[dict[str, Any]]:
    results = []
    for row, options in zip(softmax(logits), choices):
        best = int(row.argmax())
        results.append({"choice": best, "text": options[best], "scores": [float(p) for p in row]})
    return results


def embed(hidden: np.ndarray, pooled: np.ndarray, mask: np.ndarray, pooling: str) -> np.ndarray:
    """[batch, hidden] sentence vectors: the [CLS] state, the mean over real tokens, or the pooler's."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "pooler":
        return pooled
    weights = mask[..., None].astype(hidden.dtype)
    return (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1.0)


def fill_mask(logits: np.ndarray, input_ids: np.ndarray, mask_id: int, tokenizer: Tokenizer,
              top_k: int) -> list[Any]:
    """Per row, per [MASK] (a list when a text has several): the top_k tokens with scores and the
    text with the mask filled in."""
    results: list[Any] = []
    for row_logits, ids in zip(logits, input_ids):
        per_mask = []
        for position in np.flatnonzero(ids == mask_id):
            probs = softmax(row_logits[position])
            candidates = []
            for token in np.argsort(-probs, kind="stable")[:top_k]:
                filled = ids.copy()
                filled[position] = token
                candidates.append({"token": int(token), "token_str": tokenizer.id_to_token(int(token)),
                                   "score": float(probs[token]),
                                   "sequence": tokenizer.decode(filled.tolist(), skip_special_tokens=True)})
            per_mask.append(candidates)
        results.append(per_mask[0] if len(per_mask) == 1 else per_mask)
    return results


# ---- token classification --------------------------------------------------------------------

def _entity_type(label: str) -> tuple[str, str]:
    """("B", "PER") for "B-PER"; ("", "O") for "O" or labels without a B-/I- prefix."""
    if len(label) > 2 and label[1] == "-" and label[0] in "BI":
        return label[0], label[2:]
    return "", label


def tag(logits: np.ndarray, encodings: list[Encoding], texts: list[str], id2label: dict[int, str],
        aggregation: str, ignore: tuple[str, ...] = ("O",)) -> list[list[dict[str, Any]]]:
    """Per text, its entities. aggregation "none": every token with its label; "simple": adjacent
    tokens of one entity type grouped (B- starts a new group); "first" / "max" / "average": each
    word labelled by its first token / best-scoring token / averaged scores, then grouped."""
    results = []
    for row_logits, encoding, text in zip(logits, encodings, texts):
        probs = softmax(row_logits)
        tokens = [(i, probs[i], encoding.offsets[i]) for i, word in enumerate(encoding.word_ids)
                  if word is not None and encoding.attention_mask[i]]
        if aggregation == "none":
            results.append([{"entity": id2label[int(p.argmax())], "score": float(p.max()), "index": i,
                             "word": text[s:e], "start": s, "end": e}
                            for i, p, (s, e) in tokens if id2label[int(p.argmax())] not in ignore])
            continue
        if aggregation == "simple":
            pieces = [(p, s, e) for _, p, (s, e) in tokens]
        else:
            pieces = _words(tokens, encoding, aggregation)
        results.append(_group(pieces, text, id2label, ignore))
    return results


def _words(tokens: list[tuple[int, np.ndarray, tuple[int, int]]], encoding: Encoding, aggregation: str
           ) -> list[tuple[np.ndarray, int, int]]:
    words: dict[int, list[tuple[np.ndarray, tuple[int, int]]]] = {}
    for i, p, offsets in tokens:
        words.setdefault(cast(int, encoding.word_ids[i]), []).append((p, offsets))
    pieces = []
    for parts in words.values():
        probs = np.stack([p for p, _ in parts])
        if aggregation == "first":
            scores = probs[0]
        elif aggregation == "max":
            scores = probs[int(probs.max(axis=1).argmax())]
        else:
            scores = probs.mean(axis=0)
        pieces.append((scores, parts[0][1][0], parts[-1][1][1]))
    return pieces


def _group(pieces: list[tuple[np.ndarray, int, int]], text: str, id2label: dict[int, str],
           ignore: tuple[str, ...]) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = []
    previous = None
    for probs, start, end in pieces:
        label = id2label[int(probs.argmax())]
        prefix, kind = _entity_type(label)
        if label in ignore:
            previous = None
            continue
        if previous == kind and prefix != "B":
            group = groups[-1]
            group["end"], group["_scores"] = end, group["_scores"] + [float(probs.max())]
        else:
            groups.append({"entity_group": kind, "start": start, "end": end, "_scores": [float(probs.max())]})
        previous = kind
    for group in groups:
        group["score"] = float(np.mean(group.pop("_scores")))
        group["word"] = text[group["start"]:group["end"]]
    return [{k: g[k] for k in ("entity_group", "score", "word", "start", "end")} for g in groups]


# ---- question answering ----------------------------------------------------------------------

def answer(start_logits: np.ndarray, end_logits: np.ndarray, windows: list[Encoding], context: str,
           top_k: int, max_answer_len: int, handle_impossible_answer: bool) -> list[dict[str, Any]]:
    """The best answer spans of one context over all its windows, best first.

    Within a window, start and end probabilities are a softmax over the context tokens plus [CLS]
    (whose score is "no answer"); a span scores start_p * end_p, ends at or after its start and is at
    most max_answer_len tokens long. Answers are character spans of the context.
    """
    candidates: list[dict[str, Any]] = []
    null_score = 0.0
    for start, end, window in zip(start_logits, end_logits, windows):
        start, end = start[:len(window.ids)], end[:len(window.ids)]  # windows are right-padded to the longest
        in_context = np.array([s == 1 for s in window.sequence_ids])
        allowed = in_context.copy()
        allowed[0] = True  # [CLS]: the no-answer score
        start_p = softmax(np.where(allowed, start, -np.inf))
        end_p = softmax(np.where(allowed, end, -np.inf))
        null_score = max(null_score, float(start_p[0] * end_p[0]))
        scores = np.triu(np.outer(start_p, end_p)) - np.triu(np.ones((len(start_p),) * 2), k=max_answer_len)
        scores[~in_context, :] = -1.0
        scores[:, ~in_context] = -1.0
        for flat in np.argsort(-scores, axis=None, kind="stable")[:top_k]:
            s, e = np.unravel_index(flat, scores.shape)
            if scores[s, e] <= 0:
                break
            # Whole words, as readers expect: a span that starts or ends inside a word takes all of it
            char_start = _word_span(window, s)[0]
            char_end = _word_span(window, e)[1]
            candidates.append({"score": float(scores[s, e]), "start": int(char_start), "end": int(char_end),
                               "answer": context[char_start:char_end]})
    if handle_impossible_answer:
        candidates.append({"score": null_score, "start": 0, "end": 0, "answer": ""})
    best: dict[tuple[int, int], dict[str, Any]] = {}
    for c in sorted(candidates, key=lambda c: -c["score"]):
        best.setdefault((c["start"], c["end"]), c)  # the same span from overlapping windows counts once
    return list(best.values())[:top_k]


def _word_span(window: Encoding, token: int) -> tuple[int, int]:
    """Character span of the context word that `token` belongs to."""
    span = window.word_to_chars(cast(int, window.word_ids[token]), 1)
    return cast(tuple[int, int], span)
