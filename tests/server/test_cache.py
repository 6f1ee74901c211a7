"""The session cache (issue #4, item 2): an LRU of decoded states bounded by bytes, validated
against the store's version before every use, written through on commit.

Real engine, real stores (memory, SQLite files, the Redis at 127.0.0.1:6379), real HTTP through
the app. The stores are the real ones, subclassed only to count their reads or to fail a commit.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any
from urllib.parse import urlsplit

import pytest

import server.app
from hope_core.engine import Engine
from server.metrics import Metrics
from server.sessions import StateCache, state_nbytes
from server.stores.base import SessionMeta, SessionRecord, StateStore, StoreUnavailable
from server.stores.memory import MemoryStore
from server.stores.redis import RedisStore
from server.stores.sqlite import SQLiteStore
from tests.server.support import Api, running_app
from tests.server.test_concurrency import absorbed_by
from tests.server.test_metrics import scrape, value

pytestmark = pytest.mark.anyio


# ---- real stores that count their reads, or fail one commit ----------------------------------------

class _Instrumented:
    """Mixed into a real store: records each `load` (True: the blob was asked for too) and can
    make the next commit fail (`"unavailable"`) or be refused (`"refused"`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loads: list[bool] = []
        self.fail_next_commit: str | None = None

    async def load(self, tenant: str, session_id: str, with_state: bool = True) -> SessionRecord | None:
        self.loads.append(with_state)
        return await super().load(tenant, session_id, with_state)  # type: ignore[misc]

    async def commit(self, record: SessionRecord, expected_version: int, lock_token: str | None) -> bool:
        fail, self.fail_next_commit = self.fail_next_commit, None
        if fail == "unavailable":
            raise StoreUnavailable("injected: the store went away")
        if fail == "refused":
            return False
        return await super().commit(record, expected_version, lock_token)  # type: ignore[misc]


class CountingMemoryStore(_Instrumented, MemoryStore):
    pass


class CountingSQLiteStore(_Instrumented, SQLiteStore):
    pass


class CountingRedisStore(_Instrumented, RedisStore):
    pass


def _open_instrumented(url: str, ttl_s: float = 0.0) -> StateStore:
    scheme = urlsplit(url).scheme
    cls = {"memory": CountingMemoryStore, "sqlite": CountingSQLiteStore}.get(scheme, CountingRedisStore)
    return cls(url, ttl_s)


@pytest.fixture
def instrumented(monkeypatch: pytest.MonkeyPatch) -> None:
    """Apps started in this test open their store as an instrumented one."""
    monkeypatch.setattr(server.app, "open_store", _open_instrumented)


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/sessions.db"
    return request.getfixturevalue("redis_store_url")


@pytest.fixture(params=["sqlite", "redis"])
def shared_store_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """A store two replicas (apps) can share."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/shared.db"
    return request.getfixturevalue("redis_store_url")


def store_of(api: Api) -> _Instrumented:
    store = api.app.state.ctx.store
    assert isinstance(store, _Instrumented)
    return store


def cache_of(api: Api) -> StateCache:
    return api.app.state.ctx.sessions.cache


def key(session: str) -> tuple[str, str]:
    return ("default", session)


async def cache_metrics(api: Api) -> dict[str, float]:
    s = await scrape(api)
    return {"hits": value(s, "hope_session_cache_hits_total"),
            "absent": value(s, "hope_session_cache_misses_total", reason="absent"),
            "stale": value(s, "hope_session_cache_misses_total", reason="stale"),
            "evictions": value(s, "hope_session_cache_evictions_total"),
            "bytes": value(s, "hope_session_cache_bytes"),
            "sessions": value(s, "hope_sessions_cached")}


# ---- the bound ----------------------------------------------------------------------------------

@pytest.mark.parametrize("bound", ["bytes", "count"])
async def test_bound_evicts_least_recently_used_first(engine: Engine, bound: str) -> None:
    size = state_nbytes(engine.new_session())  # every state of one checkpoint has the same shapes
    limits = ({"session_cache_bytes": 2 * size + size // 2} if bound == "bytes"
              else {"session_cache_size": 2, "session_cache_bytes": 100 * size})
    async with running_app(engine, **limits) as api:
        cache = cache_of(api)
        await api.chat("the first session", session="a")
        await api.chat("the second session", session="b")
        assert cache.keys() == [key("a"), key("b")]
        m = await cache_metrics(api)
        assert m["bytes"] == 2 * size == cache.nbytes and m["sessions"] == 2 and m["evictions"] == 0

        await api.chat("a again", session="a")  # a hit, and a is the most recently used now
        await api.chat("the third session", session="c")  # so b goes, not a
        assert cache.keys() == [key("a"), key("c")]
        m = await cache_metrics(api)
        assert m["evictions"] == 1 and m["hits"] == 1 and m["absent"] == 0
        assert m["bytes"] == 2 * size and m["sessions"] == 2

        out = await api.chat("b again", session="b")  # evicted: read from the store, a goes
        assert out["session"]["version"] == 2
        assert cache.keys() == [key("c"), key("b")]
        m = await cache_metrics(api)
        assert m["evictions"] == 2 and m["hits"] == 1 and m["absent"] == 1 and m["stale"] == 0


async def test_zero_disables_and_an_oversized_state_is_not_cached(engine: Engine) -> None:
    size = state_nbytes(engine.new_session())
    for limits in ({"session_cache_bytes": 0}, {"session_cache_size": 0}, {"session_cache_bytes": size - 1}):
        async with running_app(engine, **limits) as api:
            await api.chat("one", session="s")
            out = await api.chat("two", session="s")
            assert out["session"]["version"] == 2
            assert len(cache_of(api)) == 0
            m = await cache_metrics(api)
            assert m["hits"] == 0 and m["absent"] == 1 and m["bytes"] == 0 and m["sessions"] == 0


def test_an_older_version_never_replaces_a_newer_one(engine: Engine) -> None:
    """A `learn=false` read that decoded version 1 may finish after a commit cached version 2."""
    cache = StateCache(1 << 30, 10, Metrics())
    s1, s2 = engine.new_session(), engine.new_session()

    def meta(uid: str, version: int) -> SessionMeta:
        return SessionMeta("default", "s", uid, version, 0.0, float(version), 0, {}, 0, "", "float32")

    cache.put(key("s"), meta("uid", 2), s2)
    cache.put(key("s"), meta("uid", 1), s1)
    item = cache.get(key("s"))
    assert item is not None and item.version == 2 and item.state is s2
    cache.put(key("s"), meta("another-uid", 1), s1)  # a re-created session: its own versions
    item = cache.get(key("s"))
    assert item is not None and (item.uid, item.version) == ("another-uid", 1)
    assert cache.nbytes == state_nbytes(s1) and len(cache) == 1
    cache.drop(key("s"))
    assert cache.nbytes == 0 and len(cache) == 0


# ---- a hit reads no blob ---------------------------------------------------------------------------

@pytest.mark.usefixtures("instrumented")
async def test_a_hit_reads_metadata_once_and_no_blob(engine: Engine, store_url: str) -> None:
    async with running_app(engine, store_url) as api:
        store, cache = store_of(api), cache_of(api)
        first = await api.chat("a first turn, long enough to close a chunk of sixteen tokens", session="h")
        assert store.loads == [True]  # nothing cached yet: the blob is asked for (there is none)
        entry = cache.get(key("h"))
        assert entry is not None and entry.version == 1  # written through by the commit
        assert entry.state.state.last_hidden.device == engine.device  # kept where the engine works

        store.loads.clear()
        second = await api.chat("a second turn", session="h")
        assert store.loads == [False]  # one read of metadata and history, no blob
        assert second["session"]["version"] == 2
        assert second["session"]["tokens_absorbed"] == first["session"]["tokens_absorbed"] + absorbed_by(second)

        store.loads.clear()
        peek = await api.chat("only a look", session="h", learn=False)
        assert store.loads == [False] and peek["session"]["version"] == 2
        m = await cache_metrics(api)
        assert m["hits"] == 2 and m["absent"] == 0 and m["stale"] == 0


# ---- commits write through; a failed one drops the entry ---------------------------------------------

@pytest.mark.usefixtures("instrumented")
@pytest.mark.parametrize("failure", ["unavailable", "refused"])
async def test_a_failed_commit_drops_the_entry(engine: Engine, tmp_path, failure: str) -> None:
    async with running_app(engine, f"sqlite:///{tmp_path}/sessions.db") as api:
        store, cache = store_of(api), cache_of(api)
        await api.chat("committed", session="f")
        assert key("f") in cache
        store.fail_next_commit = failure
        await api.chat("not committed", session="f", expect=503 if failure == "unavailable" else 409)
        assert key("f") not in cache
        m = await cache_metrics(api)
        assert m["sessions"] == 0 and m["bytes"] == 0

        store.loads.clear()
        out = await api.chat("committed again", session="f")
        assert store.loads == [True]  # read from the store, which still holds version 1
        assert out["session"]["version"] == 2
        entry = cache.get(key("f"))
        assert entry is not None and entry.version == 2


# ---- replicas never serve a stale memory ------------------------------------------------------------

@pytest.mark.usefixtures("instrumented")
async def test_a_replica_never_serves_a_state_another_replica_replaced(engine: Engine,
                                                                      shared_store_url: str) -> None:
    async with AsyncExitStack() as stack:
        a, b = [await stack.enter_async_context(running_app(engine, shared_store_url)) for _ in range(2)]
        await a.chat("the first turn, on replica a", session="r")
        await a.chat("the second turn, a hit on replica a", session="r")
        assert (await cache_metrics(a))["hits"] == 1
        assert cache_of(a).get(key("r")).version == 2

        third = await b.chat("the third turn, on replica b", session="r")
        assert third["session"]["version"] == 3
        assert (await cache_metrics(b))["absent"] == 1

        # a still caches version 2: its metadata read sees version 3, so it reads the blob
        store_of(a).loads.clear()
        fourth = await a.chat("the fourth turn, back on replica a", session="r")
        assert store_of(a).loads == [False, True]
        assert fourth["session"]["version"] == 4
        assert fourth["session"]["tokens_absorbed"] == third["session"]["tokens_absorbed"] + absorbed_by(fourth)
        m = await cache_metrics(a)
        assert m["stale"] == 1 and m["hits"] == 1
        assert cache_of(a).get(key("r")).version == 4

        # a read-only look on b, whose cache holds version 3, is not served stale either
        peek = await b.chat("a look from replica b", session="r", learn=False)
        assert peek["session"]["version"] == 4
        assert peek["session"]["tokens_absorbed"] == fourth["session"]["tokens_absorbed"]
        assert (await cache_metrics(b))["stale"] == 1


@pytest.mark.usefixtures("instrumented")
async def test_a_recreated_session_is_another_incarnation(engine: Engine, shared_store_url: str) -> None:
    """Deleted and re-created on another replica: the same version number, another uid."""
    async with AsyncExitStack() as stack:
        a, b = [await stack.enter_async_context(running_app(engine, shared_store_url)) for _ in range(2)]
        await a.chat("a long first life of this session, many tokens absorbed in it", session="x",
                     max_tokens=30, ignore_eos=True)
        assert cache_of(a).get(key("x")).version == 1
        r = await b.client.delete("/v1/sessions/x")
        assert r.status_code == 200, r.text
        reborn = await b.chat("short", session="x", max_tokens=1)
        assert reborn["session"]["version"] == 1

        store_of(a).loads.clear()
        out = await a.chat("and on", session="x", max_tokens=1)
        assert store_of(a).loads == [False, True]
        assert out["session"]["version"] == 2
        assert out["session"]["tokens_absorbed"] == reborn["session"]["tokens_absorbed"] + absorbed_by(out)
        assert (await cache_metrics(a))["stale"] == 1


async def test_a_commit_the_store_lost_is_not_served_from_the_cache(engine: Engine, redis_store_url: str) -> None:
    """Redis may lose its last writes (a restart from an older snapshot, a failover to a lagging
    replica): replica a's cached commit 3 was lost, and b then made another commit 3. The two
    share uid and version; a must not build its next turn on its lost one."""
    import redis

    async with AsyncExitStack() as stack:
        a, b = [await stack.enter_async_context(running_app(engine, redis_store_url)) for _ in range(2)]
        for text in ("one", "two"):
            await a.chat(text, session="r")
        client = redis.Redis.from_url(redis_store_url.split("?")[0])
        keys = [a.app.state.ctx.store.key("default", "r", part) for part in ("meta", "state", "hist")]
        snapshot = {k: client.dump(k) for k in keys}  # version 2, as a snapshot holds it
        lost = await a.chat("a short third turn that the store will lose", session="r")
        assert lost["session"]["version"] == 3 and cache_of(a).get(key("r")).version == 3
        for k, blob in snapshot.items():  # Redis comes back from the snapshot
            client.restore(k, 0, blob, replace=True)
        kept = await b.chat("another third turn, this one kept, and longer than the lost one was", session="r")
        assert kept["session"]["version"] == 3
        fourth = await a.chat("the fourth turn", session="r")
        assert fourth["session"]["tokens_absorbed"] == kept["session"]["tokens_absorbed"] + absorbed_by(fourth)
        assert (await cache_metrics(a))["stale"] == 1
        client.close()
