"""Blocking engine work on worker threads, its results handed to async code as they come.

Engine calls are seconds of CPU/GPU work; on the event loop they would stall every other request.
`ThreadStream` runs a producer function on the engine's thread pool; the producer calls `emit(x)`
for each item (a generated token, say) and the async side iterates them as they arrive. Stopping
the stream (the client went away) makes the next `emit` raise inside the worker thread, so
generation ends within one token; `aclose()` waits for the thread to finish, so no engine work
outlives its request.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, Generic, TypeVar

import anyio

R = TypeVar("R")
Emit = Callable[[Any], None]

_DONE = object()


class Stopped(Exception):
    """Raised inside the worker by `emit` once the stream was stopped."""


class ThreadStream(Generic[R]):
    """`async for item in stream` yields what the producer emits; `stream.result` is its return."""

    def __init__(self, executor: Executor, produce: Callable[[Emit], R]) -> None:
        self.stop_event = threading.Event()
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._result: R | None = None
        self._future = self._loop.run_in_executor(executor, self._run, produce)

    def _push(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the process is shutting down
            self.stop_event.set()

    def _emit(self, item: Any) -> None:
        if self.stop_event.is_set():
            raise Stopped
        self._push(item)

    def _run(self, produce: Callable[[Emit], R]) -> R:
        try:
            return produce(self._emit)
        finally:
            self._push(_DONE)

    def __aiter__(self) -> ThreadStream[R]:
        return self

    async def __anext__(self) -> Any:
        item = await self._queue.get()
        if item is _DONE:
            self._result = await self._future  # re-raises the producer's exception, Stopped included
            raise StopAsyncIteration
        return item

    @property
    def result(self) -> R:
        if not self._future.done():
            raise RuntimeError("the stream has not finished")
        return self._result  # type: ignore[return-value]

    def stop(self) -> None:
        """Ask the producer to stop at its next `emit` (thread-safe, idempotent)."""
        self.stop_event.set()

    async def aclose(self) -> None:
        """Stop the producer and wait until its thread is done (also when being cancelled)."""
        self.stop()
        with anyio.CancelScope(shield=True):
            await asyncio.wait([self._future])
        if not self._future.cancelled():
            self._future.exception()  # mark it retrieved: a stopped producer's error is expected


async def run_blocking(executor: Executor, fn: Callable[..., R], *args: Any) -> R:
    return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
