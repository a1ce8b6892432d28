"""Read-ahead: run a loader for the next items on a background thread while the caller computes on this one.

Torch and safetensors release the GIL while copying and reading, so one worker thread overlaps I/O with compute.
While the caller holds item k, loads of items k+1 .. k+depth are running or done, and nothing else: RAM stays
bounded by ``depth + 1`` results however many items there are. The generator keeps no reference to the item it
has handed out, so ``del`` in the caller really frees it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class WaitClock:
    """Seconds the consumer spent blocked waiting for a loader: the I/O-wait figure the benchmarks report."""

    waited: float = 0.0
    items: int = 0


def prefetch(load: Callable[[T], R], items: Iterable[T], depth: int = 1, clock: WaitClock | None = None) -> Iterator[tuple[T, R]]:
    """Yield ``(item, load(item))`` in order, each exactly once, with up to ``depth`` loads running ahead."""
    todo = deque(items)
    if not todo:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="frugal-prefetch") as pool:
        pending: deque[tuple[T, Future]] = deque()
        while todo and len(pending) < depth + 1:
            item = todo.popleft()
            pending.append((item, pool.submit(load, item)))
        while pending:
            item, fut = pending.popleft()
            t0 = time.perf_counter()
            box = [fut.result()]  # re-raises the loader's exception in the consumer
            del fut
            if clock is not None:
                clock.waited += time.perf_counter() - t0
                clock.items += 1
            yield item, box.pop()  # the box is empty while the caller holds the result
            if todo:  # refill only now: while the caller held item k, only k+1..k+depth were loading
                nxt = todo.popleft()
                pending.append((nxt, pool.submit(load, nxt)))
