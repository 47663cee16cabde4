"""INT4 graphs: every weighted matrix product as ONNX Runtime's `MatMulNBits` (4-bit weights with one
scale, and a zero point if asymmetric, per block of a column), made by ONNX Runtime's own quantizer.
Activations stay float in the graph; with `accuracy_level` 4 the kernel multiplies in int8, quantizing
each block of the activation as it goes (AVX2 and VNNI integer products).

Weight-only quantization is a decode form: one token multiplies by every weight, so a step costs the
bytes of the weights it reads, and 4 bits are an eighth of fp32's. Products a repair keeps nearer float
are `MatMulNBits` at 8 bits, or left in float. Pieces are quantized one at a time, as for int8 (`in_pieces`).
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
from onnx import numpy_helper

from runtime.errors import UserError
from runtime.threads import ort_options

from exporter.precision.int8 import Feed, Tensors, large, chosen_nodes, in_pieces, measuring, quiet, value_infos

METHODS = ("rtn", "hqq")  # plain rounding to the nearest level; ONNX Runtime's half-quadratic quantization
BLOCK_SIZES = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class Int4Settings:
    """How the 4-bit weights are made (the recipe's [int4] section)."""
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 4  # 4: int8 products (AVX2/VNNI); 1: fp32 products, slower
    method: str = "rtn"

    @classmethod
    def from_recipe(cls, section: dict[str, object], where: str) -> Int4Settings:
        unknown = set(section) - {"block_size", "symmetric", "accuracy_level", "method"}
        if unknown:
            raise UserError(f"{where}: unknown int4 keys: {', '.join(sorted(unknown))}")
        settings = cls(**section)  # type: ignore[arg-type]
        if type(settings.block_size) is not int or settings.block_size not in BLOCK_SIZES:
            raise UserError(f"{where}: int4.block_size must be one of {', '.join(map(str, BLOCK_SIZES))}, "
                            f"got {settings.block_size!r}")
        if not isinstance(settings.symmetric, bool):
            raise UserError(f"{where}: int4.symmetric must be true or false, got {settings.symmetric!r}")
        if type(settings.accuracy_level) is not int or settings.accuracy_level not in (0, 1, 2, 3, 4):
            raise UserError(f"{where}: int4.accuracy_level must be 0-4, got {settings.accuracy_level!r}")
        if settings.method not in METHODS:
            raise UserError(f"{where}: int4.method must be one of {', '.join(METHODS)}, got {settings.method!r}")
        if settings.method == "hqq" and settings.symmetric:
            raise UserError(f"{where}: int4.method hqq fits a zero point per block: set int4.symmetric = false")
        return settings

    def describe(self) -> str:
        return (f"MatMulNBits: 4-bit weights ({self.method}), {'symmetric' if self.symmetric else 'asymmetric'}, "
                f"one scale per {self.block_size} weights of a column, accuracy_level {self.accuracy_level}; "
                "activations float")


def int4_nodes(model: onnx.ModelProto, keep_float: list[str]) -> list[str]:
    """The products int4 quantizes: int8's (weighted, not classifiers) that are MatMul, which is what
    `MatMulNBits` replaces (the pooler's Gemm stays float)."""
    kinds = {n.name: n.op_type for n in model.graph.node}
    return [name for name in chosen_nodes(model, keep_float) if kinds[name] == "MatMul"]


def untied(source: Path) -> Path:
    """`source`, or a copy of its graph beside it where each weight a product reads through a Transpose (the
    causal LM's vocabulary projection, which shares the word embeddings' table) is an initializer of its
    own, already transposed: the quantizer only replaces products whose weight is an initializer, and the
    vocabulary projection is the largest of a causal LM's decode step."""
    model = onnx.load(str(source), load_external_data=False)
    weights = {t.name: t for t in model.graph.initializer}
    transposes = {n.output[0]: n for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in weights
                  and len(weights[n.input[0]].dims) == 2}
    products = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in transposes]
    if not products:
        return source
    target = source.with_name(f"{source.stem}.untied.onnx")
    with Tensors(target, source.parent, external=large(source)) as tensors:
        for name in dict.fromkeys(transposes[n.input[1]].input[0] for n in products):
            table = numpy_helper.to_array(tensors.loaded(weights[name]))
            tensors.add([numpy_helper.from_array(np.ascontiguousarray(table.T), f"{name}.transposed")])
    for node in products:
        node.input[1] = f"{transposes[node.input[1]].input[0]}.transposed"
    read = {i for n in model.graph.node for i in n.input}
    kept = [n for n in model.graph.node if not (n.op_type == "Transpose" and n.output[0] in transposes
                                                and n.output[0] not in read)]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    model.graph.initializer.extend(tensors.kept)
    onnx.save(model, str(target))
    return target


@functools.cache
def nbits_quantizer() -> Any:
    """ONNX Runtime's MatMulNBits quantizer module. Importing it configures the root logger at INFO
    (`logging.basicConfig`), which would print every library's info lines for the rest of the process:
    undone here."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    module = importlib.import_module("onnxruntime.quantization.matmul_nbits_quantizer")
    root.handlers[:] = handlers
    root.setLevel(level)
    return module


def quantize_piece(settings: Int4Settings, eight_bits: frozenset[str], piece: Path, out: Path, nodes: list[str]) -> None:
    """ONNX Runtime's MatMulNBits quantization of `nodes` of one piece: those in `eight_bits` at 8 bits,
    the others at 4. (Its quantizer takes the nodes to leave alone; `nodes_to_include` only adds to the
    op types it quantizes anyway.)"""
    model, nbits = onnx.load(str(piece)), nbits_quantizer()
    for bits in (4, 8):
        these = {n for n in nodes if (n in eight_bits) == (bits == 8)}
        if not these:
            continue
        if settings.method == "hqq" and bits == 4:
            config = nbits.HQQWeightOnlyQuantConfig(block_size=settings.block_size, bits=bits)
        else:
            config = nbits.DefaultWeightOnlyQuantConfig(block_size=settings.block_size, is_symmetric=settings.symmetric,
                                                  accuracy_level=settings.accuracy_level, bits=bits)
        quantizer = nbits.MatMulNBitsQuantizer(model, bits=bits, block_size=settings.block_size,
                                         is_symmetric=settings.symmetric, accuracy_level=settings.accuracy_level,
                                         nodes_to_exclude=[n.name for n in model.graph.node if n.name not in these],
                                         algo_config=config)
        with warnings.catch_warnings():  # hqq hands torch a read-only array it only reads
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            quantizer.process()
        model = quantizer.model.model
    onnx.save(model, str(out))


def to_int4(source: Path, target: Path, settings: Int4Settings, eight_bits: list[str], keep_float: list[str],
            log: Callable[[str], None] = lambda _: None) -> list[Path]:
    """Write the int4 graph of `source` (an `untied` graph): its products as MatMulNBits, those whose module
    paths `eight_bits` globs match at 8 bits, those `keep_float` matches left float."""
    model = onnx.load(str(source), load_external_data=False)
    products = set(int4_nodes(model, []))
    eight = frozenset(products - set(chosen_nodes(model, eight_bits))) if eight_bits else frozenset()
    with quiet():
        return in_pieces(source, target, lambda loaded: int4_nodes(loaded, keep_float),
                         functools.partial(quantize_piece, settings, eight), log)


def product_noise(source: Path, int4: Path, feeds: list[Feed]) -> dict[str, float]:
    """Each quantized product's signal-to-noise ratio (dB) over `feeds`: its MatMulNBits output against the
    float product's, both given the float graph's input (the error the product itself adds, not what it
    inherits). Keyed by the product's output tensor."""
    quantized = onnx.load(str(int4), load_external_data=False)
    products = [n for n in quantized.graph.node if n.op_type == "MatMulNBits"]
    model = onnx.load(str(source), load_external_data=False)
    infos = value_infos(model)
    names = list(dict.fromkeys(name for n in products for name in (n.input[0], n.output[0])))
    session = measuring(source, model, [infos[name] for name in names])
    captured = [dict(zip(names, session.run(names, feed))) for feed in feeds]
    del session
    weights = {t.name: t for t in quantized.graph.initializer}
    noise = {}
    with Tensors(int4, int4.parent, external=False) as tensors:
        for node in products:
            graph = onnx.helper.make_graph([node], "product", [infos[node.input[0]]], [infos[node.output[0]]],
                                           [tensors.loaded(weights[i]) for i in node.input if i in weights])
            one = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("com.microsoft", 1),
                                                               *quantized.opset_import], ir_version=quantized.ir_version)
            run = onnxruntime.InferenceSession(one.SerializeToString(), ort_options(), providers=["CPUExecutionProvider"])
            signal = error = 0.0
            for values in captured:
                exact = values[node.output[0]].astype(np.float64)
                got = run.run(None, {node.input[0]: values[node.input[0]]})[0]
                signal += float(np.sum(exact * exact))
                error += float(np.sum((exact - got) ** 2))
            tiny = float(np.finfo("float").eps)
            noise[node.output[0]] = 10 * math.log10(max(signal, tiny) / max(error, tiny))
    return noise
