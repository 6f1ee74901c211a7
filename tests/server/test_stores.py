"""One contract, every store: memory://, sqlite:/// and redis:// (db 15) behave the same."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
import redis

from server.stores import SessionMeta, SessionRecord, StateStore, StoreFull, StoreUnavailable, open_store
from server.stores.sqlite import sqlite_path
from tests.server.support import REDIS_URL, delete_prefix, free_port, own_redis, redis_available

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path) -> AsyncIterator[str]:
    if request.param == "memory":
        yield "memory://"
    elif request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/sessions.db"  # tmp_path is absolute: four slashes
    else:
        if not redis_available():
            pytest.skip("no Redis at 127.0.0.1:6379")
        prefix = f"hopetest-{uuid.uuid4().hex[:8]}"
        yield f"{REDIS_URL}?prefix={prefix}"
        delete_prefix(REDIS_URL, prefix)


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[StateStore]:
    s = open_store(store_url, ttl_s=0)
    yield s
    await s.close()


def record(tenant: str = "acme", sid: str = "s1", version: int = 1, state: bytes = b"state-1",
           history: bytes = b"", uid: str = "uid-1") -> SessionRecord:
    now = time.time()
    meta = SessionMeta(tenant=tenant, session_id=sid, uid=uid, version=version, created=now, updated=now,
                       tokens_absorbed=10 * version, updates={"titans": version, "fast": version, "mid": 0},
                       state_bytes=len(state), checkpoint="fp", dtype="float32", history_total=len(history) // 8)
    return SessionRecord(meta, history, state)


async def test_commit_is_compare_and_set(store: StateStore) -> None:
    assert await store.get_meta("acme", "s1") is None
    assert await store.commit(record(version=1), expected_version=0, lock_token=None)
    assert not await store.commit(record(version=1, state=b"other"), expected_version=0, lock_token=None)
    assert not await store.commit(record(version=3), expected_version=2, lock_token=None)  # stale
    assert await store.commit(record(version=2, state=b"state-2", history=b"12345678"), 1, None)
    meta = await store.get_meta("acme", "s1")
    assert meta is not None and meta.version == 2 and meta.tokens_absorbed == 20
    assert meta.updates == {"titans": 2, "fast": 2, "mid": 0}
    full = await store.load("acme", "s1")
    assert full is not None and full.state == b"state-2" and full.history == b"12345678"
    light = await store.load("acme", "s1", with_state=False)
    assert light is not None and light.state is None and light.meta.version == 2


async def test_lock_excludes_and_fences(store: StateStore) -> None:
    token = await store.acquire_lock("acme", "s1", ttl_s=5)
    assert token is not None
    assert await store.acquire_lock("acme", "s1", ttl_s=5) is None  # held
    assert await store.acquire_lock("acme", "s2", ttl_s=5) is not None  # another session: free
    assert await store.acquire_lock("globex", "s1", ttl_s=5) is not None  # another tenant: free
    assert await store.refresh_lock("acme", "s1", token, ttl_s=5)
    assert await store.commit(record(version=1), 0, token)
    await store.release_lock("acme", "s1", token)
    assert not await store.commit(record(version=2), 1, token)  # released: the token is void
    assert not await store.refresh_lock("acme", "s1", token, ttl_s=5)
    again = await store.acquire_lock("acme", "s1", ttl_s=5)
    assert again is not None and again != token


async def test_expired_lease_cannot_commit(store: StateStore) -> None:
    """A holder whose lease ran out (a long pause) is fenced off once another one took over."""
    stale = await store.acquire_lock("acme", "s1", ttl_s=0.2)
    await asyncio.sleep(0.3)
    fresh = await store.acquire_lock("acme", "s1", ttl_s=5)
    assert fresh is not None and fresh != stale
    assert int(fresh.split("-")[0]) > int(stale.split("-")[0])  # fencing tokens only grow
    assert not await store.commit(record(version=1), 0, stale)
    assert not await store.refresh_lock("acme", "s1", stale, ttl_s=5)
    await store.release_lock("acme", "s1", stale)  # a stale release must not free the new holder
    assert await store.acquire_lock("acme", "s1", ttl_s=5) is None
    assert await store.commit(record(version=1), 0, fresh)


async def test_tenants_are_separate(store: StateStore) -> None:
    assert await store.commit(record("acme", "same", state=b"acme"), 0, None)
    assert await store.commit(record("globex", "same", state=b"globex"), 0, None)
    a, g = await store.load("acme", "same"), await store.load("globex", "same")
    assert a is not None and g is not None and (a.state, g.state) == (b"acme", b"globex")
    assert await store.delete("acme", "same")
    assert await store.get_meta("acme", "same") is None
    assert await store.get_meta("globex", "same") is not None
    assert not await store.delete("acme", "same")
    assert [m.session_id for m in (await store.list("globex")).sessions] == ["same"]
    assert (await store.list("acme")).sessions == []


async def test_list_pages_by_id(store: StateStore) -> None:
    for i in range(5):
        assert await store.commit(record(sid=f"s{i}"), 0, None)
    await store.commit(record("other", "s9"), 0, None)
    first = await store.list("acme", limit=2)
    assert [m.session_id for m in first.sessions] == ["s0", "s1"] and first.has_more
    second = await store.list("acme", after="s1", limit=2)
    assert [m.session_id for m in second.sessions] == ["s2", "s3"] and second.has_more
    last = await store.list("acme", after="s3", limit=2)
    assert [m.session_id for m in last.sessions] == ["s4"] and not last.has_more


async def test_commit_refuses_a_session_made_again_with_the_same_version(store: StateStore) -> None:
    """A request that loaded s1 (uid-1, version 1) must not overwrite the s1 that a delete and
    a fork made meanwhile with the same version (another uid)."""
    assert await store.commit(record(version=1, uid="uid-1"), 0, None)
    assert await store.delete("acme", "s1")
    assert await store.create(record(version=1, uid="uid-2", state=b"forked"))
    assert not await store.commit(record(version=2, uid="uid-1", state=b"stale"), 1, None)
    full = await store.load("acme", "s1")
    assert full is not None and full.meta.uid == "uid-2" and full.state == b"forked"
    assert await store.commit(record(version=2, uid="uid-2", state=b"next"), 1, None)  # its own line goes on


async def test_delete_then_create_stays_listed(store: StateStore) -> None:
    for round_ in range(20):  # a delete and a create of the same id racing
        assert await store.commit(record(sid="r", uid=f"u{round_}"), 0, None)
        await asyncio.gather(store.delete("acme", "r"), store.create(record(sid="r", uid=f"v{round_}")))
        listed = [m.session_id for m in (await store.list("acme")).sessions]
        assert (await store.get_meta("acme", "r") is not None) == ("r" in listed), round_
        await store.delete("acme", "r")


async def test_create_only_when_absent(store: StateStore) -> None:
    assert await store.create(record(sid="fork", version=3))
    assert not await store.create(record(sid="fork", version=1))
    meta = await store.get_meta("acme", "fork")
    assert meta is not None and meta.version == 3
    assert await store.commit(record(sid="fork", version=4), 3, None)


async def test_sessions_expire(store_url: str) -> None:
    store = open_store(store_url, ttl_s=0.3)
    try:
        assert await store.commit(record(sid="brief"), 0, None)
        assert await store.get_meta("acme", "brief") is not None
        await asyncio.sleep(0.5)
        assert await store.get_meta("acme", "brief") is None
        assert await store.load("acme", "brief") is None
        assert (await store.list("acme")).sessions == []
        assert await store.commit(record(sid="brief"), 0, None)  # the id is free again
    finally:
        await store.close()


async def test_a_locked_session_does_not_expire(store_url: str) -> None:
    """A request that outlasts the session's TTL (it began just before the TTL ran out) commits:
    the lock and its renewals keep the session alive, and the commit then sets the full TTL."""
    store = open_store(store_url, ttl_s=0.4)
    try:
        assert await store.commit(record(sid="busy"), 0, None)
        assert await store.commit(record(sid="idle"), 0, None)
        token = await store.acquire_lock("acme", "busy", ttl_s=0.6)
        assert token is not None
        await asyncio.sleep(0.5)  # past the session's TTL, inside the lease
        assert await store.refresh_lock("acme", "busy", token, ttl_s=0.6)
        await asyncio.sleep(0.3)  # past the first lease, inside the renewed one
        assert await store.get_meta("acme", "idle") is None  # unlocked: expired as before
        assert await store.get_meta("acme", "busy") is not None
        assert await store.commit(record(sid="busy", version=2), 1, token)
        await store.release_lock("acme", "busy", token)
        await asyncio.sleep(0.5)
        assert await store.get_meta("acme", "busy") is None  # the commit's TTL, not the lease's
    finally:
        await store.close()


async def test_bad_ids_never_reach_a_key(store: StateStore) -> None:
    for bad in ("../x", "a/b", "{acme:s1}", "a b", "", "x" * 129, ".hidden", "a:b", "s1\n", "s1\r\n"):
        with pytest.raises(ValueError):
            await store.get_meta("acme", bad)


async def test_redis_layout(redis_store_url: str) -> None:
    """Keys of a session share the hash tag {tenant:session}; blob and metadata are separate."""
    store = open_store(redis_store_url, ttl_s=60)
    try:
        assert await store.commit(record(state=b"blob"), 0, None)
        prefix = redis_store_url.split("prefix=")[1]
        client = redis.Redis.from_url(REDIS_URL)
        keys = sorted(k.decode() for k in client.scan_iter(match=f"{prefix}:*"))
        assert f"{prefix}:{{acme:s1}}:meta" in keys and f"{prefix}:{{acme:s1}}:state" in keys
        assert client.type(f"{prefix}:{{acme:s1}}:meta") == b"hash"
        assert b"blob" not in b"".join(client.hgetall(f"{prefix}:{{acme:s1}}:meta").values())
        assert 0 < client.ttl(f"{prefix}:{{acme:s1}}:state") <= 60
        slots = {client.execute_command("CLUSTER KEYSLOT", k) for k in keys if "{acme:s1}" in k} \
            if _cluster_keyslot_available(client) else {1}
        assert len(slots) == 1
        client.close()
    finally:
        await store.close()


async def test_redis_index_forgets_expired_sessions_without_listing(redis_store_url: str) -> None:
    """A tenant that never lists still has sessions expire: the writes that follow drop their
    index entries, and a lock's lease that kept a session alive keeps its entry."""
    store = open_store(redis_store_url, ttl_s=1.0)
    prefix = redis_store_url.split("prefix=")[1]
    client = redis.Redis.from_url(REDIS_URL)
    index, expiry = f"{prefix}:idx:{{acme}}", f"{prefix}:exp:{{acme}}"
    try:
        for i in range(1, 40):
            assert await store.commit(record(sid=f"old{i:02}"), 0, None)
        assert await store.commit(record(sid="old00"), 0, None)
        token = await store.acquire_lock("acme", "old00", ttl_s=3)  # its keys outlive the TTL
        await asyncio.sleep(1.2)
        for i in range(4):  # 4 writes may check 64 entries: every expired one
            assert await store.commit(record(sid=f"new{i}"), 0, None)
        listed = sorted(m.decode() for m in client.zrange(index, 0, -1))
        assert listed == ["new0", "new1", "new2", "new3", "old00"]
        for key in (index, expiry):  # the lease's, the longest of any session's
            assert 1000 < client.pttl(key) <= 3000
        await store.release_lock("acme", "old00", token)
        assert await store.delete("acme", "new0")
        assert client.zscore(expiry, "new0") is None
        await asyncio.sleep(2.2)
        assert client.exists(index, expiry) == 0  # a quiet tenant leaves nothing
    finally:
        client.close()
        await store.close()


def _cluster_keyslot_available(client: redis.Redis) -> bool:
    try:
        client.execute_command("CLUSTER KEYSLOT", "x")
        return True
    except redis.ResponseError:  # a standalone server without cluster support
        return False


async def test_a_full_redis_is_unavailable_not_a_bug(tmp_path) -> None:
    """At maxmemory with noeviction (docs/deploy.md), Redis refuses writes with an OOM error:
    a 503 with Retry-After (`store_full`, not "unreachable"), and nothing half-written."""
    with own_redis(tmp_path, "--maxmemory", "4mb", "--maxmemory-policy", "noeviction") as (url, _):
        store = open_store(url)
        try:
            with pytest.raises(StoreFull):
                for i in range(40):  # 512 KiB each: Redis is full long before the last
                    assert await store.commit(record(sid=f"s{i}", state=bytes(512 * 1024)), 0, None)
            assert i > 0 and await store.get_meta("acme", f"s{i}") is None  # the refused one wrote nothing
            with pytest.raises(StoreFull):  # nor does a commit over a stored session
                await store.commit(record(sid="s0", version=2, state=b"\1" * (512 * 1024)), 1, None)
            kept = await store.load("acme", "s0")
            assert kept is not None and kept.meta.version == 1 and kept.state == bytes(512 * 1024)
        finally:
            await store.close()


async def test_unreachable_store_raises_unavailable(tmp_path) -> None:
    dead = open_store(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(StoreUnavailable):
        await dead.ping()
    with pytest.raises(StoreUnavailable):
        await dead.get_meta("acme", "s1")
    await dead.close()
    (tmp_path / "file").write_text("")
    blocked = open_store(f"sqlite:///{tmp_path}/file/sessions.db")  # a parent that is a file
    with pytest.raises(StoreUnavailable):
        await blocked.ping()
    await blocked.close()


def test_sqlite_url_paths() -> None:
    assert str(sqlite_path("sqlite:////var/lib/hope.db")) == "/var/lib/hope.db"
    assert str(sqlite_path("sqlite:///./hope.db")) == "hope.db"
    assert not sqlite_path("sqlite:///~/hope.db").as_posix().startswith("~")
    with pytest.raises(ValueError):
        sqlite_path("sqlite://host/x.db")


async def test_sqlite_keeps_no_lock_rows_of_sessions_that_are_gone(tmp_path) -> None:
    """The lock table's rows outlive their leases (they keep a fencing counter), but not their
    sessions: deleted and expired sessions take their lock rows with them, and the sweep removes
    expired sessions in small transactions (each blob passes through the WAL)."""
    import sqlite3

    from server.stores.sqlite import SQLiteStore

    store = open_store(f"sqlite:///{tmp_path}/s.db", ttl_s=0.3)
    try:
        for i in range(20):
            token = await store.acquire_lock("acme", f"s{i}", ttl_s=0.1)
            assert token is not None and await store.commit(record(sid=f"s{i}", state=b"x" * 50_000), 0, token)
            await store.release_lock("acme", f"s{i}", token)
            if i == 0:  # at once: on a slow machine the loop outlasts the TTL
                assert await store.delete("acme", "s0")
        await asyncio.sleep(0.4)
        await store._run(SQLiteStore._purge)  # what every 200th commit runs
        db = sqlite3.connect(f"{tmp_path}/s.db")
        assert db.execute("SELECT count(*) FROM sessions").fetchone()[0] == 0
        assert db.execute("SELECT count(*) FROM blobs").fetchone()[0] == 0
        assert db.execute("SELECT count(*) FROM locks").fetchone()[0] == 0
        db.close()
        limit = await store._run(lambda db: db.execute("PRAGMA journal_size_limit").fetchone()[0])
        assert 0 < limit <= 64 * 2**20  # the WAL shrinks back after a large sweep
    finally:
        await store.close()


def _documented_redis_commands() -> list[str]:
    """The commands docs/deploy.md tells an operator to allow a managed Redis's ACL user."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "deploy.md").read_text()
    start = text.index("Lua scripting (`EVALSHA`, `SCRIPT LOAD`) allowed for the ACL user, plus `")
    listed = text[start:].split("plus `", 1)[1].split("`", 1)[0]
    return ["EVALSHA", "SCRIPT|LOAD", *re.split(r"\s+", listed.strip())]


async def test_the_documented_redis_acl_is_enough(tmp_path) -> None:
    """Every store operation as a Redis user allowed exactly the documented commands (a script's
    own commands are checked against the user too)."""
    with own_redis(tmp_path) as (url, _):
        admin = redis.Redis.from_url(url)
        admin.execute_command("ACL", "SETUSER", "hope", "on", ">pw", "~*", "-@all",
                              *[f"+{c.lower()}" for c in _documented_redis_commands()])
        admin.close()
        store = open_store(url.replace("redis://", "redis://hope:pw@") + "?prefix=acl", ttl_s=60)
        try:
            await store.ping()
            token = await store.acquire_lock("acme", "s1", ttl_s=5)
            assert token is not None and await store.refresh_lock("acme", "s1", token, ttl_s=5)
            assert await store.commit(record(), 0, token)
            assert await store.commit(record(version=2), 1, token)
            await store.release_lock("acme", "s1", token)
            assert await store.create(record(sid="fork", version=2))
            assert (await store.load("acme", "s1")).meta.version == 2
            assert (await store.get_meta("acme", "fork")).version == 2
            assert [m.session_id for m in (await store.list("acme")).sessions] == ["fork", "s1"]
            assert await store.delete("acme", "fork")
        finally:
            await store.close()
