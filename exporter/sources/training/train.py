"""Train the demo checkpoints from scratch: `python -m exporter.sources.training [--out DIR] [--quick]`.

1. The WordPiece vocabulary (exporter/sources/training/vocab.txt) was trained with `tokenizers` on the
   generated world's text and `recipes/data/corpus.txt`; `--new-vocabulary` trains it anew.
2. A small MegatronBERT is pretrained with masked LM + next-sentence prediction (the `pretraining`
   checkpoint, which also serves the mlm and nsp heads).
3. From that encoder: a left-to-right causal LM, one fine-tuned model per task head (qa,
   sequence-classification, token-classification, multiple-choice), each on generated examples, and
   a sentence-embedding encoder for the base head (contrastive, over paraphrases).
4. Every checkpoint is written as an ordinary Hugging Face directory (config.json, fp16
   model.safetensors, vocab.txt), and every head's held-out evaluation set (people the models never
   saw) and calibration set (the training distribution) as JSON lines under recipes/data/.

Seeded throughout, so a run on the same vocabulary reproduces the files (on the same CPU and torch).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer
from tokenizers.implementations import BertWordPieceTokenizer
from torch import Tensor

from runtime.tokenizer import load_tokenizer

from exporter.model.config import MegatronBertConfig
from exporter.model.megatron_bert import HeadModel, PreTrainingHeads, build_head, init_weights
from .world import HELD_OUT_NAMES, TRAIN_NAMES, World

ROOT = Path(__file__).resolve().parents[3]
CORPUS = ROOT / "recipes" / "data" / "corpus.txt"
DEMO_DIR = Path(__file__).resolve().parents[1] / "demo"
DATA_DIR = ROOT / "recipes" / "data"
VOCABULARY = Path(__file__).resolve().parent / "vocab.txt"  # trained once (--new-vocabulary), then kept
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD, UNK, CLS, SEP, MASK = range(5)
SEED = 0
VOCAB_SIZE = 2000
CONFIG: dict[str, Any] = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
              max_position_embeddings=128)
LABELS = {"sequence-classification": ["negative", "positive"],
          "token-classification": ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]}
# Steps per stage (full run; --quick divides them by 20 for a smoke test).
STEPS = {"pretraining": 1300, "causal-lm": 600, "qa": 1100, "token-classification": 200,
         "sequence-classification": 400, "multiple-choice": 500, "base": 300}
BATCH = 32
EVAL_SIZE = 200
CALIBRATION_SIZE = 64
Log = Callable[[str], None]


# ---- vocabulary and batches ------------------------------------------------------------------

def train_vocabulary(world: World, corpus: list[str], vocab: Path) -> None:
    """A WordPiece vocabulary of the world's text, written to `vocab`. Not reproducible: the tokenizers
    trainer breaks ties between equally frequent merges in no fixed order, hence VOCABULARY is kept."""
    texts = [world.document() for _ in range(20000)] + [world.entities()["text"] for _ in range(3000)]
    texts += [world.sentiment()["text"] for _ in range(2000)] + corpus
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    specials: list[Any] = list(SPECIALS)
    wordpiece.train_from_iterator(iter(texts), vocab_size=VOCAB_SIZE, special_tokens=specials, show_progress=False)
    with tempfile.TemporaryDirectory() as directory:
        wordpiece.save_model(directory)
        vocab.write_text((Path(directory) / "vocab.txt").read_text())


def pad(rows: list[list[int]], value: int = PAD) -> Tensor:
    length = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (length - len(r)) for r in rows], dtype=torch.long)


def encode(tokenizer: Tokenizer, items: list[Any]) -> dict[str, Tensor]:
    """input_ids, attention_mask, token_type_ids of texts or (text, pair) tuples, right-padded."""
    encodings = tokenizer.encode_batch(items)
    return {"input_ids": pad([e.ids for e in encodings]), "attention_mask": pad([e.attention_mask for e in encodings]),
            "token_type_ids": pad([e.type_ids for e in encodings])}


# ---- one training loop for every stage ---------------------------------------------------------

def train(model: HeadModel, loss_of: Callable[[HeadModel], Tensor], steps: int, lr: float, what: str, log: Log
          ) -> None:
    """AdamW with linear warm-up and cosine decay; `loss_of` draws a fresh batch each step."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))))
    start, running = time.perf_counter(), 0.0
    for step in range(1, steps + 1):
        loss = loss_of(model)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        running = 0.95 * running + 0.05 * loss.item() if step > 1 else loss.item()
        if step % max(1, steps // 10) == 0 or step == steps:
            log(f"  {what}: step {step}/{steps}, loss {running:.3f}, {time.perf_counter() - start:.0f} s")
    model.eval()


def mask_tokens(ids: Tensor, rng: torch.Generator, vocab: int) -> tuple[Tensor, Tensor]:
    """BERT's masking: 15% of ordinary tokens are predicted; of those 80% become [MASK], 10% a random
    token, 10% stay. Returns the masked ids and the labels (-100 where nothing is predicted)."""
    ordinary = ids > MASK
    chosen = (torch.rand(ids.shape, generator=rng) < 0.15) & ordinary
    labels = torch.where(chosen, ids, -100)
    roll = torch.rand(ids.shape, generator=rng)
    masked = torch.where(chosen & (roll < 0.8), MASK, ids)
    randoms = torch.randint(MASK + 1, vocab, ids.shape, generator=rng)
    return torch.where(chosen & (roll >= 0.8) & (roll < 0.9), randoms, masked), labels


def pretraining_loss(world: World, tokenizer: Tokenizer, corpus: list[str], rng: torch.Generator
                     ) -> Callable[[HeadModel], Tensor]:
    vocab = tokenizer.get_vocab_size()

    def loss_of(model: HeadModel) -> Tensor:
        items: list[str | tuple[str, str]] = []
        next_labels = []
        for _ in range(BATCH):
            kind = world.rng.random()
            if kind < 0.7:
                pair = world.sentence_pair()
                items.append((pair["a"], pair["b"]))
                next_labels.append(0 if pair["is_next"] else 1)
            elif kind < 0.85:  # single texts, as fill_mask sees them
                items.append(world.document())
                next_labels.append(-100)
            else:
                line = world.rng.randrange(len(corpus) - 1)
                is_next = world.rng.random() < 0.5
                items.append((corpus[line], corpus[line + 1] if is_next else world.rng.choice(corpus)))
                next_labels.append(0 if is_next else 1)
        batch = encode(tokenizer, items)
        batch["input_ids"], labels = mask_tokens(batch["input_ids"], rng, vocab)
        hidden, pooled, _ = model.bert(**batch)
        predicted = labels != -100
        heads = cast(PreTrainingHeads, model.cls)
        mlm = F.cross_entropy(heads.predictions(hidden[predicted]), labels[predicted])
        nsp = F.cross_entropy(heads.seq_relationship(pooled), torch.tensor(next_labels), ignore_index=-100)
        return mlm + nsp
    return loss_of


def causal_loss(world: World, tokenizer: Tokenizer, corpus: list[str]) -> Callable[[HeadModel], Tensor]:
    """Left to right over [CLS] text [SEP], as runtime generation feeds prompts ([SEP] ends a text)."""
    def loss_of(model: HeadModel) -> Tensor:
        texts = [world.document() if world.rng.random() < 0.85 else world.rng.choice(corpus) for _ in range(BATCH)]
        rows = [[CLS] + e.ids + [SEP] for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
        ids, mask = pad(rows), pad([[1] * len(r) for r in rows])
        logits, _ = model(ids, mask)
        targets = torch.where(mask[:, 1:].bool(), ids[:, 1:], -100)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return loss_of


def char_to_token(encoding: Any, sequence: int, start: int, end: int) -> tuple[int, int]:
    """The first and last token of `sequence` (0 or 1) overlapping characters [start, end)."""
    tokens = [i for i, (s, (a, b)) in enumerate(zip(encoding.sequence_ids, encoding.offsets))
              if s == sequence and a < end and b > start]
    return tokens[0], tokens[-1]


def qa_loss(world: World, tokenizer: Tokenizer) -> Callable[[HeadModel], Tensor]:
    def loss_of(model: HeadModel) -> Tensor:
        examples = [world.qa() for _ in range(BATCH)]
        encodings = tokenizer.encode_batch([(e["question"], e["context"]) for e in examples])
        spans = []
        for example, encoding in zip(examples, encodings):
            answer = example["answers"][0]
            found = re.search(rf"\b{re.escape(answer)}\b", example["context"])
            assert found, example
            spans.append(char_to_token(encoding, 1, found.start(), found.end()))
        batch = encode(tokenizer, [(e["question"], e["context"]) for e in examples])
        out = model(**batch)
        starts, ends = torch.tensor(spans).unbind(1)
        return (F.cross_entropy(out["start_logits"], starts) + F.cross_entropy(out["end_logits"], ends)) / 2
    return loss_of


def token_labels(encoding: Any, entities: list[dict[str, Any]], label2id: dict[str, int]) -> list[int]:
    """B- for an entity's first token, I- for the rest, O elsewhere; -100 for special and pad tokens."""
    labels = []
    for word, (a, b) in zip(encoding.word_ids, encoding.offsets):
        if word is None:
            labels.append(-100)
            continue
        entity = next((e for e in entities if e["start"] <= a < e["end"]), None)
        if entity is None:
            labels.append(label2id["O"])
        else:
            labels.append(label2id[("B-" if a == entity["start"] else "I-") + entity["entity_group"]])
    return labels


def token_classification_loss(world: World, tokenizer: Tokenizer, label2id: dict[str, int]
                              ) -> Callable[[HeadModel], Tensor]:
    def loss_of(model: HeadModel) -> Tensor:
        examples = [world.entities() for _ in range(BATCH)]
        encodings = tokenizer.encode_batch([e["text"] for e in examples])
        labels = pad([token_labels(enc, e["entities"], label2id) for enc, e in zip(encodings, examples)], -100)
        logits = model(**encode(tokenizer, [e["text"] for e in examples]))["logits"]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    return loss_of


def classification_loss(world: World, tokenizer: Tokenizer, label2id: dict[str, int]) -> Callable[[HeadModel], Tensor]:
    def loss_of(model: HeadModel) -> Tensor:
        examples = [world.sentiment() for _ in range(BATCH)]
        logits = model(**encode(tokenizer, [e["text"] for e in examples]))["logits"]
        return F.cross_entropy(logits, torch.tensor([label2id[e["label"]] for e in examples]))
    return loss_of


def multiple_choice_loss(world: World, tokenizer: Tokenizer) -> Callable[[HeadModel], Tensor]:
    def loss_of(model: HeadModel) -> Tensor:
        examples = [world.multiple_choice() for _ in range(BATCH // 4)]
        flat = encode(tokenizer, [(e["prompt"], c) for e in examples for c in e["choices"]])
        batch = {k: v.view(len(examples), 4, -1) for k, v in flat.items()}
        return F.cross_entropy(model(**batch)["logits"], torch.tensor([e["label"] for e in examples]))
    return loss_of


def embedding_loss(world: World, tokenizer: Tokenizer) -> Callable[[HeadModel], Tensor]:
    """Contrastive: each text's mean-pooled embedding should be nearest its paraphrase's among the batch's."""
    def loss_of(model: HeadModel) -> Tensor:
        pairs = [world.paraphrase() for _ in range(BATCH)]
        batch = encode(tokenizer, [p["text"] for p in pairs] + [p["match"] for p in pairs])
        hidden = model(**batch)["last_hidden_state"]
        mask = batch["attention_mask"][..., None].float()
        vectors = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        queries, documents = vectors[:BATCH], vectors[BATCH:]
        return F.cross_entropy(queries @ documents.T / 0.05, torch.arange(BATCH))
    return loss_of


# ---- checkpoints and data files ------------------------------------------------------------------

def save_checkpoint(model: HeadModel, directory: Path, vocab: Path) -> None:
    """An ordinary Hugging Face directory; weights in fp16 (the tied LM decoder is the embedding table)."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()
             if k != "cls.predictions.decoder.weight"}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = model.bert.config.to_hf_dict()
    config["is_decoder"] = model.bert.config.is_decoder
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "vocab.txt").write_text(vocab.read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}) + "\n")


def masked_example(world: World, tokenizer: Tokenizer, field: str) -> dict[str, Any]:
    """A document with one whole-word token masked, and that word (fill_mask's top-1 should be it)."""
    while True:
        text = world.document()
        words = [(m.start(), m.end()) for m in re.finditer(r"[A-Za-z]+|\d+", text)]
        start, end = world.rng.choice(words)
        if len(tokenizer.encode(text[start:end], add_special_tokens=False).ids) == 1:
            return {field: f"{text[:start]}[MASK]{text[end:]}", "answer": text[start:end].lower()}


def task_examples(head: str, world: World, tokenizer: Tokenizer) -> dict[str, Any]:
    """One example of `head`'s task, in the fields its runtime helper takes plus the gold answer."""
    if head == "qa":
        return world.qa()
    if head == "sequence-classification":
        return world.sentiment()
    if head == "token-classification":
        return world.entities()
    if head == "multiple-choice":
        return world.multiple_choice()
    if head == "nsp":
        return world.sentence_pair()
    if head in ("mlm", "pretraining"):
        return masked_example(world, tokenizer, "text" if head == "mlm" else "a")
    if head == "base":
        return world.paraphrase()
    return {"text": world.document()}  # causal-lm


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


HEADS = ("base", "mlm", "causal-lm", "nsp", "pretraining", "sequence-classification", "multiple-choice",
         "token-classification", "qa")


def write_task_sets(tokenizer: Tokenizer, data_dir: Path) -> None:
    """Every head's evaluation set (held-out people) and calibration set (the training distribution)."""
    for number, head in enumerate(HEADS):
        held_out = World(1000 + number, HELD_OUT_NAMES)
        write_jsonl(data_dir / "eval" / f"{head}.jsonl", [task_examples(head, held_out, tokenizer)
                                                          for _ in range(EVAL_SIZE)])
        seen = World(2000 + number, TRAIN_NAMES)
        write_jsonl(data_dir / "calibration" / f"{head}.jsonl", [task_examples(head, seen, tokenizer)
                                                                 for _ in range(CALIBRATION_SIZE)])


# ---- the whole run -------------------------------------------------------------------------------

def fine_tuned(head: str, encoder: HeadModel, config: MegatronBertConfig, seed: int) -> HeadModel:
    """`head` with the pretrained encoder's weights (and LM head, for the causal LM)."""
    model = build_head(head, config)
    init_weights(model, config.initializer_range, seed)
    shared = {k: v for k, v in encoder.state_dict().items() if k in model.state_dict()
              and v.shape == model.state_dict()[k].shape and k != "cls.predictions.decoder.weight"}
    model.load_state_dict(shared, strict=False)
    model.tie_weights()
    if head == "multiple-choice":  # start as the next-sentence scorer: logit "is next" minus logit "is not"
        with torch.no_grad():
            nsp = cast(PreTrainingHeads, encoder.cls).seq_relationship
            classifier = cast(torch.nn.Linear, model.classifier)
            classifier.weight.copy_(nsp.weight[:1] - nsp.weight[1:])
            classifier.bias.copy_(nsp.bias[:1] - nsp.bias[1:])
    return model


def run(out: Path, data_dir: Path, vocab: Path, new_vocabulary: bool, quick: bool, log: Log) -> None:
    torch.manual_seed(SEED)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    steps = {k: max(5, v // 20) if quick else v for k, v in STEPS.items()}
    corpus = [line.strip() for line in CORPUS.read_text().splitlines() if line.strip()]
    start = time.perf_counter()
    if new_vocabulary or not vocab.exists():
        log(f"- training a new WordPiece vocabulary into {vocab}")
        train_vocabulary(World(SEED, TRAIN_NAMES), corpus, vocab)
    tokenizer = load_tokenizer(vocab)
    write_task_sets(tokenizer, data_dir)
    base_config = MegatronBertConfig(vocab_size=tokenizer.get_vocab_size(), **CONFIG)
    rng = torch.Generator().manual_seed(SEED)

    log(f"- pretraining (masked LM + next sentence), {steps['pretraining']} steps")
    encoder = build_head("pretraining", base_config)
    init_weights(encoder, base_config.initializer_range, SEED)
    train(encoder, pretraining_loss(World(1, TRAIN_NAMES), tokenizer, corpus, rng), steps["pretraining"], 1e-3,
          "pretraining", log)
    save_checkpoint(encoder, out / "pretraining", vocab)

    stages: dict[str, tuple[Callable[[World], Callable[[HeadModel], Tensor]], float]] = {
        "causal-lm": (lambda w: causal_loss(w, tokenizer, corpus), 5e-4),
        "qa": (lambda w: qa_loss(w, tokenizer), 4e-4),
        "token-classification": (lambda w: token_classification_loss(
            w, tokenizer, {l: i for i, l in enumerate(LABELS["token-classification"])}), 5e-4),
        # At higher rates the [CLS]-pooled classifier stalls on the pretrained encoder, then diverges.
        "sequence-classification": (lambda w: classification_loss(
            w, tokenizer, {l: i for i, l in enumerate(LABELS["sequence-classification"])}), 2e-4),
        "multiple-choice": (lambda w: multiple_choice_loss(w, tokenizer), 3e-4),
        "base": (lambda w: embedding_loss(w, tokenizer), 2e-4),  # sentence embeddings (mean pooling)
    }
    for number, (head, (make_loss, lr)) in enumerate(stages.items(), 2):
        log(f"- {head}, {steps[head]} steps ({time.perf_counter() - start:.0f} s so far)")
        config = replace(base_config, id2label=dict(enumerate(LABELS.get(head, ["LABEL_0", "LABEL_1"]))))
        model = fine_tuned(head, encoder, config, SEED + number)
        train(model, make_loss(World(number, TRAIN_NAMES)), steps[head], lr, head, log)
        save_checkpoint(model, out / head, vocab)
    log(f"done in {time.perf_counter() - start:.0f} s: checkpoints in {out}, task sets in {data_dir}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exporter.sources.training", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEMO_DIR, help="where the checkpoints go (default: %(default)s)")
    parser.add_argument("--data", type=Path, default=DATA_DIR,
                        help="where eval/ and calibration/ sets go (default: %(default)s)")
    parser.add_argument("--vocabulary", type=Path, default=VOCABULARY,
                        help="the WordPiece vocab.txt to use (default: %(default)s)")
    parser.add_argument("--new-vocabulary", action="store_true",
                        help="train the vocabulary anew into --vocabulary first (not reproducible: see train_vocabulary)")
    parser.add_argument("--quick", action="store_true", help="1/20 of the steps: a smoke test, not a usable model")
    args = parser.parse_args(argv)
    random.seed(SEED)
    run(args.out, args.data, args.vocabulary, args.new_vocabulary, args.quick, lambda message: print(message, flush=True))
    return 0
