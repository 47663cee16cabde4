"""Benchmark: what the task-accuracy evaluation adds to a real-size build.

Saves a 345M `MegatronBertForQuestionAnswering` (random weights, transformers' `save_pretrained`, the demo
vocabulary) as a user's own checkpoint would be, then builds it with the default qa recipe at each
precision, back to back: with its evaluation set and with `--eval-data none`, in --rounds rounds whose
order alternates (this machine's speed drifts by 10-20% over minutes). Prints each build's wall time and
the time of its task-accuracy steps, then per precision the best wall of each kind and their ratio.

    python benchmarks/evaluation_cost.py [--precisions fp32,int8] [--rounds 2] [--config benchmarks/megatron-bert-345m.json]

Needs transformers (the test extra). Each build runs in a child process, its output shown as it goes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEP = re.compile(r"^- (.*) \.\.\.$")
DONE = re.compile(r"^\s+done in ([\d.]+) s")


def save_checkpoint(config_file: Path, directory: Path) -> None:
    import torch
    from transformers import MegatronBertConfig, MegatronBertForQuestionAnswering

    torch.manual_seed(0)
    model = MegatronBertForQuestionAnswering(MegatronBertConfig(**json.loads(config_file.read_text())))
    model.save_pretrained(directory)
    shutil.copy(ROOT / "exporter" / "sources" / "demo" / "vocab.txt", directory / "vocab.txt")


def build(checkpoint: Path, precision: str, evaluation: bool, out: Path) -> tuple[int, float, float, str]:
    """Run one build; returns its exit status, wall time, the time its task-accuracy steps took (what
    fp32's pass beside quantizing slows is not in it: the walls show that), and the line that says how
    much of fp32's pass ran beside the other work."""
    command = [sys.executable, "-m", "exporter", "build", "--head", "qa", "--precision", precision,
               "--checkpoint", str(checkpoint), "--out", str(out), "--name", f"qa-{precision}-{evaluation}",
               *([] if evaluation else ["--eval-data", "none"])]
    start, evaluating, current, examples = time.perf_counter(), 0.0, "", ""
    # Every build exports, as a user's first build of their checkpoint does: the export cache holds one 345M
    # graph, so with it on, which builds paid the export (25-40 s here) depended on their order
    environment = {**os.environ, "MEGATRON_DEPLOY_EXPORT_CACHE_BYTES": "0"}
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=environment) as child:
        assert child.stdout is not None
        for line in child.stdout:
            print(line, end="", flush=True)
            if STEP.match(line):
                current = STEP.match(line).group(1)  # type: ignore[union-attr]
            elif DONE.match(line) and ("task accuracy" in current or "evaluation examples" in current):
                evaluating += float(DONE.match(line).group(1))  # type: ignore[union-attr]
            elif "examples were scored beside" in line:
                examples = line.strip()
    return child.returncode, time.perf_counter() - start, evaluating, examples


def cpu() -> str:
    flags = set()
    model = platform.processor()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
    wanted = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    return f"{model}, {len(list(Path('/sys/devices/system/cpu').glob('cpu[0-9]*')))} CPUs, {' '.join(wanted)}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", default="fp32,int8")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--config", type=Path, default=ROOT / "benchmarks" / "megatron-bert-345m.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=ROOT / "artifacts") as scratch:
        checkpoint = Path(scratch) / "checkpoint"
        save_checkpoint(args.config, checkpoint)
        for precision in args.precisions.split(","):
            for round_ in range(args.rounds):
                for evaluation in (True, False) if round_ % 2 == 0 else (False, True):
                    status, wall, evaluating, examples = build(checkpoint, precision, evaluation,
                                                               Path(scratch) / "out")
                    rows.append((precision, evaluation, status, wall, evaluating))
                    print(f"\n== {precision}, {'default recipe' if evaluation else '--eval-data none'}: exit "
                          f"{status}, wall {wall:.1f} s, task-accuracy steps {evaluating:.1f} s {examples}\n",
                          flush=True)
    print(f"\n{args.config.name}, qa head, default recipe; {cpu()}")
    print("| precision | default recipe: walls (task-accuracy steps) | --eval-data none: walls | best / best |")
    print("| --- | --- | --- | --- |")
    for precision in args.precisions.split(","):
        full, bare = ([r for r in rows if r[0] == precision and r[1] == e] for e in (True, False))
        print(f"| {precision} | {', '.join(f'{r[3]:.0f} s ({r[4]:.0f} s)' for r in full)} | "
              f"{', '.join(f'{r[3]:.0f} s' for r in bare)} | "
              f"{min(r[3] for r in full) / min(r[3] for r in bare):.2f}x |")
    return max(r[2] for r in rows)


if __name__ == "__main__":
    sys.exit(main())
