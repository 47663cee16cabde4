"""Benchmark: causal-LM decode against its memory-bandwidth floor, per precision, in one process.

A decode step multiplies one token by every weight, so it cannot run faster than the time to read
the weights it uses from memory: the floor is the bytes of weights one step reads divided by this
machine's read bandwidth. The bandwidth is measured here, before and after the artifacts are timed
(this shared machine's speed drifts), as the best of several sums over an array far larger than the
caches, on one thread and on every core. A step's weight bytes are the decode graph's initializers,
except tables read only by a lookup (Gather reads one row of the embeddings per token); the KV cache
a step also reads is printed beside them.

Each artifact is timed as `bench` times generation: a prompt of --prompt tokens, then --new-tokens
greedy tokens, batch 1, on every backend that runs it here; prefill is the first token's time.
With --profile, ONNX Runtime's profiler splits one decode step (after --prompt + 32 tokens) by
operator type, to say which operator holds the time above the floor; with --kernels, one step's 4-bit
products are timed alone with each library that has a 4-bit CPU kernel (ONNX Runtime, PyTorch).

    python benchmarks/decode_floor.py artifacts/bench-345m/lm-fp32.json artifacts/bench-345m/lm-int8.json \\
        artifacts/bench-345m/lm-int4.json [--prompt 128] [--new-tokens 64] [--profile] [--kernels] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from exporter.delivery.bench import bench_generation, machine
from exporter.precision.int4 import nbits_quantizer
from runtime import feeds
from runtime.manifest import Manifest
from runtime.machine import timed
from runtime.pinned import find_manifest
from runtime.threads import ort_options

READ_BYTES = 2**30  # far above any cache here (L3 is at most a few tens of MiB)
TRIES = 5


def read_bandwidth() -> dict[str, float]:
    """Bytes per second a sum over a 1 GiB array reaches: one thread, and every core (each thread
    summing its share; numpy releases the GIL while it sums), best of TRIES."""
    data = np.ones(READ_BYTES // 4, dtype=np.float32)
    cores = os.cpu_count() or 1
    shares = np.array_split(data, cores)
    best = {"one thread": 0.0, f"{cores} threads": 0.0}
    with ThreadPoolExecutor(cores) as pool:
        for _ in range(TRIES):
            start = time.perf_counter()
            data.sum()
            best["one thread"] = max(best["one thread"], READ_BYTES / (time.perf_counter() - start))
            start = time.perf_counter()
            list(pool.map(np.sum, shares))
            best[f"{cores} threads"] = max(best[f"{cores} threads"], READ_BYTES / (time.perf_counter() - start))
    return best


def step_bytes(manifest_path: Path, past: int) -> dict[str, int]:
    """The weight bytes one decode step reads (tables read only by Gather left out), and its KV cache's."""
    manifest = Manifest.load(manifest_path)
    model = onnx.load(str(manifest_path.parent / manifest.graphs["decode"]["file"]), load_external_data=False)
    readers: dict[str, set[str]] = defaultdict(set)
    for node in model.graph.node:
        for name in node.input:
            readers[name].add(node.op_type)
    weights = sum(int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
                  for t in model.graph.initializer if readers[t.name] and readers[t.name] != {"Gather"})
    config = manifest.config
    cache = 2 * config["num_hidden_layers"] * past * config["hidden_size"] * 4  # keys and values, fp32, batch 1
    return {"weights": weights, "cache": cache}


def profile_step(manifest_path: Path, past: int, steps: int = 20) -> dict[str, float]:
    """Share of one decode step's time per operator type (ONNX Runtime's profiler, `steps` steps)."""
    manifest = Manifest.load(manifest_path)
    feed = feeds.feed(manifest, "decode", {"batch": 1, "sequence": 1, "past_sequence": past})
    with tempfile.TemporaryDirectory() as folder:
        options = ort_options()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "decode")
        session = ort.InferenceSession(str(manifest_path.parent / manifest.graphs["decode"]["file"]), options,
                                       providers=["CPUExecutionProvider"])
        for _ in range(steps):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    spent: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            spent[event["args"]["op_name"]] += event["dur"]
    total = sum(spent.values())
    return {op: us / total for op, us in sorted(spent.items(), key=lambda item: -item[1])}


def int4_kernels(config: dict[str, int], block: int = 32) -> dict[str, dict[str, float]]:
    """One decode step's 4-bit products alone (batch 1, one token), per library: ONNX Runtime's
    MatMulNBits (accuracy_level 4, symmetric, as the artifact) and PyTorch's int4 weight-only CPU kernel
    (`_weight_int4pack_mm_for_cpu`, groups of `block`): milliseconds for the step's products and the
    packed weight bytes per second, to tell the kernel's rate from the memory's."""
    import torch
    from onnx import TensorProto, helper

    hidden, inner, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    shapes = {(hidden, hidden): 4 * layers, (hidden, inner): layers, (inner, hidden): layers,
              (hidden, config["vocab_size"]): 1}  # (in, out): how many per step
    rng = np.random.default_rng(0)
    spent = {"onnxruntime MatMulNBits": 0.0, "pytorch int4pack": 0.0}
    packed = 0.0
    nbits = nbits_quantizer()
    for (k, n), count in shapes.items():
        weight = rng.standard_normal((k, n)).astype(np.float32) * 0.02
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="product")], "p",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                                  [onnx.numpy_helper.from_array(weight, "w")])
        quantizer = nbits.MatMulNBitsQuantizer(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                                               block_size=block, is_symmetric=True, accuracy_level=4)
        quantizer.process()
        session = ort.InferenceSession(quantizer.model.model.SerializeToString(), ort_options(),
                                       providers=["CPUExecutionProvider"])
        x = rng.standard_normal((1, k)).astype(np.float32)
        spent["onnxruntime MatMulNBits"] += count * float(np.median(timed(lambda: session.run(None, {"x": x}), 5, 50)))
        levels = torch.from_numpy(rng.integers(0, 16, (n, k), dtype=np.int32))
        int4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels, 8)
        scales = torch.ones(k // block, n, 2)
        tx = torch.from_numpy(x)
        spent["pytorch int4pack"] += count * float(np.median(timed(
            lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(tx, int4, block, scales), 2, 10)))
        packed += count * (k * n / 2 + k * n / block * 4)
    return {library: {"ms": seconds * 1000, "packed_gb_per_s": packed / seconds / 1e9}
            for library, seconds in spent.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", nargs="+", type=Path, metavar="ARTIFACT", help="causal-LM manifests")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (default: 128)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated (default: 64)")
    parser.add_argument("--iterations", type=int, default=3, help="timed generations (default: 3)")
    parser.add_argument("--profile", action="store_true", help="split a decode step by operator type")
    parser.add_argument("--kernels", action="store_true", help="time one step's 4-bit products alone, per library")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the figures here")
    args = parser.parse_args()

    before = read_bandwidth()
    rows: list[dict[str, Any]] = []
    profiles = {}
    middle = args.prompt + args.new_tokens // 2  # the cache's mean length over the decode steps
    for artifact in args.artifacts:
        path = find_manifest(artifact)
        manifest = Manifest.load(path)
        read = step_bytes(path, middle)
        for result in bench_generation(path, manifest, [1], [args.prompt], args.new_tokens, args.iterations, None):
            rows.append({"artifact": manifest.name, "precision": result.precision, "backend": result.backend,
                         "weights_mb": read["weights"] / 1e6, "cache_mb": read["cache"] / 1e6,
                         "per_token_ms": result.per_token_ms, "first_token_ms": result.first_token_ms})
        if args.profile:
            profiles[f"{manifest.name} ({manifest.precision})"] = profile_step(path, middle)
    kernels = int4_kernels(Manifest.load(find_manifest(args.artifacts[0])).config) if args.kernels else {}
    after = read_bandwidth()
    bandwidth = {kind: max(before[kind], after[kind]) for kind in before}
    best = max(bandwidth.values())
    for row in rows:
        row["floor_ms"] = row["weights_mb"] * 1e6 / best * 1000
        row["per_token_over_floor"] = row["per_token_ms"] / row["floor_ms"]

    described = machine()
    print(f"{described['cpu']}, flags {', '.join(described['cpu_flags'])}; {described['cores']} cores")
    print("read bandwidth (best of before and after): "
          + ", ".join(f"{kind} {value / 1e9:.1f} GB/s" for kind, value in bandwidth.items())
          + f"; the floor uses {best / 1e9:.1f} GB/s")
    print(f"decode after a {args.prompt}-token prompt, {args.new_tokens} tokens, batch 1, median of {args.iterations}")
    print(f"{'artifact':<12} {'precision':<9} {'backend':<18} {'weights MB':>10} {'cache MB':>9} {'floor ms':>9} {'ms/token':>9} "
          f"{'x floor':>8} {'prefill ms':>11}")
    for row in rows:
        print(f"{row['artifact']:<12} {row['precision']:<9} {row['backend']:<18} {row['weights_mb']:>10.1f} {row['cache_mb']:>9.1f} "
              f"{row['floor_ms']:>9.2f} {row['per_token_ms']:>9.2f} {row['per_token_over_floor']:>8.2f} "
              f"{row['first_token_ms']:>11.1f}")
    for name, shares in profiles.items():
        print(f"{name}: one decode step by operator type (ONNX Runtime's profiler): "
              + ", ".join(f"{op} {share:.0%}" for op, share in shares.items() if share >= 0.01))
    for library, figures in kernels.items():
        print(f"one step's 4-bit products alone, {library}: {figures['ms']:.2f} ms "
              f"({figures['packed_gb_per_s']:.1f} GB/s of packed weights)")
    if args.json:
        args.json.write_text(json.dumps({"machine": described, "bandwidth": bandwidth, "rows": rows,
                                         "profiles": profiles, "int4_kernels": kernels, "settings": vars(args) | {"artifacts": [
                                             str(a) for a in args.artifacts], "json": str(args.json)}},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
