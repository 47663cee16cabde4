"""How many threads each engine may use: all the cores by default, or `MEGATRON_DEPLOY_THREADS`.

Several processes sharing a machine (test workers, batch workers, a server beside a build) each get
every core from ONNX Runtime, OpenVINO and PyTorch by default, and then wait on one another: two
2-thread processes on two cores built the trained demo 20% slower than two 1-thread ones. Setting the
variable to the cores each process should have fixes that, for sessions and builds alike.
"""

from __future__ import annotations

import os

import onnxruntime as ort

from .errors import UserError

VARIABLE = "MEGATRON_DEPLOY_THREADS"


def engine_threads() -> int | None:
    """The threads each engine may use; None: the engine's own default (every core)."""
    value = os.environ.get(VARIABLE, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"{VARIABLE}={value!r}: give a whole number of threads, 1 or more (or unset it)")
    return int(value)


def ort_options(threads: int | None = None) -> ort.SessionOptions:
    """ONNX Runtime's session options with its thread pool sized as `threads`, else `engine_threads`, says."""
    options = ort.SessionOptions()
    threads = threads or engine_threads()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1  # graphs run sequentially; the pool does the parallel work
    return options
