"""Benchmark: export the real-size (345M) MegatronBERT qa head from random weights, end to end.

Runs `python -m exporter build` in a child process (so its peak memory is the build's alone) and
prints the wall time of each step and of the whole build, and the peak resident memory.

    python benchmarks/export_345m.py [--precision fp32|fp16] [--head qa] [--max-batch 8] [--max-sequence 384]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head", default="qa")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--max-batch", default="8")
    parser.add_argument("--max-sequence", default="384")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "exporter", "build", "--head", args.head, "--precision", args.precision,
                   "--checkpoint", f"random:{ROOT / 'benchmarks' / 'megatron-bert-345m.json'}",
                   "--tokenizer", str(ROOT / "exporter" / "demo" / "vocab.txt"), "--out", out,
                   "--max-batch", args.max_batch, "--max-sequence", args.max_sequence,
                   "--eval-data", "none"]  # random weights: no task to measure; the export's cost is the point
        start = time.perf_counter()
        result = subprocess.run(command, cwd=ROOT)
        wall = time.perf_counter() - start
        sizes = {p.name: p.stat().st_size for p in Path(out).iterdir() if not p.name.startswith(".")}
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
    print(f"\n345M {args.head} {args.precision} (batch <= {args.max_batch}, sequence <= {args.max_sequence}): "
          f"exit {result.returncode}, wall {wall:.1f} s, peak RSS {peak:.2f} GiB")
    for name, size in sorted(sizes.items()):
        print(f"  {name}: {size / 2**20:.1f} MiB")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
