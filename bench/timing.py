"""Small helpers every benchmark shares: percentiles, device clocks, thread limits."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

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
