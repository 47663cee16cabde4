"""Lower-precision graphs made from the fp32 ONNX graph. Precision lives in the graph itself, since
TensorRT 11 builds strongly typed networks only (no builder precision flags, no calibrators).

fp16: weights and activations in fp16 by ONNX Runtime's float16 converter, with inputs and outputs
kept as declared (int64 ids in, float32 out). LayerNormalization and Softmax stay in fp32, with
casts around them: their reductions are where fp16 overflows or loses the small differences.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_ir
from onnxruntime.transformers.float16 import convert_float_to_float16

from exporter.export import to_onnx
from exporter.export.to_onnx import check_graph, written

FP32_OPS = ["LayerNormalization", "Softmax"]


def to_fp16(source: Path, target: Path) -> list[Path]:
    """Write the fp16 form of the graph at `source` to `target`; returns the files written."""
    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True, op_block_list=FP32_OPS,
                                     disable_shape_infer=True)
    # The converter leaves the exporter's intermediate type annotations stale and inserts its casts
    # out of order: drop the annotations and sort the nodes topologically again.
    del model.graph.value_info[:]
    ir_model = onnx_ir.from_proto(model)
    ir_model.graph.sort()
    model = onnx_ir.to_proto(ir_model)
    large = sum(len(t.raw_data) for t in model.graph.initializer) > to_onnx.EXTERNAL_DATA_OVER
    onnx.save(model, str(target), save_as_external_data=large, location=f"{target.name}.data")
    check_graph(target)
    return written(target)
