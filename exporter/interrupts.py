"""Ctrl-C while the native libraries load: the process ends at once, saying so.

Nothing has started then, and torch's and ONNX Runtime's start-up code does not survive a
KeyboardInterrupt raised inside it: measured here, about 1 Ctrl-C in 10 at that moment ended in an
abort (exit -6, "terminate called after throwing an instance of 'python_error'") or a crash by
SIGINT, after the message. Once the work starts, Ctrl-C raises KeyboardInterrupt again, so that
cleanups run (exit 130 from the CLI).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

MESSAGE = b"interrupted; nothing was written\n"


def _exit_at_once(signum: int, frame: FrameType | None) -> None:
    os.write(2, MESSAGE)
    os._exit(130)


@contextmanager
def exit_at_once() -> Iterator[None]:
    """Within: Ctrl-C ends the process at once. Only the main thread handles signals; elsewhere, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, _exit_at_once)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
