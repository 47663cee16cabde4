"""How a build reports its progress: a line per step, with its time and the peak memory so far."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Log = Callable[[str], None]


def say(message: str) -> None:
    print(message, flush=True)


@contextmanager
def step(log: Log, what: str) -> Iterator[None]:
    log(f"- {what} ...")
    start = time.perf_counter()
    yield
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB, the most this process held yet
    log(f"  done in {time.perf_counter() - start:.1f} s (peak memory so far {peak:.2f} GiB)")
