"""Benchmark: build MegatronBERT of a real size (345M, 1.3B or 3.9B) from random weights, end to end.

Runs `python -m exporter build` in a child process (so its peak memory is the build's alone), shows its
steps as they go (each with its time and the peak memory reached so far), then prints the wall time,
the peak resident memory against the fp32 weights' size, and the files written.

    python benchmarks/export_sizes.py [--size 345m|1.3b|3.9b] [--precision fp32|fp16|int8|int4] [--head qa]
        [--max-batch 8] [--max-sequence 384] [--keep-float PATTERN ...] [--recipe FILE] [--out DIR]

Without --out the artifact is built into a temporary folder under artifacts/ and removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZES = ("345m", "1.3b", "3.9b")


def parameters(config: dict) -> int:
    """Weights of the encoder with its embeddings (the heads add little)."""
    hidden, inner, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    per_layer = 4 * hidden * hidden + 2 * hidden * inner + 9 * hidden + inner
    embeddings = (config["vocab_size"] + config["max_position_embeddings"] + config["type_vocab_size"]) * hidden
    return layers * per_layer + embeddings + hidden * hidden + 3 * hidden


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="345m")
    parser.add_argument("--head", default="qa")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--max-batch", default="8")
    parser.add_argument("--max-sequence", default="384")
    parser.add_argument("--keep-float", action="append", default=[], metavar="PATTERN",
                        help="int8: layers left in float, as for build")
    parser.add_argument("--recipe", type=Path, help="a recipe TOML instead of recipes/HEAD.toml (e.g. "
                        "benchmarks/qa-345m.toml, whose bounds allow for random weights)")
    parser.add_argument("--out", type=Path, help="keep the artifact here (named SIZE-PRECISION)")
    args = parser.parse_args()
    config_file = ROOT / "benchmarks" / f"megatron-bert-{args.size}.json"
    weights = parameters(json.loads(config_file.read_text())) * 4 / 2**30
    with tempfile.TemporaryDirectory(dir=ROOT / "artifacts") as scratch:
        out = str(args.out or scratch)
        command = [sys.executable, "-m", "exporter", "build", "--head", args.head, "--precision", args.precision,
                   "--checkpoint", f"random:{config_file}",
                   "--tokenizer", str(ROOT / "exporter" / "sources" / "demo" / "vocab.txt"), "--out", out,
                   "--max-batch", args.max_batch, "--max-sequence", args.max_sequence,
                   "--eval-data", "none",  # random weights: no task to measure; the export's cost is the point
                   *(f"--keep-float={pattern}" for pattern in args.keep_float),
                   *(["--recipe", str(args.recipe)] if args.recipe else []),
                   *(["--name", f"{args.size}-{args.precision}"] if args.out else [])]
        start = time.perf_counter()
        result = subprocess.run(command, cwd=ROOT)
        wall = time.perf_counter() - start
        sizes = {p.relative_to(out): p.stat().st_size for p in Path(out).rglob("*") if p.is_file() and not p.is_symlink()}
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
    print(f"\n{args.size} {args.head} {args.precision} (batch <= {args.max_batch}, sequence <= {args.max_sequence}): "
          f"exit {result.returncode}, wall {wall:.1f} s, peak RSS {peak:.2f} GiB = {peak / weights:.2f}x the "
          f"{weights:.2f} GiB of fp32 weights")
    for name, size in sorted(sizes.items()):
        print(f"  {name}: {size / 2**20:.1f} MiB")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
