"""The built-in demo checkpoints, so that every command runs on a fresh machine without downloading anything.

- `demo` (the default): small MegatronBERTs trained here from scratch by `python -m exporter.sources.training`
  on a generated world of facts (people, places, dates, quantities), shipped as ordinary Hugging Face
  directories under exporter/sources/demo/. They really answer questions, tag entities, classify sentiment and
  continue text, so fp16 and int8 are judged by task accuracy on held-out evaluation sets.
- `demo-random`: the same small shape with seeded random weights and the 1000-token vocabulary
  exporter/sources/demo/vocab.txt; its outputs are meaningless (for speed and plumbing tests only).
"""

from __future__ import annotations

from pathlib import Path

from exporter.sources.checkpoints import LoadedModel, random_model
from exporter.model.config import MegatronBertConfig

DIRECTORY = Path(__file__).resolve().parent / "demo"
VOCAB = DIRECTORY / "vocab.txt"  # demo-random's: 1000 WordPiece tokens, lower-cased
SEED = 0
# The pretraining checkpoint (masked LM + next sentence) serves the heads that are parts of it.
TRAINED = {"base": "base", "mlm": "pretraining", "nsp": "pretraining", "pretraining": "pretraining",
           "causal-lm": "causal-lm", "qa": "qa", "sequence-classification": "sequence-classification",
           "token-classification": "token-classification", "multiple-choice": "multiple-choice"}


def resolve(checkpoint: str, head: str) -> str:
    """"demo" -> the trained demo checkpoint directory of `head`; anything else as given."""
    return str(DIRECTORY / TRAINED[head]) if checkpoint == "demo" else checkpoint


def random_demo_model(head: str, labels: list[str] | None = None) -> LoadedModel:
    vocab_size = len(VOCAB.read_text(encoding="utf-8").splitlines())
    config = MegatronBertConfig(vocab_size=vocab_size, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                intermediate_size=512, max_position_embeddings=512)
    if labels:
        config.id2label = dict(enumerate(labels))
    loaded = random_model(head, config, SEED)
    loaded.report.source = "demo-random"
    loaded.report.notes.append("demo-random weights are random (seed 0): outputs are meaningless; "
                               "use --checkpoint demo (trained) or pass --checkpoint PATH")
    return loaded
