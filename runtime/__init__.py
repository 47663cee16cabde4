"""The production runtime: `Session` runs an artifact built by `python -m exporter build`.

Needs only numpy, tokenizers and onnxruntime (or tensorrt); never torch.
"""

from .errors import UserError
from .session import Session

__all__ = ["Session", "UserError"]
