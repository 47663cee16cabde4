"""The released 345M configuration: our reference qa head equals transformers' on the same weights."""

import pytest
import torch

from exporter import checkpoints
from exporter.config import MegatronBertConfig
from tests.conftest import hf_outputs, padded_batch

pytestmark = pytest.mark.slow


def test_345m_qa_matches_transformers():
    transformers = pytest.importorskip("transformers")
    loaded = checkpoints.random_model("qa", MegatronBertConfig(), seed=0)
    assert sum(p.numel() for p in loaded.model.parameters()) > 330e6
    reference = transformers.MegatronBertForQuestionAnswering(
        transformers.MegatronBertConfig(**loaded.config.to_hf_dict())).eval()
    result = reference.load_state_dict(loaded.model.state_dict(), strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    inputs = padded_batch(loaded.config.vocab_size, batch=2, length=128)
    with torch.no_grad():
        ours = loaded.model(**inputs)
    theirs = hf_outputs("qa", reference, inputs)
    for name in ours:
        assert (ours[name] - theirs[name]).abs().max().item() <= 1e-4, name
