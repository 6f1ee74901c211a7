"""Engine work handed to the scheduler, its results handed to async code as they come.

A turn's engine work is a `hope_core.scheduler.Job`: the scheduler's thread runs it together
with every other request's, one batched step at a time, and calls the job's `emit` for each item
(the prompt's log-probabilities, then each generated token). `JobStream` turns those calls into
an async iterator. Stopping the stream (the client went away) makes the next `emit` raise inside
the scheduler, and the job is dropped before its next piece of work, so generation ends within
one step; `aclose()` waits until the scheduler has let the job go, so no engine work outlives
its request.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

import anyio

from hope_core.engine_process import EngineProcess
from hope_core.scheduler import Cancelled, Job, JobResult, Scheduler

R = TypeVar("R")

_DONE = object()


class Stopped(Exception):
    """Raised once the stream was stopped: inside the scheduler by `emit`, and to the reader."""


class JobStream:
    """`async for item in stream` yields what the job emits; `stream.result` is its JobResult."""

    def __init__(self, scheduler: Scheduler | EngineProcess, job: Job) -> None:
        self.stop_event = threading.Event()
        self._scheduler, self._job = scheduler, job
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._result: JobResult | None = None
        job.emit, job.cancel = self._emit, self.stop_event
        self._future = asyncio.wrap_future(scheduler.submit(job))
        self._future.add_done_callback(lambda _: self._push(_DONE))

    def _push(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the process is shutting down
            self.stop_event.set()

    def _emit(self, item: Any) -> None:
        if self.stop_event.is_set():
            raise Stopped
        self._push(item)

    def __aiter__(self) -> JobStream:
        return self

    async def __anext__(self) -> Any:
        item = await self._queue.get()
        if item is _DONE:
            self._job.emit = None  # the job is over; and job -> emit -> stream -> job is a cycle
            try:
                self._result = await self._future  # re-raises the job's exception
            except Cancelled:
                raise Stopped from None
            raise StopAsyncIteration
        return item

    @property
    def result(self) -> JobResult:
        if self._result is None:
            raise RuntimeError("the stream has not finished")
        return self._result

    def stop(self) -> None:
        """Ask the scheduler to drop the job before its next piece of work (thread-safe)."""
        self.stop_event.set()
        self._scheduler.cancel(self._job)

    async def aclose(self) -> None:
        """Stop the job and wait until the scheduler has let it go (also when being cancelled)."""
        self.stop()
        with anyio.CancelScope(shield=True):
            await asyncio.wait([self._future])
        self._job.emit = None  # let go of the cycle job -> emit -> stream -> job (and its state)
        if not self._future.cancelled():
            self._future.exception()  # mark it retrieved: a stopped job's error is expected


async def run_blocking(executor: Executor, fn: Callable[..., R], *args: Any) -> R:
    return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
