"""Our reference heads, loaded from checkpoints that transformers wrote, give transformers' outputs."""

import json

import pytest
import torch
from safetensors.torch import load_file

from exporter.sources import checkpoints
from exporter.model.config import MegatronBertConfig
from exporter.model.megatron_bert import ACTIVATIONS, HEAD_MODELS
from tests.conftest import CONFIGS, HEADS, head_inputs, hf_outputs, our_outputs, padded_batch, save_hf

TOLERANCE = 1e-5


def assert_close(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].shape == theirs[name].shape, name
        diff = (ours[name] - theirs[name]).abs().max().item()
        assert diff <= TOLERANCE, f"{name}: max abs difference {diff}"


@pytest.mark.parametrize("config_name", ["tiny", "odd"])
@pytest.mark.parametrize("head", HEADS)
def test_head_matches_transformers(head, config_name, tmp_path):
    reference = save_hf(head, tmp_path, config_name)
    loaded = checkpoints.load(head, tmp_path)
    assert loaded.report.kind == "huggingface" and loaded.report.unused == []
    inputs = head_inputs(head, padded_batch(CONFIGS[config_name]["vocab_size"]))
    assert_close(our_outputs(head, loaded.model, inputs), hf_outputs(head, reference, inputs))


def test_every_head_and_activation_has_an_implementation():
    from exporter.model.config import ACTIVATIONS as NAMES

    assert set(HEAD_MODELS) == set(HEADS)
    assert set(NAMES) == set(ACTIVATIONS)


@pytest.mark.parametrize("hidden_act", ["relu", "silu"])
def test_other_activations_match(hidden_act, tmp_path):
    reference = save_hf("mlm", tmp_path, hidden_act=hidden_act)
    inputs = padded_batch(CONFIGS["tiny"]["vocab_size"])
    assert_close(our_outputs("mlm", checkpoints.load("mlm", tmp_path).model, inputs), hf_outputs("mlm", reference, inputs))


def test_sharded_safetensors(tmp_path):
    reference = save_hf("qa", tmp_path, "odd")
    state = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    reference.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    loaded = checkpoints.load("qa", tmp_path)
    assert loaded.model.state_dict().keys() >= state.keys()
    inputs = padded_batch(CONFIGS["odd"]["vocab_size"])
    assert_close(our_outputs("qa", loaded.model, inputs), hf_outputs("qa", reference, inputs))


def test_pytorch_model_bin_with_legacy_decoder_bias(tmp_path):
    """Older HF checkpoints are pickled state dicts that also carry cls.predictions.decoder.bias."""
    reference = save_hf("pretraining", tmp_path)
    state = reference.state_dict()
    assert "cls.predictions.decoder.bias" in state
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    loaded = checkpoints.load("pretraining", tmp_path)
    assert loaded.report.unused == []
    inputs = padded_batch(CONFIGS["tiny"]["vocab_size"])
    assert_close(our_outputs("pretraining", loaded.model, inputs), hf_outputs("pretraining", reference, inputs))


def test_untied_decoder(tmp_path):
    reference = save_hf("mlm", tmp_path, tie_word_embeddings=False)
    loaded = checkpoints.load("mlm", tmp_path)
    decoder, words = loaded.model.cls.predictions.decoder.weight, loaded.model.bert.embeddings.word_embeddings.weight
    assert decoder.data_ptr() != words.data_ptr() and not torch.equal(decoder, words)
    inputs = padded_batch(CONFIGS["tiny"]["vocab_size"])
    assert_close(our_outputs("mlm", loaded.model, inputs), hf_outputs("mlm", reference, inputs))


def test_base_checkpoint_as_qa_reports_and_needs_permission(tmp_path):
    save_hf("base", tmp_path)
    with pytest.raises(checkpoints.CheckpointError, match=r"no weights for this head \(qa_outputs.bias, qa_outputs.weight\)"):
        checkpoints.load("qa", tmp_path)
    loaded = checkpoints.load("qa", tmp_path, allow_random_head=True)
    assert loaded.report.randomly_initialized == ["qa_outputs.bias", "qa_outputs.weight"]
    assert loaded.report.unused == ["bert.pooler.dense.bias", "bert.pooler.dense.weight"]
    assert loaded.model.qa_outputs.weight.abs().sum() > 0  # seeded random init, not zeros


def test_classification_configs_load(tmp_path):
    """Single-label, multi-label and regression configs all load; only post-processing differs."""
    for problem_type, labels in [("single_label_classification", 3), ("multi_label_classification", 4),
                                 ("regression", 1)]:
        directory = tmp_path / problem_type
        save_hf("sequence-classification", directory, num_labels=labels, problem_type=problem_type)
        loaded = checkpoints.load("sequence-classification", directory)
        assert loaded.config.problem_type == problem_type and loaded.config.num_labels == labels
        data = json.loads((directory / "config.json").read_text())
        assert loaded.config.id2label == {int(k): v for k, v in data["id2label"].items()}


def test_random_init_is_seeded():
    config = MegatronBertConfig.from_hf_dict(CONFIGS["odd"])
    a, b, c = (checkpoints.random_model("pretraining", config, seed) for seed in (7, 7, 8))
    for name, tensor in a.model.state_dict().items():
        assert torch.equal(tensor, b.model.state_dict()[name]), name
    assert a.report.sha256 == b.report.sha256 != c.report.sha256
    assert not torch.equal(a.model.bert.embeddings.word_embeddings.weight, c.model.bert.embeddings.word_embeddings.weight)
