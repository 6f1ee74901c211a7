"""Parallel requests on one session: serialised, none lost, also across replicas sharing a store."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import pytest

from hope_core.engine import Engine
from tests.server.support import Api, running_app

pytestmark = pytest.mark.anyio

N = 6


def absorbed_by(out: dict) -> int:
    """Tokens one chat turn added to the stream (a reply cut by max_tokens is closed with <|end|>)."""
    usage = out["usage"]
    return usage["prompt_tokens"] + usage["completion_tokens"] + (out["choices"][0]["finish_reason"] == "length")


async def parallel_turns(apis: list[Api], session: str, n: int) -> list[dict]:
    async def one(i: int) -> dict:
        return await apis[i % len(apis)].chat(f"message number {i}", session=session, temperature=1.0, seed=i)

    return await asyncio.gather(*(one(i) for i in range(n)))


async def check_all_absorbed(api: Api, session: str, outs: list[dict]) -> None:
    versions = sorted(o["session"]["version"] for o in outs)
    assert versions == list(range(1, len(outs) + 1))  # consecutive: each commit built on the one before
    meta = await api.session(session)
    assert meta["version"] == len(outs)
    assert meta["tokens_absorbed"] == 1 + sum(absorbed_by(o) for o in outs)  # BOS + every turn
    assert meta["messages_logged"] == 2 * len(outs)
    by_version = sorted(outs, key=lambda o: o["session"]["version"])
    running = 1
    for o in by_version:  # each response reports the stream length right after its own commit
        running += absorbed_by(o)
        assert o["session"]["tokens_absorbed"] == running


async def test_parallel_requests_on_one_session(engine: Engine) -> None:
    async with running_app(engine, max_concurrent_requests=3) as api:
        outs = await parallel_turns([api], "together", N)
        await check_all_absorbed(api, "together", outs)


@pytest.mark.parametrize("store", ["redis", "sqlite"])
async def test_two_replicas_share_one_store(engine: Engine, store: str, tmp_path, request) -> None:
    """Two apps with their own in-process locks and caches, one store: the store's lock and the
    version compare-and-set keep every turn."""
    url = request.getfixturevalue("redis_store_url") if store == "redis" else f"sqlite:///{tmp_path}/shared.db"
    async with AsyncExitStack() as stack:
        apis = [await stack.enter_async_context(running_app(engine, url)) for _ in range(2)]
        outs = await parallel_turns(apis, "replicated", N)
        await check_all_absorbed(apis[0], "replicated", outs)
        # the second replica's cached state is stale now: it must notice and read the store
        out = await apis[1].chat("after all that", session="replicated")
        assert out["session"]["version"] == N + 1
        out = await apis[0].chat("and once more", session="replicated")
        assert out["session"]["version"] == N + 2
