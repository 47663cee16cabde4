"""Inputs made up for an artifact's graph from its manifest alone: to time it, or to smoke-check it.

Every input gets the manifest's name, dtype and shape for the sizes asked. Timing feeds are random
ids of the vocabulary (past its special tokens), masks of ones, token types of zeros, positions that
follow the cache, and a small random cache. Smoke feeds read every index table at both ends (0 and
its size - 1, as the manifest states the sizes), so a graph whose tables are smaller than its
manifest says fails on them.
"""

from __future__ import annotations

import numpy as np

from .manifest import Manifest

# Integer inputs that index a table (ONNX's Gather wraps a negative index around): each must lie in
# [0, the config's size of its table).
INDEX_INPUTS = {"input_ids": "vocab_size", "token_type_ids": "type_vocab_size",
                "position_ids": "max_position_embeddings"}
FIRST_WORD = 5  # ids below are the demo vocabulary's special tokens


def feed(manifest: Manifest, graph: str, sizes: dict[str, int], seed: int | None = 0) -> dict[str, np.ndarray]:
    """Inputs of `graph` at `sizes` (dynamic axis -> size; total_sequence follows from the others): a
    timing feed from `seed`, or the smoke feed where `seed` is None."""
    sizes = {"past_sequence": 0, **sizes}
    sizes.setdefault("total_sequence", sizes["sequence"] + sizes["past_sequence"])
    rng = None if seed is None else np.random.default_rng(seed)
    inputs = {}
    for tensor in manifest.graphs[graph]["inputs"]:
        shape = tuple(sizes[d] if isinstance(d, str) else d for d in tensor["shape"])
        name, dtype = tensor["name"], tensor["dtype"]
        if dtype != "int64":  # the KV cache
            inputs[name] = (np.zeros(shape) if rng is None else rng.standard_normal(shape) * 0.1).astype(dtype)
        elif name == "attention_mask":
            inputs[name] = np.ones(shape, dtype=np.int64)
        elif rng is None:
            inputs[name] = np.zeros(shape, dtype=np.int64)
            inputs[name][..., -1] = manifest.config[INDEX_INPUTS[name]] - 1
        elif name == "input_ids":
            vocab = manifest.config["vocab_size"]
            inputs[name] = rng.integers(min(FIRST_WORD, vocab - 1), vocab, shape)
        elif name == "position_ids":
            inputs[name] = np.broadcast_to(np.arange(sizes["past_sequence"], sizes["past_sequence"] + shape[-1]),
                                           shape).copy()
        else:  # token types
            inputs[name] = np.zeros(shape, dtype=np.int64)
    return inputs


def smallest(manifest: Manifest) -> dict[str, int]:
    """The smallest size of every dynamic axis the artifact takes."""
    return {axis: low for axis, (low, _, _) in manifest.shape_limits.items()}
