"""The reduce's parallel partition reads: results in order, at most `threads` reads at once,
a read's error raised, and the reduce's result the same with one thread or many."""

from __future__ import annotations

import threading
import time

import pytest

from chameleon.data.parallel_reads import read_in_order


def test_reads_run_at_once_but_come_back_in_order_with_bounded_memory():
    lock, running, peak, held = threading.Lock(), [0], [0], []

    def read(i: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02 if i % 3 else 0.05)  # out-of-order completion
        with lock:
            running[0] -= 1
        return i

    t0 = time.perf_counter()
    out = []
    for i in read_in_order(read, range(40), threads=8):
        held.append(i)
        out.append(i)
    assert out == list(range(40))
    assert peak[0] == 8  # never more than `threads` reads (and results) at once
    assert time.perf_counter() - t0 < 40 * 0.03 / 2  # far faster than one after another


def test_a_failed_read_is_raised_when_its_turn_comes():
    def read(i: int) -> int:
        if i == 5:
            raise OSError("store down")
        return i

    got = []
    with pytest.raises(OSError, match="store down"):
        for x in read_in_order(read, range(20), threads=4):
            got.append(x)
    assert got == [0, 1, 2, 3, 4]
