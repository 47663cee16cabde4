"""Megatron-LM checkpoints saved across tensor-parallel ranks and pipeline stages, merged into one.

Megatron-LM writes `latest_checkpointed_iteration.txt` ("release" or the iteration N) beside
`release/` or `iter_NNNNNNN/`, which holds `mp_rank_TT/model_optim_rng.pt` per tensor-parallel rank TT,
or `mp_rank_TT_PPP/` with pipeline stages PPP. Tensor parallelism splits
- column-parallel layers along their output rows, weight and bias: the fused query_key_value (each
  rank holds its own heads' q, k and v, in the checkpoint version's row order) and mlp.dense_h_to_4h;
- row-parallel layers along their input columns: the attention's output dense and mlp.dense_4h_to_h
  (their biases are whole on every rank);
- the vocabulary: the word embeddings (and the last stage's copy for the LM head) and the LM head's bias;
and keeps everything else whole on every rank, so those must be equal. Pipeline stages hold consecutive
layers, each stage numbering its own from 0. The functions here see flat Megatron state dicts and folder
names; reading the files (rank by rank) is exporter.sources.checkpoints'. Their errors name the rank or tensor;
the caller names the checkpoint.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from runtime.errors import UserError

StateDict = dict[str, Tensor]

RANK_FOLDER = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")
QKV = re.compile(r"\.(?:self_)?attention\.query_key_value\.(weight|bias)$")
COLUMN = re.compile(r"\.mlp\.dense_h_to_4h\.(weight|bias)$")
ROW = re.compile(r"\.(?:(?:self_)?attention\.dense|mlp\.dense_4h_to_h)\.weight$")
VOCABULARY = ("language_model.embedding.word_embeddings.weight", "word_embeddings_for_head.weight", "lm_head.bias")
LAYER = re.compile(r"^(.*\.layers\.)(\d+)(\..*)$")


def rank_of(folder: str) -> tuple[int, int] | None:
    """`mp_rank_01` -> (1, 0), `mp_rank_01_002` -> (1, 2): (tensor rank, pipeline stage)."""
    match = RANK_FOLDER.match(folder)
    return (int(match.group(1)), int(match.group(2) or 0)) if match else None


def iteration_folder(tracker: str) -> str:
    """The folder that latest_checkpointed_iteration.txt names."""
    text = tracker.strip()
    if text == "release":
        return "release"
    if text.isdigit():
        return f"iter_{int(text):07d}"
    raise UserError(f"latest_checkpointed_iteration.txt says {text[:40]!r}, neither 'release' nor an "
                    "iteration number")


def check_grid(ranks: list[tuple[int, int]], args: Any) -> tuple[int, int]:
    """Every (tensor rank, stage) of a full grid is present, as many as the stored args say; the grid's size."""
    tensor = max(t for t, _ in ranks) + 1
    stages = max(p for _, p in ranks) + 1
    for arg, found in (("tensor_model_parallel_size", tensor), ("pipeline_model_parallel_size", stages)):
        stated = getattr(args, arg, None)
        if isinstance(stated, int) and stated > found:
            found_names = "mp_rank_00" if found == 1 else f"up to index {found - 1}"
            raise UserError(f"the checkpoint's args say {arg} {stated}, but the ranks found go {found_names}; "
                            "some are missing")
    missing = [folder_name(t, p, stages) for p in range(stages) for t in range(tensor) if (t, p) not in ranks]
    if missing:
        raise UserError(f"rank {', '.join(missing)} missing (found {len(ranks)} of {tensor} tensor-parallel "
                        f"x {stages} pipeline)")
    return tensor, stages


def folder_name(tensor: int, stage: int, stages: int) -> str:
    return f"mp_rank_{tensor:02d}" + (f"_{stage:03d}" if stages > 1 else "")


def merge_tensor_parallel(ranks: list[StateDict], version: float, names: list[str]) -> StateDict:
    """One stage's ranks (in rank order; `names` says which is which in messages) as one state dict.
    The ranks' dicts are emptied as their tensors are joined, so memory holds about one copy."""
    first = ranks[0]
    for rank, name in zip(ranks[1:], names[1:]):
        if set(rank) != set(first):
            odd = sorted(set(rank) ^ set(first))[0]
            raise UserError(f"{name} and {names[0]} hold different tensors ({odd} is in one only)")
    merged: StateDict = {}
    for key in list(first):
        pieces = [rank.pop(key) for rank in ranks]
        for piece, name in zip(pieces[1:], names[1:]):
            if piece.shape != pieces[0].shape:
                raise UserError(f"{name} has {key} of shape {list(piece.shape)}, {names[0]} of {list(pieces[0].shape)}")
        if QKV.search(key) and version == 0 and len(pieces) > 1:
            # version 0 rows are [3, heads, head_size] per rank: join the heads inside each of q, k and v
            rest = pieces[0].shape[1:]
            merged[key] = torch.cat([p.reshape(3, -1, *rest) for p in pieces], dim=1).reshape(-1, *rest)
        elif QKV.search(key) or COLUMN.search(key) or key in VOCABULARY:
            merged[key] = torch.cat(pieces, dim=0)
        elif ROW.search(key):
            merged[key] = torch.cat(pieces, dim=1)
        else:
            for piece, name in zip(pieces[1:], names[1:]):
                if not torch.equal(piece, pieces[0]):
                    raise UserError(f"{key} differs between {names[0]} and {name}; it should be the same on every "
                                    "tensor-parallel rank")
            merged[key] = pieces[0]
    return merged


def merge_pipeline(stages: list[StateDict], names: list[str], num_layers: int | None) -> StateDict:
    """Stages in order as one state dict, their layers numbered on from the previous stage's."""
    merged: StateDict = {}
    offset = 0
    for stage, name in zip(stages, names):
        local = sorted({int(m.group(2)) for key in stage if (m := LAYER.match(key))})
        if local != list(range(len(local))):
            raise UserError(f"{name} holds layers {local}, not 0..{len(local) - 1}")
        for key, tensor in stage.items():
            layer = LAYER.match(key)
            if layer:
                key = f"{layer.group(1)}{offset + int(layer.group(2))}{layer.group(3)}"
            elif key in merged and not torch.equal(merged[key], tensor):
                raise UserError(f"{key} differs between pipeline stages")
            merged[key] = tensor
        offset += len(local)
    head_copy = merged.pop("word_embeddings_for_head.weight", None)  # the last stage's copy, for the LM head
    if head_copy is not None and "language_model.embedding.word_embeddings.weight" in merged \
            and not torch.equal(head_copy, merged["language_model.embedding.word_embeddings.weight"]):
        raise UserError("the last stage's word_embeddings_for_head differ from the word embeddings")
    if num_layers is not None and offset != num_layers:
        raise UserError(f"the pipeline stages hold {offset} layers, the checkpoint's args say {num_layers}; "
                        "a stage is missing or incomplete")
    return merged
