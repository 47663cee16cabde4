"""The built-in demo checkpoint: a small MegatronBERT with seeded random weights and a real WordPiece
vocabulary, so that every command runs on a fresh machine without downloading anything.
Its outputs are meaningless; it exists to show (and test) the pipeline end to end.
"""

from __future__ import annotations

from pathlib import Path

from .checkpoints import LoadedModel, random_model
from .config import MegatronBertConfig

VOCAB = Path(__file__).resolve().parent / "demo" / "vocab.txt"  # 1000 WordPiece tokens, lower-cased
SEED = 0


def demo_model(head: str, labels: list[str] | None = None) -> LoadedModel:
    vocab_size = len(VOCAB.read_text(encoding="utf-8").splitlines())
    config = MegatronBertConfig(vocab_size=vocab_size, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                intermediate_size=512, max_position_embeddings=512)
    if labels:
        config.id2label = dict(enumerate(labels))
    loaded = random_model(head, config, SEED)
    loaded.report.source = "demo"
    loaded.report.notes.append("demo weights are random (seed 0): outputs are meaningless; "
                               "pass --checkpoint PATH to export a trained model")
    return loaded
