"""Synthetic inputs for tracing and validating a graph: any declared shape, realistically padded.

Row r of a batch is padded by a few tokens more than row r-1 (row 0 not at all), on the head's
padding side, so that every check also covers masked positions. Causal-LM position ids count only
real tokens, as generation with a left-padded batch needs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from runtime.heads import TensorSpec

from exporter.model.config import MegatronBertConfig


def padding_mask(rows: int, length: int, padding_side: str, max_pads: int) -> Tensor:
    mask = torch.ones(rows, length, dtype=torch.long)
    for row in range(rows):
        pads = min(3 * row, max_pads)
        if pads and padding_side == "left":
            mask[row, :pads] = 0
        elif pads:
            mask[row, length - pads:] = 0
    return mask


def synthetic_inputs(tensors: list[TensorSpec], sizes: dict[str, int], config: MegatronBertConfig,
                     padding_side: str, seed: int = 0) -> dict[str, Tensor]:
    """Inputs for `tensors` (already expanded per layer) with the dynamic axes sized by `sizes`."""
    generator = torch.Generator().manual_seed(seed)
    model_sizes = {"heads": config.num_attention_heads, "head_size": config.head_size, **sizes}
    shapes = {t.name: [model_sizes[a] if isinstance(a, str) else a for a in t.shape] for t in tensors}
    axes = {a for t in tensors for a in t.shape}
    rows = sizes["batch"] * (sizes["choices"] if "choices" in axes else 1)
    length = sizes["sequence"]
    total = sizes["total_sequence"] if "total_sequence" in axes else length
    max_pads = total - length if total > length else length - 1  # never pad the new tokens of a decode step
    mask = padding_mask(rows, total, padding_side, max_pads)
    new = mask[:, total - length:]

    inputs: dict[str, Tensor] = {}
    for t in tensors:
        if t.name == "input_ids":
            ids = torch.randint(1, config.vocab_size, (rows, length), generator=generator)
            value = torch.where(new.bool(), ids, config.pad_token_id)
        elif t.name == "attention_mask":
            value = mask
        elif t.name == "token_type_ids":
            value = torch.zeros(rows, length, dtype=torch.long)
            value[:, length // 2:] = 1
            value = value * new
        elif t.name == "position_ids":
            value = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, total - length:]
        else:  # a past key or value
            value = torch.randn(shapes[t.name], generator=generator)
        inputs[t.name] = value.reshape(shapes[t.name])
    return inputs
