"""Megatron-LM checkpoints split by tensor and pipeline parallelism load to exactly the unsplit model.

The split here is written from Megatron-LM's documented layout, independently of the merge: each
tensor-parallel rank holds its own heads of the fused query_key_value (rows in the checkpoint version's
order), its slice of the column-parallel rows, row-parallel columns and vocabulary, and a copy of the
rest; each pipeline stage holds consecutive layers numbered from 0, the first the embeddings, the last
the final LayerNorm, the heads and a copy of the word embeddings for the LM head.
"""

import argparse
import re
import shutil
import zipfile

import numpy as np
import pytest
import torch

from conftest import CONFIGS, run_onnx, save_hf
from exporter.sources import checkpoints
from exporter.cli import main
from runtime.manifest import Manifest
from tests.test_megatron_checkpoint import megatron_state

# One test process runs this module (pytest-xdist), so that its reference model and checkpoint folder are made once.
pytestmark = pytest.mark.xdist_group("test_megatron_parallel")

CONFIG = CONFIGS["tiny"]  # 4 heads, 2 layers, intermediate 64, vocabulary 128
HEADS = CONFIG["num_attention_heads"]


def split_tensor(name, tensor, ranks, version):
    if re.search(r"attention\.query_key_value\.", name):
        if version == 0:  # rows [3, heads, head_size]: each rank takes its heads inside q, k and v
            rest = tensor.shape[1:]
            return [p.reshape(-1, *rest) for p in tensor.view(3, HEADS, -1, *rest).chunk(ranks, dim=1)]
        return list(tensor.chunk(ranks, dim=0))  # heads outermost
    if re.search(r"mlp\.dense_h_to_4h\.", name) or name in (
            "language_model.embedding.word_embeddings.weight", "lm_head.bias", "word_embeddings_for_head.weight"):
        return list(tensor.chunk(ranks, dim=0))
    if re.search(r"(attention\.dense|mlp\.dense_4h_to_h)\.weight$", name):
        return list(tensor.chunk(ranks, dim=1))
    return [tensor.clone() for _ in range(ranks)]


def stage_of(name, stages, layers):
    """Which stage holds a tensor, and its name there."""
    layer = re.match(r"^(.*\.layers\.)(\d+)(\..*)$", name)
    if layer:
        per_stage = layers // stages
        index = int(layer.group(2))
        return index // per_stage, f"{layer.group(1)}{index % per_stage}{layer.group(3)}"
    last = name.startswith(("language_model.transformer.final", "language_model.encoder.final", "language_model.pooler",
                            "lm_head", "binary_head", "word_embeddings_for_head"))
    return (stages - 1 if last else 0), name


def nest(flat):
    tree = {}
    for name, tensor in flat.items():
        *path, leaf = name.split(".")
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = tensor
    return tree


def write_split(folder, flat, args, version, tensor_ranks, stages, iteration="release"):
    """A Megatron-LM checkpoint folder: the tracker file and iteration/mp_rank_TT[_PPP]/model_optim_rng.pt."""
    if stages > 1:
        flat = {**flat, "word_embeddings_for_head.weight": flat["language_model.embedding.word_embeddings.weight"]}
    shards = {}
    for name, tensor in flat.items():
        stage, local = stage_of(name, stages, args.num_layers)
        for rank, piece in enumerate(split_tensor(name, tensor, tensor_ranks, version)):
            shards.setdefault((rank, stage), {})[local] = piece.clone()
    folder.mkdir(parents=True)
    (folder / "latest_checkpointed_iteration.txt").write_text("release" if iteration == "release" else str(iteration))
    iteration_folder = folder / ("release" if iteration == "release" else f"iter_{iteration:07d}")
    for (rank, stage), state in shards.items():
        rank_folder = iteration_folder / (f"mp_rank_{rank:02d}" + (f"_{stage:03d}" if stages > 1 else ""))
        rank_folder.mkdir(parents=True)
        torch.save({"model": nest(state), "args": args, "checkpoint_version": version,
                    "optimizer": {"state": {"0": torch.zeros(3)}}}, rank_folder / "model_optim_rng.pt")
    return folder


def megatron_args(tensor_ranks=1, stages=1):
    return argparse.Namespace(padded_vocab_size=CONFIG["vocab_size"], hidden_size=CONFIG["hidden_size"],
                              num_layers=CONFIG["num_hidden_layers"], num_attention_heads=HEADS,
                              ffn_hidden_size=CONFIG["intermediate_size"],
                              max_position_embeddings=CONFIG["max_position_embeddings"],
                              tensor_model_parallel_size=tensor_ranks, pipeline_model_parallel_size=stages)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    return folder, save_hf("pretraining", folder).state_dict()


@pytest.fixture(scope="module")
def reference(hf_folder):
    return hf_folder[1]


def flat_megatron(reference, version):
    encoder, attention = ("encoder", "self_attention") if version >= 3 else ("transformer", "attention")
    return checkpoints.flatten(megatron_state(reference, HEADS, version, encoder, attention))


@pytest.mark.parametrize("version", [0, 1.0, 3.0])
@pytest.mark.parametrize("tensor_ranks,stages", [(2, 1), (4, 1), (1, 2), (2, 2)])
def test_split_checkpoints_merge_to_exactly_the_unsplit_model(reference, tmp_path, version, tensor_ranks, stages):
    flat = flat_megatron(reference, version)
    whole = tmp_path / "whole.pt"
    torch.save({"model": nest(flat), "args": megatron_args(), "checkpoint_version": version}, whole)
    split = write_split(tmp_path / "split", flat, megatron_args(tensor_ranks, stages), version, tensor_ranks, stages)
    expected = checkpoints.load("pretraining", whole).model.state_dict()
    loaded = checkpoints.load("pretraining", split)
    assert loaded.report.kind == "megatron" and loaded.report.unused == []
    merged = loaded.model.state_dict()
    assert merged.keys() == expected.keys()
    for name in expected:
        assert torch.equal(merged[name], expected[name]), name


def test_cli_builds_a_split_checkpoint_to_the_same_graph_outputs(reference, hf_folder, tmp_path):
    """A 2 x 2 folder of iteration 1000 and a 4-way zip, built by the CLI: outputs identical to the unsplit one's."""
    flat = flat_megatron(reference, 3.0)
    torch.save({"model": nest(flat), "args": megatron_args(), "checkpoint_version": 3.0}, tmp_path / "whole.pt")
    write_split(tmp_path / "folder", flat, megatron_args(2, 2), 3.0, 2, 2, iteration=1000)
    zipped = write_split(tmp_path / "zipped", flat_megatron(reference, 1.0), megatron_args(4), 1.0, 4, 1)
    with zipfile.ZipFile(tmp_path / "zipped.zip", "w") as archive:
        for file in zipped.rglob("*"):
            if file.is_file():
                archive.write(file, f"megatron_bert/{file.relative_to(zipped)}")
    torch.save({"model": nest(flat_megatron(reference, 1.0)), "args": megatron_args(), "checkpoint_version": 1.0},
               tmp_path / "whole-v1.pt")
    outputs = {}
    for name, source in (("whole", "whole.pt"), ("folder", "folder"), ("whole-v1", "whole-v1.pt"), ("zipped", "zipped.zip")):
        assert main(["build", "--head", "pretraining", "--checkpoint", str(tmp_path / source), "--name", name,
                     "--tokenizer", str(hf_folder[0] / "vocab.txt"), "--out", str(tmp_path / "out"),
                     "--eval-data", "none", "--max-sequence", "32"]) == 0
        manifest_path = (tmp_path / "out" / f"{name}.json").resolve()
        feed = {"input_ids": np.arange(3, 19, dtype=np.int64)[None], "attention_mask": np.ones((1, 16), np.int64),
                "token_type_ids": np.zeros((1, 16), np.int64)}
        graph = manifest_path.parent / Manifest.load(manifest_path).graphs["model"]["file"]
        outputs[name] = run_onnx(graph, feed)
    for split, whole in (("folder", "whole"), ("zipped", "whole-v1")):
        for output in outputs[whole]:
            assert np.array_equal(outputs[split][output], outputs[whole][output]), (split, output)


def build_error(capsys, checkpoint) -> str:
    assert main(["build", "--head", "pretraining", "--checkpoint", str(checkpoint), "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_a_missing_rank_another_shape_or_uncovered_layers_are_named(reference, tmp_path, capsys):
    flat = flat_megatron(reference, 3.0)
    made = write_split(tmp_path / "missing", flat, megatron_args(2, 2), 3.0, 2, 2)
    shutil.rmtree(made / "release" / "mp_rank_01_001")
    assert "rank mp_rank_01_001 missing" in build_error(capsys, made)

    made = write_split(tmp_path / "fewer", flat, megatron_args(4), 3.0, 4, 1)
    for rank in ("mp_rank_02", "mp_rank_03"):
        shutil.rmtree(made / "release" / rank)
    assert "tensor_model_parallel_size 4" in build_error(capsys, made)

    made = write_split(tmp_path / "shape", flat, megatron_args(2), 3.0, 2, 1)
    rank = made / "release" / "mp_rank_01" / "model_optim_rng.pt"
    checkpoint = torch.load(rank, weights_only=False)
    checkpoint["model"]["language_model"]["encoder"]["layers"]["1"]["mlp"]["dense_h_to_4h"]["weight"] = torch.zeros(8, 32)
    torch.save(checkpoint, rank)
    error = build_error(capsys, made)
    assert "mp_rank_01 has language_model.encoder.layers.1.mlp.dense_h_to_4h.weight of shape [8, 32]" in error

    checkpoint = torch.load(made / "release" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
    checkpoint["model"]["language_model"]["encoder"]["final_layernorm"]["weight"] += 1
    torch.save(checkpoint, rank)
    assert "final_layernorm.weight differs between mp_rank_00 and mp_rank_01" in build_error(capsys, made)

    made = write_split(tmp_path / "stages", flat, megatron_args(1, 2), 3.0, 1, 2)
    args = megatron_args(1, 1)  # a stage lost, with args that no longer say there were two
    args.num_layers = CONFIG["num_hidden_layers"]
    checkpoint = torch.load(made / "release" / "mp_rank_00_000" / "model_optim_rng.pt", weights_only=False)
    checkpoint["args"] = args
    shutil.rmtree(made / "release" / "mp_rank_00_001")
    torch.save(checkpoint, made / "release" / "mp_rank_00_000" / "model_optim_rng.pt")
    assert "the pipeline stages hold 1 layers, the checkpoint's args say 2" in build_error(capsys, made)

    (made / "latest_checkpointed_iteration.txt").write_text("2000")
    assert "names iter_0002000, which holds no mp_rank_* folders" in build_error(capsys, made)
