"""The one interleaved timing harness, shared by ``csd bench`` and ``csd tune``.

How a method is timed (every figure the project reports comes from here):
* **interleaved**: for every trial and case (a prompt, or a prompt x length x mode), every method
  runs once, in an order rotated from case to case so no method always runs first;
* **warm-up**: callers run one untimed generation per method first (``warm_up``);
* **wall time**: ``time.perf_counter`` around the whole call (prefill, decoding, output), read
  after the device is synchronised;
* **garbage collection**: setup garbage is collected once and frozen (``frozen_setup_garbage``),
  and a collection runs before every timed call, outside the timer, so no method pays for
  another's garbage.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

M = TypeVar("M")
C = TypeVar("C")


@dataclass(frozen=True)
class Timed(Generic[M, C]):
    """One timed call: which trial, case and method, what it returned, its wall seconds, and
    where it ran in that case's order."""

    trial: int
    case_index: int
    case: C
    method: M
    result: object
    seconds: float
    position: int


@contextlib.contextmanager
def frozen_setup_garbage() -> Iterator[None]:
    """Collect what setup (model loading) left and keep it out of later collections."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def rotated(items: Sequence[M], shift: int) -> list[M]:
    shift %= len(items)
    return list(items[shift:]) + list(items[:shift])


def timed_call(call: Callable[[], object], synchronize: Callable[[], None] = lambda: None) -> tuple[object, float]:
    """(result, wall seconds) of ``call``, after a garbage collection and a device sync."""
    gc.collect()
    synchronize()
    started = time.perf_counter()
    result = call()
    synchronize()
    return result, time.perf_counter() - started


def warm_up(methods: Sequence[M], run: Callable[[M], object]) -> None:
    """One untimed call per method (caches, allocator pools, lazy imports)."""
    for method in methods:
        gc.collect()
        run(method)


def interleaved(
    methods: Sequence[M],
    cases: Sequence[C],
    trials: int,
    run: Callable[[M, C, int], object],
    synchronize: Callable[[], None] = lambda: None,
    order_offset: Callable[[int, C], int] = lambda case_index, case: 0,
) -> Iterator[Timed[M, C]]:
    """Time ``run(method, case, trial)`` for every trial, case and method, interleaved (module
    docstring). ``order_offset`` adds to the rotation (bench: one more step per mode)."""
    for trial in range(trials):
        for index, case in enumerate(cases):
            order = rotated(methods, index + trial + order_offset(index, case))
            for position, method in enumerate(order):
                result, seconds = timed_call(lambda m=method, c=case, t=trial: run(m, c, t), synchronize)
                yield Timed(trial, index, case, method, result, seconds, position)
