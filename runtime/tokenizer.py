"""Loading a MegatronBERT tokenizer with the `tokenizers` library: a tokenizer.json, or BERT's vocab.txt."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.implementations import BertWordPieceTokenizer

from .errors import UserError


def load_tokenizer(path: str | Path, lowercase: bool | None = None) -> Tokenizer:
    """`path` is a tokenizer.json, a WordPiece vocab.txt, or a directory holding either.

    For a vocab.txt, lower-casing comes from `lowercase`, else from `do_lower_case` in a
    tokenizer_config.json beside it, else True (BERT's uncased default). A tokenizer.json carries
    its own normalization, so `lowercase` must be None for it.
    """
    path = Path(path)
    if path.is_dir():
        found = next((path / n for n in ("tokenizer.json", "vocab.txt") if (path / n).exists()), None)
        if found is None:
            raise UserError(f"{path}: no tokenizer.json or vocab.txt in this directory")
        path = found
    if not path.exists():
        raise UserError(f"{path}: tokenizer file does not exist")
    if path.suffix == ".json":
        if lowercase is not None:
            raise UserError(f"{path}: a tokenizer.json sets its own lower-casing; drop the lowercase option")
        try:
            return Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception for malformed files
            raise UserError(f"{path}: not a valid tokenizer.json ({err})") from None
    if lowercase is None:
        lowercase = _lowercase_from_config(path.parent / "tokenizer_config.json")
    try:
        vocab = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 vocabulary file") from None
    missing = [t for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]") if t not in vocab]
    if missing:
        raise UserError(f"{path}: not a BERT WordPiece vocabulary (lacks {', '.join(missing)})")
    wordpiece = BertWordPieceTokenizer(str(path), lowercase=lowercase)
    return Tokenizer.from_str(wordpiece.to_str())


def _lowercase_from_config(config: Path) -> bool:
    if not config.exists():
        return True
    try:
        return bool(json.loads(config.read_text()).get("do_lower_case", True))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise UserError(f"{config}: not a valid tokenizer config ({err})") from None
