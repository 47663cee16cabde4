"""Validation against PyTorch: each graph's outputs beside the reference head's on the shape limits'
corner inputs (`logits`), and the head's task metric on an evaluation set for PyTorch fp32 and every
form the build writes, measured through `runtime.Session` (`task_metric`). May import `exporter.model`,
`exporter.export` and `runtime`.
"""
