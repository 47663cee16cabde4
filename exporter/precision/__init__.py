"""Precision lowering: fp16 (`fp16`) and int8 (`int8`: ONNX Runtime's quantizers, one piece of the
graph at a time, and each layer's sensitivity) graphs made from the fp32 graph, with the calibration
inputs int8 needs (`calibration`). May import `exporter.export` and `runtime`; it never sees PyTorch's
model, only graphs.
"""
