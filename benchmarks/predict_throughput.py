"""`python -m exporter predict` over a large corpus: rows/s of each engine against a plain Session loop,
packing by length against none, and peak memory as the corpus grows.

    python benchmarks/predict_throughput.py [--artifact artifacts/base.json] [--rows 100000]
                                            [--memory-rows 100000,1000000] [--workers 2]

Generates JSONL corpora of mixed lengths (words of the demo's texts, lengths log-normal: mostly
short, some long, cut at the artifact's window with --truncate), never committed. Every run is a
process of its own, timed from start to exit (start-up included, as a user sees it), and its memory
is the peak of the resident memory summed over its process tree (workers, and Ray's processes),
sampled every 0.2 s. Without --artifact it builds the demo base head (embeddings) first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runtime.machine import describe  # noqa: E402

# A plain loop over the corpus with one Session, in input order: what a user would write first
SESSION_LOOP = """
import json, sys
from runtime import Session
session, batch, rows = Session(sys.argv[1], truncate=True), [], 0
with open(sys.argv[2]) as corpus:
    for line in corpus:
        batch.append(json.loads(line)["text"])
        if len(batch) == 32:
            session.embed(batch); rows += len(batch); batch = []
if batch:
    session.embed(batch); rows += len(batch)
print(rows)
"""
# predict without packing by length (an option the command does not offer: only to compare)
UNPACKED = """
import sys
from pathlib import Path
from exporter.delivery.predict import Options, predict
predict(Options(artifact=Path(sys.argv[1]), input=Path(sys.argv[2]), output=Path(sys.argv[3]), truncate=True,
                pack=False))
"""


def corpus(path: Path, rows: int) -> Path:
    """`rows` JSONL rows {"id", "text"}, written as they are made."""
    words = [w for line in (ROOT / "recipes" / "data" / "eval" / "base.jsonl").read_text().splitlines()
             for w in json.loads(line)["text"].split()]
    rng = np.random.default_rng(0)
    with open(path, "w") as out:
        for first in range(0, rows, 10_000):
            count = min(10_000, rows - first)
            lengths = np.minimum(rng.lognormal(3.0, 0.8, count).astype(int) + 1, 200)
            picks = rng.integers(0, len(words), lengths.sum())
            at = 0
            for i, length in enumerate(lengths):
                text = " ".join(words[j] for j in picks[at:at + length])
                at += length
                out.write(json.dumps({"id": first + i, "text": text}) + "\n")
    return path


def tree_rss(root: int) -> int:
    """Resident bytes of `root` and every process below it."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry.name))
            rss[int(entry.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


def measured(command: list[str]) -> tuple[float, float, str]:
    """Seconds, peak resident GiB of the process tree, and the last line it printed."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, done = 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.2):
            peak = max(peak, tree_rss(process.pid))

    sampler = threading.Thread(target=sample)
    sampler.start()
    stdout, stderr = process.communicate()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr[-2000:]}")
    return seconds, peak / 2**30, (stdout.strip().splitlines() or [""])[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", type=Path)
    parser.add_argument("--rows", type=int, default=100_000, help="the corpus the engines are compared on (0: none)")
    parser.add_argument("--memory-rows", default="100000,1000000", help="corpora for the memory figures, each "
                        "through predict's defaults (\"\": none)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args()
    host = describe()
    print(f"{host['cpu']} ({', '.join(host['cpu_flags'])}), {host['cores']} cores", flush=True)
    work = Path(tempfile.mkdtemp(prefix="predict-bench-"))
    artifact = args.artifact
    if artifact is None:
        subprocess.run([sys.executable, "-m", "exporter", "build", "--head", "base", "--eval-data", "none", "--out",
                        str(work / "artifacts")], cwd=ROOT, check=True, capture_output=True)
        artifact = work / "artifacts" / "base.json"
    from runtime import Session

    print(f"artifact {artifact} on {Session(artifact).backend}", flush=True)
    predict = [sys.executable, "-m", "exporter", "predict", str(artifact), "--truncate", "--input"]

    if args.rows:
        compare(args, artifact, predict, work)
    if args.memory_rows:
        print("\npeak memory as the corpus grows:", flush=True)
    for rows in (int(n) for n in args.memory_rows.split(",") if n):
        data = corpus(work / f"corpus-{rows}.jsonl", rows)
        seconds, peak, _ = measured([*predict, str(data), "--output", str(work / f"memory-{rows}")])
        print(f"  {rows:>9} rows ({data.stat().st_size / 2**20:5.0f} MiB), --workers 1: peak {peak:5.2f} GiB, "
              f"{seconds:7.1f} s, {rows / seconds:8.1f} rows/s", flush=True)
        data.unlink()


def compare(args: argparse.Namespace, artifact: Path, predict: list[str], work: Path) -> None:
    """Each engine, and predict without packing, against a plain Session loop over the same corpus."""
    data = corpus(work / f"corpus-{args.rows}.jsonl", args.rows)
    print(f"\n{args.rows} rows ({data.stat().st_size / 2**20:.0f} MiB):", flush=True)
    runs = {"Session loop (one process, input order)": [sys.executable, "-c", SESSION_LOOP, str(artifact), str(data)],
            "predict --workers 1": [*predict, str(data), "--output", str(work / "w1")],
            "predict --workers 1, no packing": [sys.executable, "-c", UNPACKED, str(artifact), str(data),
                                                str(work / "unpacked")],
            f"predict --workers {args.workers}": [*predict, str(data), "--output", str(work / "wn"), "--workers",
                                                  str(args.workers)]}
    if not args.skip_ray:
        runs[f"predict --engine ray --workers {args.workers}"] = [*predict, str(data), "--output", str(work / "ray"),
                                                                  "--engine", "ray", "--workers", str(args.workers)]
    for label, command in runs.items():
        seconds, peak, _ = measured(command)
        print(f"  {label:<44} {seconds:7.1f} s  {args.rows / seconds:8.1f} rows/s  peak {peak:5.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
