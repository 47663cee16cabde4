"""Resident memory of runtime.Session on an artifact: after opening it, and after one answer.

    python benchmarks/session_memory.py artifacts/sizes/3.9b-fp32.json

Prints the artifact's weight bytes (the external data of the graphs a CPU session loads), then the process's resident memory
split as Linux counts it: anonymous (ONNX Runtime's own copies and buffers) and file-backed (pages
mapped from the artifact's files, which the page cache shares), before opening, after opening, and
after answering a question (qa) or running the graph once on 128 random ids (other heads).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime import Session  # noqa: E402
from runtime.manifest import Manifest  # noqa: E402
from runtime.pinned import find_manifest  # noqa: E402


def resident() -> dict[str, float]:
    """VmRSS, RssAnon and RssFile of this process, in GiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) / 2**20 for key in ("VmRSS", "RssAnon", "RssFile")}


def show(label: str, memory: dict[str, float]) -> None:
    print(f"{label:<22} RSS {memory['VmRSS']:6.2f} GiB  (anonymous {memory['RssAnon']:6.2f}, "
          f"file-backed {memory['RssFile']:6.2f})", flush=True)


def main() -> None:
    artifact = Path(sys.argv[1])
    manifest = find_manifest(artifact)
    graphs = Manifest.load(manifest).graphs.values()  # the forms a CPU session loads
    weights = sum((manifest.parent / f"{g['file']}.data").stat().st_size for g in graphs
                  if (manifest.parent / f"{g['file']}.data").exists()) / 2**30
    print(f"{manifest.name}: {weights:.2f} GiB of weights in external data")
    show("before opening", resident())
    start = time.perf_counter()
    session = Session(artifact)
    opened = time.perf_counter() - start
    show(f"opened ({opened:.0f} s)", resident())
    start = time.perf_counter()
    if session.head.name == "qa":
        result = session.answer("Who built the bridge?", "The bridge was built by engineers from the town in 1850.")
    else:
        ids = np.random.default_rng(0).integers(1000, session.manifest.config["vocab_size"], (1, 128))
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        graph = next(iter(session.manifest.graphs))
        names = {t["name"] for t in session.manifest.graphs[graph]["inputs"]}
        result = {k: v.shape for k, v in session.run({k: v for k, v in feed.items() if k in names}, graph).items()}
    show(f"answered ({time.perf_counter() - start:.1f} s)", resident())
    print(f"answer: {result}")


if __name__ == "__main__":
    main()
