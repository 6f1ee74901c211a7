"""Small helpers every benchmark shares: percentiles, device clocks, thread limits."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

import torch


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


class _Rated(Protocol):
    @property
    def tokens_per_s(self) -> float: ...


R = TypeVar("R", bound=_Rated)


def sweep_speedup(sweeps: Sequence[Sequence[R]], level: Callable[[R], int], n: int) -> float | None:
    """Tokens/s at level `n` over level 1: the median over the sweeps of the ratio within a sweep
    (a sweep runs every level once, back to back, so a slow spell of a shared machine lands on
    both sides of its ratio). `level(row)` says a row's level; rows have `tokens_per_s`."""
    ratios = []
    for sweep in sweeps:
        one = next((r for r in sweep if level(r) == 1), None)
        many = next((r for r in sweep if level(r) == n), None)
        if one is not None and many is not None and one.tokens_per_s:
            ratios.append(many.tokens_per_s / one.tokens_per_s)
    return median(ratios) if ratios else None


def sync(device: torch.device | str) -> None:
    """Wait for queued device work, so that a wall clock read afterwards includes it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device | str = "cpu") -> float:
    sync(device)
    return time.perf_counter()


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def limit_threads(n: int | None = None) -> int:
    """Use at most the cores we have: more intra-op threads than cores only adds contention."""
    n = n or available_cores()
    torch.set_num_threads(n)
    return n
