"""The released 345M configuration: our reference qa head equals transformers' on the same weights."""

from pathlib import Path

import pytest
import torch

from exporter.sources import checkpoints
from exporter.model.config import MegatronBertConfig
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


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_345m_qa_low_precision_within_bounds(tmp_path, precision):
    """The realistic size in fp16 and int8, validated against PyTorch (benchmarks/qa-345m.toml explains
    its int8 bound for random weights)."""
    from exporter.pipeline.build import BuildOptions, build
    from runtime.manifest import Manifest

    recipe = Path(__file__).resolve().parent.parent / "benchmarks" / "qa-345m.toml"
    path = build(BuildOptions(head="qa", precision=precision, recipe=str(recipe), out=tmp_path), log=print)
    manifest = Manifest.load(path)
    bounds = manifest.validation["tolerance"]
    assert manifest.validation["passed"]
    for row in (c for c in manifest.validation["cases"] if c["case"] == "all"):
        assert row["cosine"] >= bounds["min_cosine"] and row["argmax"] >= bounds["min_argmax"], row
