"""Graph export: a reference head to ONNX graphs with the dynamic axes `runtime.heads` declares
(`to_onnx`), and the cache that keeps each export by what it was made from so that the same graph is
never traced twice (`cache`). May import `exporter.model` and `runtime`.
"""
