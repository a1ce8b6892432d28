"""Read-ahead: run a loader for item k+1 on a background thread while the caller computes on item k.

Torch and safetensors release the GIL while copying and reading, so one worker thread overlaps I/O with compute.
``depth`` bounds how many results wait in memory at once (RAM stays flat however many items there are).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class WaitClock:
    """Seconds the consumer spent blocked waiting for a loader: the I/O-wait figure the benchmarks report."""

    waited: float = 0.0
    items: int = field(default=0)


def prefetch(load: Callable[[T], R], items: Iterable[T], depth: int = 1, clock: WaitClock | None = None) -> Iterator[tuple[T, R]]:
    """Yield ``(item, load(item))`` in order, each exactly once, with up to ``depth`` loads running ahead."""
    items = list(items)
    if not items:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="frugal-prefetch") as pool:
        pending: deque[tuple[T, Future]] = deque()
        nxt = 0
        while nxt < len(items) and len(pending) < depth + 1:
            pending.append((items[nxt], pool.submit(load, items[nxt])))
            nxt += 1
        while pending:
            item, fut = pending.popleft()
            t0 = time.perf_counter()
            result = fut.result()  # re-raises the loader's exception in the consumer
            if clock is not None:
                clock.waited += time.perf_counter() - t0
                clock.items += 1
            if nxt < len(items):
                pending.append((items[nxt], pool.submit(load, items[nxt])))
                nxt += 1
            yield item, result
            del result  # drop our reference before the next wait so at most depth+1 results are alive
