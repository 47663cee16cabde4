"""Benchmark: how close each artifact runs the 345M encoder to the best this CPU reaches on its products.

The encoder's time is almost all matrix products (ONNX Runtime profile: 91% fp32, 82% int8). Each
of its products (Q, K, V, attention output, the two FFN layers; attention's scores and weighted sum)
is timed on its own shape with every library installed here: fp32 through PyTorch (oneDNN/MKL),
ONNX Runtime's MatMul (MLAS) and numpy (its BLAS); int8 through ONNX Runtime's u8 x s8
MatMulInteger (VNNI where present), attention's products staying float. The roofline is the sum over
products of their arithmetic at the fastest rate any library reached on that shape: no backend runs
the model faster without faster products. The artifacts are timed in the same process, between two
rounds of product timings (the best of both is kept), since this shared machine's speed drifts.

    python benchmarks/roofline_345m.py [--seq 128] [ARTIFACT.json ...]
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

from exporter.delivery.bench import encoder_inputs, machine
from runtime.machine import timed
from runtime import Session
from runtime.manifest import Manifest

CONFIG = Path(__file__).resolve().parent / "megatron-bert-345m.json"
Shape = tuple[int, int, int, int]  # (batched copies, m, k, n)


def products(config: dict[str, int], sequence: int) -> dict[str, tuple[Shape, int, bool]]:
    """Name -> (shape, how many per layer, quantized in the int8 artifact)."""
    hidden, inner, heads = config["hidden_size"], config["intermediate_size"], config["num_attention_heads"]
    size = hidden // heads
    return {"Q/K/V": ((1, sequence, hidden, hidden), 3, True),
            "attention output": ((1, sequence, hidden, hidden), 1, True),
            "FFN up": ((1, sequence, hidden, inner), 1, True),
            "FFN down": ((1, sequence, inner, hidden), 1, True),
            "attention scores": ((heads, sequence, size, sequence), 1, False),
            "attention x values": ((heads, sequence, sequence, size), 1, False)}


def flops(shape: Shape) -> float:
    copies, m, k, n = shape
    return 2.0 * copies * m * k * n


def fastest(run: Callable[[], object]) -> float:
    """Seconds of the fastest of 20 calls, after warm-up."""
    return float(timed(run, warmup=3, iterations=20).min())


def ort_session(node: str, a_type: int, b: np.ndarray, b_type: int, out_type: int, shape: Shape) -> ort.InferenceSession:
    copies, m, k, n = shape
    lead = [copies] if copies > 1 else []
    weight = helper.make_tensor("b", b_type, b.shape, b.tobytes(), raw=True)
    graph = helper.make_graph([helper.make_node(node, ["a", "b"], ["y"])], "product",
                              [helper.make_tensor_value_info("a", a_type, [*lead, m, k])],
                              [helper.make_tensor_value_info("y", out_type, [*lead, m, n])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def fp32_rates(shape: Shape) -> dict[str, float]:
    copies, m, k, n = shape
    lead = [copies] if copies > 1 else []
    a, b = torch.randn(*lead, m, k), torch.randn(*lead, k, n)
    a_np, b_np = a.numpy(), b.numpy()
    session = ort_session("MatMul", TensorProto.FLOAT, b_np, TensorProto.FLOAT, TensorProto.FLOAT, shape)
    runs = {"pytorch": lambda: a @ b, "onnxruntime": lambda: session.run(None, {"a": a_np}),
            "numpy": lambda: a_np @ b_np}
    return {library: flops(shape) / fastest(run) for library, run in runs.items()}


def int8_rates(shape: Shape) -> dict[str, float]:
    """ONNX Runtime's u8 x s8 MatMulInteger, the product the dynamic int8 artifact runs."""
    _, m, k, n = shape
    rng = np.random.default_rng(0)
    b = rng.integers(-64, 64, (k, n), dtype=np.int8)  # 7-bit weights, as the artifact's
    session = ort_session("MatMulInteger", TensorProto.UINT8, b, TensorProto.INT8, TensorProto.INT32, shape)
    a = rng.integers(0, 256, (m, k), dtype=np.uint8)
    return {"onnxruntime": flops(shape) / fastest(lambda: session.run(None, {"a": a}))}


def product_rates(config: dict[str, int], sequence: int) -> dict[str, tuple[dict[str, float], dict[str, float]]]:
    """Product -> (fp32 rates, int8 rates) per library, in FLOP/s."""
    return {name: (fp32_rates(shape), int8_rates(shape) if quantized else {})
            for name, (shape, _, quantized) in products(config, sequence).items()}


def best(first: dict[str, float], second: dict[str, float]) -> dict[str, float]:
    return {library: max(rate, second[library]) for library, rate in first.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="*", type=Path, metavar="ARTIFACT", help="345M encoder artifacts to time")
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    config = json.loads(CONFIG.read_text())
    layers = config["num_hidden_layers"]
    here = machine()
    print(f"{here['cpu']}, {here['cores']} cores, flags: {', '.join(here['cpu_flags'])}; torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}, numpy {np.__version__}\n")
    first = product_rates(config, args.seq)
    timings = {}
    for path in args.artifacts:
        session = Session(path)
        feed = encoder_inputs(Manifest.load(path), 1, args.seq)
        timings[path] = (session.manifest.precision, timed(lambda: session.run(feed), warmup=3, iterations=20))
    second = product_rates(config, args.seq)
    rates = {name: (best(first[name][0], second[name][0]), best(first[name][1], second[name][1])) for name in first}

    print(f"{'product (x per layer)':<44} {'GFLOP':>6} {'pytorch':>8} {'onnxrt':>8} {'numpy':>8} {'int8 onnxrt':>12}"
          "   (G/s, best of two rounds)")
    floors = {"fp32": 0.0, "int8": 0.0}
    total = 0.0
    for name, (shape, count, _) in products(config, args.seq).items():
        fp32, int8 = rates[name]
        work = flops(shape) * count * layers
        total += work
        floors["fp32"] += work / max(fp32.values())
        floors["int8"] += work / max({**fp32, **int8}.values())
        label = f"{name} ({'x'.join(map(str, shape[1:]))}{f', {shape[0]} heads' if shape[0] > 1 else ''}) x{count}"
        print(f"{label:<44} {work / 1e9:>6.1f} {fp32['pytorch'] / 1e9:>8.0f} {fp32['onnxruntime'] / 1e9:>8.0f} "
              f"{fp32['numpy'] / 1e9:>8.0f} {int8['onnxruntime'] / 1e9 if int8 else float('nan'):>12.0f}")
    print(f"\n345M encoder, batch 1, sequence {args.seq}: {total / 1e9:.1f} GFLOP of matrix products")
    for precision, seconds in floors.items():
        print(f"  {precision} roofline: {seconds * 1000:.0f} ms (each product at the fastest library's rate on its shape)")
    for path, (precision, times) in timings.items():
        floor = floors["int8" if precision == "int8" else "fp32"] * 1000
        fastest, median = times.min() * 1000, float(np.median(times)) * 1000
        print(f"  {path.name:<14} {precision:<5} fastest {fastest:>6.0f} ms, p50 {median:>6.0f} ms: "
              f"{floor / fastest:.0%} of its roofline's speed (fastest), {floor / median:.0%} (p50)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
