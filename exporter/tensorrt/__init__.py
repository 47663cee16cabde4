"""TensorRT: engines built from an artifact's ONNX graphs through polygraphy (`engine`), and the check,
made without TensorRT, that its ONNX parser would take a graph and its optimization profile
(`parser_check`, over the operator table in `onnx_operators.json`). May import `exporter.flags` and
`runtime`; TensorRT itself is imported only where an engine is built.
"""
