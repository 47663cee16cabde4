"""Exported graphs kept by what they were made from, so the same export is never paid twice.

torch's exporter dominates a small build (tracing, then onnxscript's rewrites), and the same graph is
exported again and again: once per precision of a head (fp16 and int8 start from the fp32 graph), and
once per build of an unchanged checkpoint. A graph is kept under a key covering everything it depends
on: every weight's name, dtype, shape and bytes; the config; the head and graph with their declared
inputs and outputs; the file name where the weights go to external data (the graph refers to it); the
exporter's settings and library versions; and the source of the code that traces (the reference model
and the export). Any change there is another key, so a kept graph is never stale.

The cache lives in the runtime's cache folder (`exports/`), bounded by `$MEGATRON_DEPLOY_EXPORT_CACHE_BYTES`
(default 2 GiB; 0 turns it off): the graphs used longest ago go first, and a graph larger than the
bound is not kept. Entries are written whole or not at all (a temporary folder renamed into place).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import onnxscript
import torch

from runtime.files import cache_root
from runtime.heads import HeadSpec

from exporter.model.config import MegatronBertConfig

DEFAULT_BOUND = 2 << 30
SOURCES = ("model/megatron_bert.py", "model/samples.py", "model/config.py", "export/to_onnx.py", "export/cache.py")


def bound() -> int:
    value = os.environ.get("MEGATRON_DEPLOY_EXPORT_CACHE_BYTES", "")
    return int(value) if value.isdigit() else DEFAULT_BOUND


def key(model: torch.nn.Module, spec: HeadSpec, graph: str, config: MegatronBertConfig, settings: dict,
        file_name: str | None) -> str:
    """What the graph is made from, as one digest. `file_name`: where it matters (external data)."""
    digest = hashlib.sha256()
    here = Path(__file__).resolve().parents[1]  # exporter/
    for source in SOURCES:
        digest.update((here / source).read_bytes())
    described = {"head": type(model).__name__, "graph": graph, "declared": repr(spec.graphs[graph]),
                 "config": config.to_hf_dict(), "settings": settings, "file": file_name,
                 "versions": [torch.__version__, onnx.__version__, onnxscript.__version__]}
    digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    add_weights(digest, model)
    return digest.hexdigest()


def add_weights(digest: Any, model: torch.nn.Module) -> None:
    """Every weight's name, type, shape and bytes into `digest` (a hashlib object)."""
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        if tensor.numel():  # the weights' own memory, not a copy (a large model's would not fit twice)
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def exported(entry_key: str, path: Path, export: Callable[[Path], list[Path]]) -> list[Path]:
    """The graph at `path` (and its external data): copied from the cache, or made by `export(path)`
    and kept. Returns the files written beside `path`."""
    limit = bound()
    entry = cache_root() / "exports" / entry_key
    if limit and (entry / "complete").is_file():
        try:
            files = sorted(p for p in entry.iterdir() if p.name != "complete")
            for file in files:
                shutil.copyfile(file, path.parent / file.name.replace("GRAPH", path.name, 1))
            os.utime(entry / "complete")  # used now: the last to go
            return [path.parent / file.name.replace("GRAPH", path.name, 1) for file in files]
        except OSError:  # evicted by another build meanwhile: export after all
            for file in path.parent.glob(f"{path.name}*"):
                file.unlink()
    written = export(path)
    size = sum(p.stat().st_size for p in written)
    if 0 < size <= limit:
        _keep(entry, written, path.name)
        _evict(entry.parent, limit)
    return written


def _keep(entry: Path, files: list[Path], graph_name: str) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".incoming-", dir=entry.parent))
    try:
        for file in files:  # stored as GRAPH, GRAPH.data: the name the graph had is put back on the way out
            shutil.copyfile(file, scratch / file.name.replace(graph_name, "GRAPH", 1))
        (scratch / "complete").touch()
        os.replace(scratch, entry)
    except OSError:  # kept by another build meanwhile, or no room: the cache is only a saving
        shutil.rmtree(scratch, ignore_errors=True)


def _evict(folder: Path, limit: int) -> None:
    """Drop the entries used longest ago until the cache fits its bound."""
    try:
        entries = {e: ((e / "complete").stat().st_mtime, sum(p.stat().st_size for p in e.iterdir()))
                   for e in folder.iterdir() if not e.name.startswith(".")}
    except OSError:  # another build is evicting too: let it
        return
    total = sum(size for _, size in entries.values())
    for entry, (_, size) in sorted(entries.items(), key=lambda item: item[1][0]):
        if total <= limit:
            break
        shutil.rmtree(entry, ignore_errors=True)
        total -= size
