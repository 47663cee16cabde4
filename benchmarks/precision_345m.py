"""Benchmark: the 345M qa head (random weights) as fp32, fp16, int8 and int4 artifacts on ONNX Runtime's
CPU provider, at batch 1 and sequence 128: build time, graph size, latency, and agreement with the
fp32 artifact.

    python benchmarks/precision_345m.py [--precisions fp32,fp16,int8,int4] [--iterations 20] [--out DIR]

Builds with `python -m exporter build --recipe benchmarks/qa-345m.toml` (skipped for an artifact
already in --out), then times `runtime.Session.run` on one fixed input.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from runtime import Session

ROOT = Path(__file__).resolve().parent.parent


def build(precision: str, out: Path) -> float:
    command = [sys.executable, "-m", "exporter", "build", "--head", "qa", "--precision", precision,
               "--recipe", str(ROOT / "benchmarks" / "qa-345m.toml"), "--name", f"qa-{precision}", "--out", str(out)]
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    return time.perf_counter() - start


def latency(session: Session, feed: dict[str, np.ndarray], iterations: int) -> list[float]:
    for _ in range(3):
        session.run(feed)
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        session.run(feed)
        times.append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", default="fp32,fp16,int8,int4")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("artifacts/bench-345m"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    feed = {"input_ids": rng.integers(1000, 28000, (1, 128)), "attention_mask": np.ones((1, 128), dtype=np.int64),
            "token_type_ids": np.zeros((1, 128), dtype=np.int64)}
    rows, reference = [], None
    for precision in args.precisions.split(","):
        manifest = args.out / f"qa-{precision}.json"
        built = build(precision, args.out) if not manifest.exists() else float("nan")
        session = Session(manifest, backend="onnxruntime")
        outputs = session.run(feed)
        reference = reference or outputs
        cosine = min(float(np.dot(reference[k].ravel(), v.ravel()) / np.linalg.norm(reference[k]) / np.linalg.norm(v))
                     for k, v in outputs.items())
        times = np.array(latency(session, feed, args.iterations)) * 1000
        size = sum((manifest.parent / name).stat().st_size for name in session.manifest.files if ".onnx" in name)
        rows.append((precision, built, size / 2**20, np.percentile(times, 50), np.percentile(times, 90), cosine))
    base = rows[0][3]
    print(f"\n345M qa, batch 1, sequence 128, ONNX Runtime CPU ({args.iterations} runs)")
    print(f"{'precision':<10} {'build s':>8} {'MiB':>7} {'p50 ms':>8} {'p90 ms':>8} {'vs ' + rows[0][0]:>8} {'cosine':>9}")
    for precision, built, mib, p50, p90, cosine in rows:
        print(f"{precision:<10} {built:>8.1f} {mib:>7.0f} {p50:>8.1f} {p90:>8.1f} {base / p50:>7.2f}x {cosine:>9.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
