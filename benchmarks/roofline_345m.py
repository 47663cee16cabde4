"""Benchmark: the fastest this machine could run the 345M encoder at all, from its matrix-product peak.

The encoder's time is almost all matrix products (ONNX Runtime profile: 91% fp32, 82% int8), so its
floor is their arithmetic divided by the best rate this CPU reaches: fp32 through PyTorch's GEMM
(oneDNN/MKL), u8 x s8 int8 through ONNX Runtime's MatMulInteger (VNNI where present). Dividing a
PyTorch eager time by the floor gives the largest speedup any backend could show over it here.

    python benchmarks/roofline_345m.py [--seq 128] [--pytorch-ms 520]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from exporter.bench import timed

CONFIG = Path(__file__).resolve().parent / "megatron-bert-345m.json"


def product_flops(config: dict[str, int], sequence: int) -> float:
    """Multiply-adds x 2 of one sequence's matrix products: Q, K, V, output and the two FFN layers, plus
    attention's scores and weighted sum."""
    hidden, inner, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    per_token = 4 * hidden * hidden + 2 * hidden * inner + 2 * sequence * hidden
    return 2.0 * per_token * sequence * layers


def best_rate(run: Callable[[], object], flops: float, repeats: int = 20) -> float:
    """FLOP/s of the fastest of `repeats` calls, after warm-up."""
    return flops / float(timed(run, warmup=3, iterations=repeats).min())


def fp32_rate(m: int, k: int, n: int) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    return best_rate(lambda: a @ b, 2.0 * m * k * n)


def int8_rate(m: int, k: int, n: int) -> float:
    """ONNX Runtime's u8 x s8 MatMulInteger, the product the dynamic int8 artifact runs."""
    rng = np.random.default_rng(0)
    weight = helper.make_tensor("b", TensorProto.INT8, (k, n), rng.integers(-127, 128, (k, n), dtype=np.int8).tobytes(),
                                raw=True)
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "gemm",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, (m, k))],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, (m, n))], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    a = rng.integers(0, 256, (m, k), dtype=np.uint8)
    return best_rate(lambda: session.run(None, {"a": a}), 2.0 * m * k * n)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--pytorch-ms", type=float, help="a PyTorch eager time to set the floors against")
    args = parser.parse_args()
    config = json.loads(CONFIG.read_text())
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    shapes = {"square 4096": (4096, 4096, 4096), f"Q/K/V/out ({args.seq}x{hidden}x{hidden})": (args.seq, hidden, hidden),
              f"FFN up ({args.seq}x{hidden}x{inner})": (args.seq, hidden, inner),
              f"FFN down ({args.seq}x{inner}x{hidden})": (args.seq, inner, hidden)}
    print(f"{'product':<34} {'fp32 GFLOP/s':>13} {'int8 GOP/s':>11}")
    peaks = {"fp32": 0.0, "int8": 0.0}
    for name, shape in shapes.items():
        fp32, int8 = fp32_rate(*shape), int8_rate(*shape)
        peaks["fp32"], peaks["int8"] = max(peaks["fp32"], fp32), max(peaks["int8"], int8)
        print(f"{name:<34} {fp32 / 1e9:>13.1f} {int8 / 1e9:>11.1f}")
    flops = product_flops(config, args.seq)
    print(f"\n345M encoder, batch 1, sequence {args.seq}: {flops / 1e9:.1f} GFLOP of matrix products")
    for precision, peak in peaks.items():
        floor = flops / peak * 1000
        line = f"  {precision}: floor {floor:.0f} ms at the best rate above ({peak / 1e9:.0f} G/s)"
        if args.pytorch_ms:
            line += f"; at most {args.pytorch_ms / floor:.2f}x faster than PyTorch's {args.pytorch_ms:.0f} ms"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
