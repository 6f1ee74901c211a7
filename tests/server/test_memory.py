"""A finished request leaves none of its session states behind: they are megabytes each, and a
reference cycle keeps them until Python's occasional full collection, so the server's memory
grows far past the session cache's bound."""

from __future__ import annotations

import asyncio
import gc

import pytest

from hope_core.engine import Engine
from hope_core.state import SessionState
from tests.server.support import running_app

pytestmark = pytest.mark.anyio


def live_states() -> int:
    return sum(type(o) is SessionState for o in gc.get_objects())


@pytest.mark.parametrize("stream", [False, True])
async def test_requests_leave_no_states_in_cycles(engine: Engine, stream: bool) -> None:
    async with running_app(engine, session_cache_bytes=0) as api:
        await api.chat("warm up", session="w")
        gc.collect()
        gc.disable()  # what refcounting alone frees: cycles wait for the collector
        try:
            before = live_states()
            for i in range(4):
                r = await api.client.post("/v1/chat/completions", json={
                    "model": api.model, "session_id": f"s{i}", "max_tokens": 4, "stream": stream,
                    "messages": [{"role": "user", "content": "hello"}]})
                assert r.status_code == 200, r.text
            await asyncio.sleep(0.05)  # callbacks the loop has still to run hold the last one
            left = live_states() - before
        finally:
            gc.enable()
    assert left == 0, f"{left} session states outlived their requests"
