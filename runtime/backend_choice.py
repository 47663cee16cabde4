"""backend="auto" on a CPU: ONNX Runtime or OpenVINO, whichever runs the artifact faster here.

Only forms the build validated are candidates. The first Session of an artifact on a machine times
each candidate on one input (batch 1, 128 tokens, or one decode step after 128 for the causal LM) and
remembers the winner in the runtime's cache folder (`choices.json`), keyed by the artifact's
graphs, the CPU (name and flags) and the libraries' versions: another CPU or version measures again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime

from . import feeds, openvino_backend
from .backends import Backend
from .files import cache_root, write_atomically
from .machine import cpu, timed
from .manifest import Manifest

TIMED_TOKENS = 128
WARMUP, RUNS = 2, 5


def timed_graph(manifest: Manifest) -> str:
    """Generation's cost is its decode steps; an encoder has one graph."""
    return "decode" if "decode" in manifest.graphs else next(iter(manifest.graphs))


def timed_sizes(manifest: Manifest, graph: str) -> dict[str, int]:
    """Batch 1, up to 128 tokens (a decode step: one token after up to 128)."""
    limits = manifest.shape_limits
    past = min(TIMED_TOKENS, limits.get("past_sequence", [0, 0, 0])[2])
    return {"batch": 1, "sequence": 1 if graph == "decode" else min(TIMED_TOKENS, limits["sequence"][2]),
            "past_sequence": past, "choices": limits.get("choices", [0, 0, 0])[1]}


def milliseconds(backend: Backend, graph: str, feed: dict[str, np.ndarray]) -> float:
    return float(np.median(timed(lambda: backend.run(graph, feed), WARMUP, RUNS))) * 1000


def choice_key(manifest: Manifest) -> str:
    graphs = sorted(manifest.files[name]["sha256"] for name in manifest.files if name.endswith(".onnx"))
    versions = {"onnxruntime": onnxruntime.__version__, "openvino": openvino_backend.version()}
    return json.dumps({"graphs": graphs, "cpu": cpu(), **versions}, sort_keys=True)


def fastest(manifest: Manifest, candidates: dict[str, Callable[[], Backend]], choices: Path | None = None) -> Backend:
    """The candidate backend that ran the artifact fastest here: remembered, or measured now."""
    if len(candidates) == 1:
        return next(iter(candidates.values()))()
    choices = choices or cache_root() / "choices.json"
    key = choice_key(manifest)
    known: dict[str, Any] = json.loads(choices.read_text()) if choices.is_file() else {}
    remembered = known.get(key, {}).get("backend")
    if remembered in candidates:
        return candidates[remembered]()
    graph = timed_graph(manifest)
    feed = feeds.feed(manifest, graph, timed_sizes(manifest, graph))
    timings = {}
    for name, open_backend in candidates.items():  # one at a time: a large model's copies may not fit twice
        timings[name] = milliseconds(open_backend(), graph, feed)
    winner = min(timings, key=timings.__getitem__)
    known[key] = {"backend": winner, "ms": timings, "artifact": manifest.name}
    choices.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(choices, json.dumps(known, indent=1))
    return candidates[winner]()
