"""Bad checkpoints and configs give one clear line naming the problem, never a bare traceback."""

import json
import zipfile

import pytest
import torch
from safetensors.torch import load_file, save_file

from exporter.sources import checkpoints
from exporter.model.config import MegatronBertConfig
from runtime.errors import UserError
from tests.conftest import CONFIGS, save_hf


def load_error(*args, **kwargs) -> str:
    with pytest.raises(UserError) as caught:
        checkpoints.load(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_missing_path(tmp_path):
    assert "no such checkpoint" in load_error("qa", tmp_path / "nowhere")


def test_missing_config_and_weights(tmp_path):
    save_hf("qa", tmp_path)
    (tmp_path / "model.safetensors").unlink()
    assert "no model.safetensors" in load_error("qa", tmp_path)
    (tmp_path / "config.json").unlink()
    assert "no config.json" in load_error("qa", tmp_path)


def test_missing_shard(tmp_path):
    model = save_hf("qa", tmp_path)
    (tmp_path / "model.safetensors").unlink()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    next(tmp_path.glob("model-*.safetensors")).unlink()
    assert "file is missing" in load_error("qa", tmp_path)


def test_truncated_safetensors(tmp_path):
    save_hf("qa", tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert "corrupt or truncated safetensors" in load_error("qa", tmp_path)


def test_truncated_pickle_and_zip(tmp_path):
    model = save_hf("qa", tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    data = (tmp_path / "pytorch_model.bin").read_bytes()
    (tmp_path / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    assert "corrupt or truncated" in load_error("qa", tmp_path)
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04 not really a zip")
    assert "corrupt or truncated zip" in load_error("qa", tmp_path / "bad.zip")
    with zipfile.ZipFile(tmp_path / "empty.zip", "w") as archive:
        archive.writestr("readme.txt", "nothing")
    assert "no .../mp_rank_00/model_optim_rng.pt" in load_error("qa", tmp_path / "empty.zip")


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path):
    save_hf("qa", tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["bert.encoder.layer.1.intermediate.dense.weight"] = torch.zeros(65, 32)
    save_file(state, tmp_path / "model.safetensors")
    message = load_error("qa", tmp_path)
    assert "bert.encoder.layer.1.intermediate.dense.weight has shape (65, 32), the config expects (64, 32)" in message


def test_missing_encoder_weight_is_always_an_error(tmp_path):
    save_hf("qa", tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["bert.encoder.layer.0.ln.weight"]
    save_file(state, tmp_path / "model.safetensors")
    assert "encoder weight bert.encoder.layer.0.ln.weight is missing" in load_error("qa", tmp_path, allow_random_head=True)


def test_pickled_code_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS["tiny"]))
    torch.save({"weights": torch.zeros(2), "payload": zipfile.ZipInfo("x")}, tmp_path / "pytorch_model.bin")
    assert "refusing to load" in load_error("qa", tmp_path)


def test_unknown_format(tmp_path):
    (tmp_path / "weights.h5").write_bytes(b"")
    assert "unknown checkpoint format" in load_error("qa", tmp_path / "weights.h5")


@pytest.mark.parametrize("change,message", [
    ({"add_cross_attention": True}, "add_cross_attention"),
    ({"hidden_size": 30}, "not divisible by num_attention_heads"),
    ({"hidden_act": "quick_gelu"}, "hidden_act 'quick_gelu' is not supported"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
    ({"model_type": "bert"}, "expected 'megatron-bert'"),
    ({"problem_type": "ranking"}, "problem_type 'ranking'"),
    ({"vocab_size": 0}, "vocab_size must be an integer from 1 to"),
    ({"num_hidden_layers": "3"}, "num_hidden_layers must be an integer from 1 to"),
    ({"layer_norm_eps": "x"}, "layer_norm_eps must be a number between 0.0 and 1.0, got 'x'"),
    ({"max_position_embeddings": 1e9}, "max_position_embeddings must be an integer from 1 to 65536"),
    ({"max_position_embeddings": 10**9}, "max_position_embeddings must be an integer from 1 to 65536"),
    ({"hidden_size": 2**20, "num_attention_heads": 1}, "hidden_size must be an integer from 1 to 32768"),
    ({"num_hidden_layers": 10000}, "num_hidden_layers must be an integer from 1 to 512"),
    ({"id2label": ["a", "b"]}, "id2label must be an object of labels"),
])
def test_unsupported_config_values(change, message, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**CONFIGS["tiny"], **change}))
    with pytest.raises(UserError, match=message):
        MegatronBertConfig.from_json_file(tmp_path / "config.json")


def test_config_reads_every_hf_field(tmp_path):
    data = {**CONFIGS["odd"], "hidden_act": "silu", "type_vocab_size": 3, "pad_token_id": 1, "is_decoder": True,
            "tie_word_embeddings": False, "problem_type": "multi_label_classification",
            "id2label": {"0": "neg", "1": "pos"}, "label2id": {"neg": 0, "pos": 1}, "num_labels": 2,
            "architectures": ["MegatronBertForSequenceClassification"], "transformers_version": "4.40.0"}
    (tmp_path / "config.json").write_text(json.dumps(data))
    config = MegatronBertConfig.from_json_file(tmp_path / "config.json")
    assert (config.hidden_act, config.type_vocab_size, config.pad_token_id, config.is_decoder,
            config.tie_word_embeddings, config.problem_type, config.num_labels, config.label2id) == (
        "silu", 3, 1, True, False, "multi_label_classification", 2, {"neg": 0, "pos": 1})
    assert MegatronBertConfig.from_hf_dict(config.to_hf_dict()) == config
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not a readable config"):
        MegatronBertConfig.from_json_file(tmp_path / "bad.json")


def test_a_zip_member_pointing_outside_the_archive_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as archive:
        archive.writestr("../../release/mp_rank_00/model_optim_rng.pt", b"x")
    assert "points outside the archive" in load_error("qa", tmp_path / "evil.zip")


def test_a_zip_bomb_is_refused_before_it_is_unpacked(tmp_path):
    """300 MiB of zeros in a zip of a few hundred KiB: refused from the member's declared sizes."""
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("release/mp_rank_00/model_optim_rng.pt", "w", force_zip64=True) as member:
            zeros = bytes(2**24)
            for _ in range(300 // 16):
                member.write(zeros)
    assert (tmp_path / "bomb.zip").stat().st_size < 2**21
    assert "weights do not compress like that" in load_error("qa", tmp_path / "bomb.zip")


def test_a_shard_index_pointing_outside_its_directory_is_refused(tmp_path):
    save_hf("qa", tmp_path)
    for target in ("../../../../etc/passwd", "/etc/passwd"):
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a.weight": target}}))
        assert f"shard {target} lies outside" in load_error("qa", tmp_path)


def test_a_model_beyond_this_machines_memory_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "available_memory", lambda: 2**30)
    config = MegatronBertConfig(**{**CONFIGS["tiny"], "hidden_size": 4096, "num_attention_heads": 32,
                                   "num_hidden_layers": 64})
    with pytest.raises(UserError, match=r"weights alone need 16\.2 GiB .* 1\.0 GiB available; pass "
                                        "--skip-memory-check"):
        checkpoints.random_model("qa", config)


LABEL_CONFIGS = {
    "a billion labels": dict(num_labels=10**9),
    "4M labels at hidden 1024": dict(num_labels=4_000_000, hidden_size=1024, num_attention_heads=16),
    "labels as text": dict(num_labels="abc"),
    "labels as 1e400": dict(num_labels=float("inf")),
    "label ids not integers": dict(id2label={"a": "x", "b": "y"}),
    "label2id a list": dict(label2id=["x", "y"]),
    "eos an empty list": dict(eos_token_id=[]),
}


@pytest.mark.parametrize("config", LABEL_CONFIGS.values(), ids=LABEL_CONFIGS.keys())
def test_label_fields_are_typed_and_bounded_before_any_allocation(tmp_path, config):
    (tmp_path / "config.json").write_text(json.dumps({**CONFIGS["tiny"], **config}))  # json writes inf as Infinity
    message = load_error("sequence-classification", tmp_path)
    assert message.startswith("config:"), message


def test_a_config_asking_for_a_billion_labels_exits_2_at_once_with_little_memory(tmp_path):
    """Through the CLI, as a user would run it: exit 2 in under 10 s, the process never above 1 GiB."""
    import subprocess
    import sys
    import time

    (tmp_path / "config.json").write_text(json.dumps({**CONFIGS["tiny"], "num_labels": 10**9}))
    cli = ("import resource, sys\nfrom exporter.cli import main\ncode = main(sys.argv[1:])\n"
           "print('peak', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, file=sys.stderr)\nsys.exit(code)")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", cli, "build", "--head", "sequence-classification",
                             "--checkpoint", str(tmp_path), "--out", str(tmp_path / "out"), "--eval-data", "none"],
                            capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - started
    assert result.returncode == 2 and "num_labels must be an integer from 1 to" in result.stderr, result.stderr
    peak = int(result.stderr.split("peak ")[1])
    assert seconds < 10 and peak < 2**30, (seconds, peak)
