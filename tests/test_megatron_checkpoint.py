"""NVIDIA's Megatron checkpoints (the NGC release layout) load to the same outputs as the HF weights."""

import argparse
import enum
import sys
import types
import zipfile

import pytest
import torch

from exporter.cli import main
from exporter.sources import checkpoints
from exporter.model.config import MegatronBertConfig
from tests.conftest import CONFIGS, hf_outputs, our_outputs, padded_batch, save_hf


def fuse_qkv(q, k, v, heads, version):
    """HF's separate q/k/v -> Megatron's fused rows, in the documented order for each version."""
    rows = torch.stack([q, k, v])  # [3, heads * head_size, ...]
    rest = rows.shape[2:]
    rows = rows.view(3, heads, -1, *rest)  # [3, heads, head_size, ...]
    if version == 0:
        fused = rows
    elif version < 2:
        fused = rows.permute(1, 2, 0, *range(3, rows.dim()))  # [heads, head_size, 3, ...]
    else:
        fused = rows.permute(1, 0, 2, *range(3, rows.dim()))  # [heads, 3, head_size, ...]
    return fused.reshape(-1, *rest)


def megatron_state(hf_state, heads, version, encoder="transformer", attention="attention", vocab_pad=0):
    def pad(t):
        return torch.cat([t, torch.zeros(vocab_pad, *t.shape[1:])]) if vocab_pad else t

    emb = "bert.embeddings."
    layers = {}
    n_layers = len({k.split(".")[3] for k in hf_state if k.startswith("bert.encoder.layer.")})
    for i in range(n_layers):
        hf = f"bert.encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = (hf_state[f"{hf}attention.self.{p}.{kind}"] for p in ("query", "key", "value"))
            layers[f"layers.{i}.{attention}.query_key_value.{kind}"] = fuse_qkv(q, k, v, heads, version)
            layers[f"layers.{i}.input_layernorm.{kind}"] = hf_state[f"{hf}attention.ln.{kind}"]
            layers[f"layers.{i}.{attention}.dense.{kind}"] = hf_state[f"{hf}attention.output.dense.{kind}"]
            layers[f"layers.{i}.post_attention_layernorm.{kind}"] = hf_state[f"{hf}ln.{kind}"]
            layers[f"layers.{i}.mlp.dense_h_to_4h.{kind}"] = hf_state[f"{hf}intermediate.dense.{kind}"]
            layers[f"layers.{i}.mlp.dense_4h_to_h.{kind}"] = hf_state[f"{hf}output.dense.{kind}"]
    layers["final_layernorm.weight"] = hf_state["bert.encoder.ln.weight"]
    layers["final_layernorm.bias"] = hf_state["bert.encoder.ln.bias"]
    return {
        "language_model": {
            "embedding": {
                "word_embeddings": {"weight": pad(hf_state[emb + "word_embeddings.weight"])},
                "position_embeddings": {"weight": hf_state[emb + "position_embeddings.weight"]},
                "tokentype_embeddings": {"weight": hf_state[emb + "token_type_embeddings.weight"]},
            },
            encoder: layers,
            "pooler": {"dense.weight": hf_state["bert.pooler.dense.weight"],
                       "dense.bias": hf_state["bert.pooler.dense.bias"]},
        },
        "lm_head": {
            "dense.weight": hf_state["cls.predictions.transform.dense.weight"],
            "dense.bias": hf_state["cls.predictions.transform.dense.bias"],
            "layernorm.weight": hf_state["cls.predictions.transform.LayerNorm.weight"],
            "layernorm.bias": hf_state["cls.predictions.transform.LayerNorm.bias"],
            "bias": pad(hf_state["cls.predictions.bias"]),
        },
        "binary_head": {"weight": hf_state["cls.seq_relationship.weight"],
                        "bias": hf_state["cls.seq_relationship.bias"]},
    }


@pytest.fixture
def megatron_lm_classes():
    """A stand-in `megatron` package whose class gets pickled into args, then is uninstalled."""
    module = types.ModuleType("megatron.model.enums")

    class AttnMaskType(enum.Enum):
        padding = 1

    AttnMaskType.__module__, AttnMaskType.__qualname__ = module.__name__, "AttnMaskType"
    module.AttnMaskType = AttnMaskType
    names = ["megatron", "megatron.model", "megatron.model.enums"]
    for name in names:
        sys.modules[name] = module
    yield AttnMaskType
    for name in names:
        sys.modules.pop(name, None)


def write_release_zip(path, checkpoint):
    pt = path.parent / "model_optim_rng.pt"
    torch.save(checkpoint, pt)
    with zipfile.ZipFile(path, "w") as archive:
        archive.write(pt, "release/mp_rank_00/model_optim_rng.pt")
        archive.writestr("latest_checkpointed_iteration.txt", "release")
    pt.unlink()


@pytest.mark.parametrize("version,encoder,attention", [
    (0, "transformer", "attention"),
    (1.0, "transformer", "attention"),
    (2.0, "transformer", "attention"),
    (3.0, "encoder", "self_attention"),
])
def test_release_zip_matches_hf(version, encoder, attention, tmp_path, megatron_lm_classes):
    config = CONFIGS["odd"]
    reference = save_hf("pretraining", tmp_path / "hf", "odd")
    args = argparse.Namespace(padded_vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
                              num_layers=config["num_hidden_layers"], ffn_hidden_size=config["intermediate_size"],
                              num_attention_heads=config["num_attention_heads"],
                              max_position_embeddings=config["max_position_embeddings"],
                              attn_mask_type=megatron_lm_classes.padding)
    checkpoint = {"model": megatron_state(reference.state_dict(), config["num_attention_heads"], version,
                                          encoder, attention),
                  "args": args, "checkpoint_version": version, "iteration": 1000}
    write_release_zip(tmp_path / "megatron.zip", checkpoint)

    # Neither the Megatron-LM class nor the HF config is available to the loader.
    for name in [n for n in sys.modules if n.startswith("megatron")]:
        sys.modules.pop(name)
    hf_config = MegatronBertConfig.from_json_file(tmp_path / "hf" / "config.json")
    loaded = checkpoints.load("pretraining", tmp_path / "megatron.zip")
    assert loaded.report.kind == "megatron" and loaded.report.unused == []
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "intermediate_size", "max_position_embeddings", "type_vocab_size"):
        assert getattr(loaded.config, field) == getattr(hf_config, field), field
    loaded.config.hidden_act, loaded.config.layer_norm_eps = hf_config.hidden_act, hf_config.layer_norm_eps

    # The activation and epsilon are not in Megatron's args, so compare with them given explicitly too.
    explicit = checkpoints.load("pretraining", tmp_path / "megatron.zip", config=hf_config)
    inputs = padded_batch(config["vocab_size"])
    ours, theirs = our_outputs("pretraining", explicit.model, inputs), hf_outputs("pretraining", reference, inputs)
    for name in ours:
        assert (ours[name] - theirs[name]).abs().max().item() <= 1e-5, name


def test_bare_pt_without_args_is_refused_until_a_config_states_the_head_count(tmp_path):
    config = CONFIGS["tiny"]
    reference = save_hf("pretraining", tmp_path / "hf")
    state = megatron_state(reference.state_dict(), config["num_attention_heads"], 3.0, vocab_pad=64)
    torch.save({"model": state, "checkpoint_version": 3.0}, tmp_path / "model_optim_rng.pt")

    with pytest.raises(checkpoints.CheckpointError, match="num_attention_heads.*--config"):
        checkpoints.load("pretraining", tmp_path / "model_optim_rng.pt")

    # Just the fields the checkpoint lacks: the rest (shapes, padded vocabulary cut) comes from the weights.
    partial = {k: config[k] for k in ("num_attention_heads", "vocab_size")}
    loaded = checkpoints.load("pretraining", tmp_path / "model_optim_rng.pt", config=partial)
    assert any("cut to" in note for note in loaded.report.notes)
    inputs = padded_batch(config["vocab_size"])
    ours, theirs = our_outputs("pretraining", loaded.model, inputs), hf_outputs("pretraining", reference, inputs)
    for name in ours:
        assert (ours[name] - theirs[name]).abs().max().item() <= 1e-5, name

    with pytest.raises(checkpoints.CheckpointError, match="config says hidden_size 64, the checkpoint has 32"):
        checkpoints.load("pretraining", tmp_path / "model_optim_rng.pt", config={**partial, "hidden_size": 64})


def test_qkv_split_orders():
    heads, head_size = 2, 3
    q, k, v = (torch.arange(heads * head_size) + 100 * i for i in range(3))
    for version in (0, 1.0, 2.0, 3.0):
        fused = fuse_qkv(q, k, v, heads, version)
        assert [t.tolist() for t in checkpoints.split_qkv(fused, heads, version)] == [q.tolist(), k.tolist(), v.tolist()]


def test_cli_builds_a_megatron_zip_with_config_and_refuses_it_without(tmp_path, capsys):
    """The exported graph of `build --checkpoint megatron.zip --config config.json` gives the true model's
    outputs; without the config, the head count is not guessed (exit 2 naming the field and the flag)."""
    import json

    from runtime import Session

    config = CONFIGS["odd"]
    reference = save_hf("pretraining", tmp_path / "hf", "odd")
    state = megatron_state(reference.state_dict(), config["num_attention_heads"], 3.0, "encoder", "self_attention")
    write_release_zip(tmp_path / "megatron.zip", {"model": state, "checkpoint_version": 3.0})
    (tmp_path / "config.json").write_text(json.dumps(
        {k: config[k] for k in ("num_attention_heads", "hidden_act", "layer_norm_eps")}))
    command = ["build", "--head", "pretraining", "--checkpoint", str(tmp_path / "megatron.zip"), "--tokenizer",
               str(tmp_path / "hf" / "vocab.txt"), "--max-batch", "2", "--max-sequence", "16", "--eval-data", "none",
               "--out", str(tmp_path / "out")]

    capsys.readouterr()  # what making the checkpoint printed
    assert main(command) == 2
    refused = capsys.readouterr().err
    assert "Traceback" not in refused and len(refused.strip().splitlines()) == 1, refused
    assert "num_attention_heads" in refused and "--config" in refused
    assert not (tmp_path / "out").exists()

    assert main([*command, "--config", str(tmp_path / "config.json")]) == 0
    inputs = padded_batch(config["vocab_size"])
    outputs = Session(tmp_path / "out" / "pretraining.json").run({k: v.numpy() for k, v in inputs.items()})
    for name, expected in hf_outputs("pretraining", reference, inputs).items():
        assert abs(outputs[name] - expected.numpy()).max() <= 1e-4, name
