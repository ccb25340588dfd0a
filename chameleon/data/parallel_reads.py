"""Many small reads at once, in order, with bounded memory.

Object stores answer one GET in tens of milliseconds whatever its size, so reading a run's
partitions one after another (about 15,000 GETs at a million users) is bound by latency, not
bandwidth. `read_in_order` keeps `threads` reads in flight and hands results back in item order;
at most `threads` results exist at once (running or waiting to be taken), so memory is bounded
by `threads` partitions whatever their number.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def read_in_order(read: Callable[[T], R], items: Iterable[T], threads: int) -> Iterator[R]:
    """`map(read, items)` with up to `threads` calls running at once; results in item order.

    An exception of a read is raised when its result is taken (later reads are cancelled)."""
    if threads <= 1:
        yield from map(read, items)
        return
    it = iter(items)
    window: deque[Future[R]] = deque()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="read") as pool:
        try:
            for item in it:
                window.append(pool.submit(read, item))
                if len(window) >= threads:
                    break
            while window:
                result = window.popleft().result()
                for item in it:  # refill one slot before handing the result out
                    window.append(pool.submit(read, item))
                    break
                yield result
        finally:
            for f in window:
                f.cancel()
