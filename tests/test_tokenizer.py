"""Tokenizers load from vocab.txt or tokenizer.json, lower-case as configured, and mark pair segments."""

import json
import shutil

import pytest

from exporter.sources import demo
from runtime.errors import UserError
from runtime.tokenizer import load_tokenizer

DEMO_VOCAB = demo.VOCAB
QUESTION, CONTEXT = "Who won the Nobel Prize?", "Marie Curie won it in 1903."


def test_vocab_txt_matches_transformers_bert_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    shutil.copy(DEMO_VOCAB, tmp_path / "vocab.txt")
    ours = load_tokenizer(DEMO_VOCAB).encode(QUESTION, CONTEXT)
    theirs = transformers.BertTokenizerFast.from_pretrained(tmp_path, do_lower_case=True)(QUESTION, CONTEXT)
    assert ours.ids == theirs["input_ids"]
    assert ours.type_ids == theirs["token_type_ids"]


def test_pair_segments_and_special_tokens():
    encoding = load_tokenizer(DEMO_VOCAB).encode(QUESTION, CONTEXT)
    sep = encoding.tokens.index("[SEP]")
    assert encoding.tokens[0] == "[CLS]" and encoding.tokens[-1] == "[SEP]"
    assert set(encoding.type_ids[: sep + 1]) == {0} and set(encoding.type_ids[sep + 1:]) == {1}
    assert encoding.sequence_ids[1] == 0 and encoding.sequence_ids[-2] == 1


def test_lowercasing_from_flag_and_tokenizer_config(tmp_path):
    shutil.copy(DEMO_VOCAB, tmp_path / "vocab.txt")
    assert "marie" in load_tokenizer(tmp_path).encode("Marie").tokens  # BERT's uncased default
    assert "marie" not in load_tokenizer(tmp_path, lowercase=False).encode("Marie").tokens
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    assert "marie" not in load_tokenizer(tmp_path / "vocab.txt").encode("Marie").tokens
    assert "marie" in load_tokenizer(tmp_path, lowercase=True).encode("Marie").tokens


def test_tokenizer_json_round_trip(tmp_path):
    tokenizer = load_tokenizer(DEMO_VOCAB)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    shutil.copy(DEMO_VOCAB, tmp_path / "vocab.txt")
    again = load_tokenizer(tmp_path)  # a directory prefers tokenizer.json
    assert again.encode(QUESTION, CONTEXT).ids == tokenizer.encode(QUESTION, CONTEXT).ids
    with pytest.raises(UserError, match="sets its own lower-casing"):
        load_tokenizer(tmp_path / "tokenizer.json", lowercase=True)


@pytest.mark.parametrize("content,message", [
    (None, "does not exist"),
    ("hello\nworld\n", "not a BERT WordPiece vocabulary"),
])
def test_bad_vocab(tmp_path, content, message):
    if content is not None:
        (tmp_path / "vocab.txt").write_text(content)
    with pytest.raises(UserError, match=message):
        load_tokenizer(tmp_path / "vocab.txt")


def test_bad_tokenizer_json_and_empty_dir(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no tokenizer.json or vocab.txt"):
        load_tokenizer(tmp_path / "empty")
