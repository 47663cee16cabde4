"""Text generation with the causal LM's two graphs: prefill the (left-padded) prompts once, then one
decode step per new token, with the key/value cache kept by the backend between steps.

Prompts start with [CLS] (BERT's start token) and generation stops at [SEP] (or the config's
eos_token_id). Position ids count real tokens only, so a prompt generates the same text alone or
left-padded in a batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from tokenizers import Encoding, Tokenizer

from . import tasks
from .errors import UserError
from .manifest import Manifest


class Model(Protocol):
    """What generation needs of an open artifact (runtime.Session is one)."""

    manifest: Manifest
    special: dict[str, int]
    tokenizer: Tokenizer

    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None, add_special_tokens: bool = True
               ) -> list[Encoding]: ...

    def check_inputs(self, inputs: dict[str, Any], graph: str) -> None: ...

    def call(self, graph: str, feed: dict[str, Any], keep: frozenset[str] = frozenset()) -> dict[str, Any]: ...


@dataclass(frozen=True)
class SamplingOptions:
    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise UserError(f"temperature must be positive, got {self.temperature} (use do_sample=False for greedy)")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"top_k must be 0 (off) or positive, got {self.top_k}")


def pick(logits: np.ndarray, options: SamplingOptions, rng: np.random.Generator) -> np.ndarray:
    """The next token of each row: argmax, or a sample after temperature, top-k and top-p."""
    if not options.do_sample:
        return logits.argmax(axis=-1)
    scores = logits.astype(np.float64) / options.temperature
    if options.top_k:
        kth = np.sort(scores, axis=-1)[:, -min(options.top_k, scores.shape[-1])][:, None]
        scores = np.where(scores < kth, -np.inf, scores)
    probs = tasks.softmax(scores)
    if options.top_p < 1:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        drop = np.cumsum(sorted_probs, axis=-1) - sorted_probs >= options.top_p  # keep the smallest nucleus
        np.put_along_axis(probs, order, np.where(drop, 0.0, sorted_probs), axis=-1)
        probs /= probs.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(len(row), p=row) for row in probs])


class Generator:
    def __init__(self, session: Model, options: SamplingOptions):
        options.check()
        self.session, self.options = session, options
        self.rng = np.random.default_rng(options.seed)
        config = session.manifest.config
        self.stop_ids = {i for i in (config.get("eos_token_id"), session.special.get("sep")) if i is not None}
        self.layers = config["num_hidden_layers"]
        self.cache = frozenset(f"present.{i}.{kind}" for i in range(self.layers) for kind in ("key", "value"))

    def prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        encodings = self.session.encode(prompts, add_special_tokens=False)
        cls = self.session.special.get("cls")
        return [([cls] if cls is not None else []) + e.ids for e in encodings]

    def steps(self, prompts: list[list[int]]) -> Iterator[np.ndarray]:
        """The next token of every row, step by step (rows that have stopped keep producing padding)."""
        limits = self.session.manifest.shape_limits
        length = max(len(p) for p in prompts)
        past_max = limits["past_sequence"][2]
        if length + self.options.max_new_tokens - 2 > past_max:
            raise UserError(f"a prompt of {length} tokens plus {self.options.max_new_tokens} new tokens exceeds this "
                            f"artifact's cache of {past_max} tokens; lower max_new_tokens or shorten the prompt")
        if length > limits["sequence"][2]:
            raise UserError(f"a prompt of {length} tokens is longer than this artifact's {limits['sequence'][2]}")
        pad = self.session.special.get("pad", 0)
        ids = np.full((len(prompts), length), pad, dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, prompt in enumerate(prompts):  # left padding: every row's last token is its newest
            ids[row, length - len(prompt):], mask[row, length - len(prompt):] = prompt, 1
        positions = np.clip(mask.cumsum(axis=1) - 1, 0, None)
        feed: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        self.session.check_inputs(feed, "prefill")  # decode steps stay within limits by the checks above
        outputs = self.session.call("prefill", feed, keep=self.cache)
        done = np.zeros(len(prompts), dtype=bool)
        for step in range(self.options.max_new_tokens):
            token = np.where(done, pad, pick(outputs["logits"], self.options, self.rng))
            yield token
            done |= np.isin(token, list(self.stop_ids))
            if done.all() or step == self.options.max_new_tokens - 1:
                return
            mask = np.concatenate([mask, np.ones((len(prompts), 1), dtype=np.int64)], axis=1)
            feed = {"input_ids": token[:, None].astype(np.int64), "attention_mask": mask,
                    "position_ids": mask.sum(axis=1, keepdims=True) - 1}
            feed.update({name.replace("present", "past_key_values"): value for name, value in outputs.items()
                         if name in self.cache})
            outputs = self.session.call("decode", feed, keep=self.cache)

    def _text(self, prompt: list[int], tokens: list[int]) -> tuple[str, bool]:
        """The text of the new tokens up to a stop token or stop string, and whether it stopped. Decoded
        after the prompt, so a token that continues the prompt's last word joins it instead of
        showing as a "##" piece."""
        stopped = next((i for i, t in enumerate(tokens) if t in self.stop_ids), None)
        decode = self.session.tokenizer.decode
        before = decode(prompt, skip_special_tokens=True)
        text = decode(prompt + tokens[:stopped], skip_special_tokens=True)
        text = text[len(before):].lstrip() if text.startswith(before) else decode(tokens[:stopped], skip_special_tokens=True)
        cuts = [text.index(s) for s in self.options.stop if s and s in text]
        return (text[:min(cuts)], True) if cuts else (text, stopped is not None)

    def run(self, prompts: list[str]) -> list[str]:
        step = self.session.manifest.shape_limits["batch"][2]
        texts = []
        for start in range(0, len(prompts), step):
            chunk = self.prompt_ids(prompts[start:start + step])
            tokens = np.array(list(self.steps(chunk))).T  # [rows, new tokens]
            texts += [self._text(prompt, row.tolist())[0] for prompt, row in zip(chunk, tokens)]
        return texts

    def stream(self, prompt: str) -> Iterator[str]:
        tokens: list[int] = []
        sent = ""
        prompt_ids = self.prompt_ids([prompt])
        for token in self.steps(prompt_ids):
            tokens.append(int(token[0]))
            text, stopped = self._text(prompt_ids[0], tokens)
            if text != sent:  # WordPiece may re-join a word: send only what is new at the end
                yield text[len(sent):] if text.startswith(sent) else text
                sent = text
            if stopped:
                return
