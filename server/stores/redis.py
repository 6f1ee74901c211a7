"""`redis://host:port/db[?prefix=hope]`: the production store, shared by replicas.

Keys of one session share the hash tag `{tenant:session}`, so they live in one Redis Cluster slot
and one Lua script can touch them all atomically:

    <prefix>:{tenant:session}:meta    hash: version, counters, sizes, times (listing reads only this)
    <prefix>:{tenant:session}:state   string: the safetensors blob
    <prefix>:{tenant:session}:hist    string: digests of the absorbed chat messages
    <prefix>:{tenant:session}:lock    string: the lock's fencing token, with a lease (PX)
    <prefix>:{tenant:session}:fence   counter: the last fencing token handed out
    <prefix>:idx:{tenant}             sorted set of the tenant's session ids, for listing by id
    <prefix>:exp:{tenant}             sorted set of the same ids by when each expires (with a TTL)

A commit is one Lua script: compare the stored version and uid, check that the caller's token
still holds the lock, then write state, history and meta and refresh their TTL. A full Redis
(maxmemory) refuses a script's first write command that may grow memory, and lets the rest of
a script run once one write has: so each script's first write is such a command (SET, HSET,
INCR), and a full Redis refuses the whole script, never half of it. The index lives in
another slot, so it is updated after the commit. Sessions that expire leave their entries behind;
listing drops those it meets, and each write checks the few entries whose session should have
expired by then, so the index of a tenant that never lists stays the size of its live sessions.
The index's own TTL follows its sessions': a tenant gone quiet leaves nothing behind.
"""

from __future__ import annotations

import logging
import secrets
import time
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis import exceptions as rex

from server.stores.base import Page, SessionMeta, SessionRecord, StateStore, StoreFull, StoreUnavailable, check_key

log = logging.getLogger("hope.store")

_COMMIT = """
local cur = redis.call('HMGET', KEYS[1], 'version', 'uid')
if (cur[1] or '0') ~= ARGV[1] then return 0 end
if ARGV[1] ~= '0' and cur[2] ~= ARGV[6] then return 0 end
if ARGV[2] ~= '' and redis.call('GET', KEYS[4]) ~= ARGV[2] then return -1 end
redis.call('SET', KEYS[2], ARGV[4])
redis.call('SET', KEYS[3], ARGV[5])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 7))
local ttl = tonumber(ARGV[3])
for i = 1, 3 do
  if ttl > 0 then redis.call('PEXPIRE', KEYS[i], ttl) else redis.call('PERSIST', KEYS[i]) end
end
return 1
"""

_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('SET', KEYS[2], ARGV[2])
redis.call('SET', KEYS[3], ARGV[3])
local ttl = tonumber(ARGV[1])
if ttl > 0 then for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ttl) end end
return 1
"""

# A session does not expire while it is locked: its keys (KEYS[3..5]: meta, state, hist) live
# at least as long as the lock's lease, so a request that outlasts the session's last TTL
# still commits; the commit then sets the full TTL.
_OUTLIVE_LOCK = """
for i = 3, 5 do
  local left = redis.call('PTTL', KEYS[i])
  if left >= 0 and left < tonumber(ARGV[1]) then redis.call('PEXPIRE', KEYS[i], ARGV[1]) end
end
"""

_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local fence = redis.call('INCR', KEYS[2])
if tonumber(ARGV[3]) > 0 then redis.call('PEXPIRE', KEYS[2], ARGV[3]) end
local token = fence .. '-' .. ARGV[2]
redis.call('SET', KEYS[1], token, 'PX', ARGV[1])
""" + _OUTLIVE_LOCK + """
return token
"""

_REFRESH = """
if redis.call('GET', KEYS[1]) ~= ARGV[2] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
""" + _OUTLIVE_LOCK + """
return 1
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Errors that mean "Redis is not there right now" (503), as opposed to a bug (500).
_UNAVAILABLE = (rex.ConnectionError, rex.TimeoutError, rex.BusyLoadingError, rex.ReadOnlyError,
                rex.ClusterDownError, rex.TryAgainError, OSError)


# Index entries checked, at most, per write: each write adds one, so the sweep keeps up with any
# rate of sessions expiring.
_SWEEP = 16


def _ms(seconds: float) -> int:
    return max(int(seconds * 1000), 1) if seconds > 0 else 0


class RedisStore(StateStore):
    def __init__(self, url: str, ttl_s: float = 0.0) -> None:
        self.url, self.ttl_s = url, ttl_s
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        self.prefix = query.pop("prefix", "hope")
        if not self.prefix or any(c in self.prefix for c in "{}"):
            raise ValueError("the Redis key prefix must be non-empty and contain no braces")
        clean = urlunsplit(parts._replace(query=urlencode(query)))
        self._redis = aioredis.from_url(clean, socket_timeout=5, socket_connect_timeout=2,
                                        health_check_interval=30)
        self._commit = self._redis.register_script(_COMMIT)
        self._create = self._redis.register_script(_CREATE)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._refresh = self._redis.register_script(_REFRESH)
        self._release = self._redis.register_script(_RELEASE)

    # ---- keys -------------------------------------------------------------------------------

    def key(self, tenant: str, session_id: str, part: str) -> str:
        check_key(tenant, session_id)
        return f"{self.prefix}:{{{tenant}:{session_id}}}:{part}"

    def _keys(self, tenant: str, session_id: str, *parts: str) -> list[str]:
        return [self.key(tenant, session_id, p) for p in parts]

    def index_key(self, tenant: str) -> str:
        return f"{self.prefix}:idx:{{{tenant}}}"

    def expiry_key(self, tenant: str) -> str:
        return f"{self.prefix}:exp:{{{tenant}}}"

    async def _call(self, coro):
        try:
            return await coro
        except rex.OutOfMemoryError as e:
            # maxmemory with noeviction (docs/deploy.md): writes are refused until keys expire
            # or memory is added; unavailable for now, not a bug, and not unreachable either
            raise StoreFull(f"redis: {e}") from e
        except _UNAVAILABLE as e:
            raise StoreUnavailable(f"redis: {e}") from e

    @staticmethod
    def _meta(raw: dict) -> SessionMeta | None:
        if not raw:
            return None
        return SessionMeta.from_strings({k.decode(): v.decode() for k, v in raw.items()})

    @staticmethod
    def _fields(meta: SessionMeta) -> list[str]:
        return [x for kv in meta.to_strings().items() for x in kv]

    # ---- StateStore -------------------------------------------------------------------------

    async def ping(self) -> None:
        await self._call(self._redis.ping())

    async def get_meta(self, tenant: str, session_id: str) -> SessionMeta | None:
        return self._meta(await self._call(self._redis.hgetall(self.key(tenant, session_id, "meta"))))

    async def load(self, tenant: str, session_id: str, with_state: bool = True) -> SessionRecord | None:
        meta_k, hist_k, state_k = self._keys(tenant, session_id, "meta", "hist", "state")

        async def read():
            async with self._redis.pipeline(transaction=True) as pipe:  # MULTI/EXEC: one snapshot
                pipe.hgetall(meta_k).get(hist_k)
                if with_state:
                    pipe.get(state_k)
                return await pipe.execute()

        out = await self._call(read())
        meta = self._meta(out[0])
        if meta is None:
            return None
        return SessionRecord(meta, out[1] or b"", out[2] if with_state else None)

    async def commit(self, record: SessionRecord, expected_version: int, lock_token: str | None) -> bool:
        m = record.meta
        if record.state is None:
            raise ValueError("a stored session needs its state")
        keys = self._keys(m.tenant, m.session_id, "meta", "state", "hist", "lock")
        args = [str(expected_version), lock_token or "", _ms(self.ttl_s), record.state, record.history,
                m.uid, *self._fields(m)]
        ok = await self._call(self._commit(keys=keys, args=args)) == 1
        if ok:
            await self._index(m)
        return ok

    async def create(self, record: SessionRecord) -> bool:
        m = record.meta
        if record.state is None:
            raise ValueError("a stored session needs its state")
        keys = self._keys(m.tenant, m.session_id, "meta", "state", "hist")
        args = [_ms(self.ttl_s), record.state, record.history, *self._fields(m)]
        ok = await self._call(self._create(keys=keys, args=args)) == 1
        if ok:
            await self._index(m)
        return ok

    async def _index(self, meta: SessionMeta) -> None:
        """List a session that was just written, and drop a few entries of sessions that
        expired. The write is done whatever happens here: a failure (Redis full or gone since)
        is logged, not raised, and the session is listed again by its next commit."""
        try:
            await self._call(self._write_index(meta.tenant, meta.session_id))
        except StoreUnavailable:
            log.warning("redis store: a written session could not be indexed for listing",
                        extra={"session": meta.session_id}, exc_info=True)

    async def _write_index(self, tenant: str, session_id: str) -> None:
        index, expiry = self.index_key(tenant), self.expiry_key(tenant)
        if not self.ttl_s:  # nothing expires: delete keeps the index exact
            await self._redis.zadd(index, {session_id: 0})
            return
        now, ttl = int(time.time() * 1000), _ms(self.ttl_s)
        async with self._redis.pipeline(transaction=True) as pipe:  # one slot: {tenant}
            pipe.zadd(index, {session_id: 0}).zadd(expiry, {session_id: now + ttl})
            self._outlive(pipe, tenant, ttl)
            pipe.zrangebyscore(expiry, "-inf", now, start=0, num=_SWEEP)
            due = (await pipe.execute())[-1]
        if not due:
            return
        # a clock's view of "expired": the session's own keys are what tell (a lock's lease,
        # or another replica's clock, may have kept one alive)
        async with self._redis.pipeline(transaction=False) as pipe:
            for sid in due:
                pipe.pttl(self.key(tenant, sid.decode(), "meta"))
            left = await pipe.execute()
        gone = [sid for sid, ms in zip(due, left, strict=True) if ms == -2]
        alive = {sid: now + ms if ms >= 0 else "+inf" for sid, ms in zip(due, left, strict=True) if ms != -2}
        if gone:
            await self._unindex(tenant, *gone)
        if alive:
            await self._redis.zadd(expiry, alive, xx=True)

    def _outlive(self, pipe, tenant: str, ms: int) -> None:
        """The index keys live at least `ms` more, never less than before (NX sets a first TTL,
        GT only lengthens one): they outlive every session they list, whose writes and lock
        leases call this."""
        for key in (self.index_key(tenant), self.expiry_key(tenant)):
            pipe.pexpire(key, ms, nx=True).pexpire(key, ms, gt=True)

    async def _outlive_lease(self, tenant: str, ttl_s: float) -> None:
        """Best effort, as `_index`: the lock is what the caller asked for, and it holds."""
        if not self.ttl_s:
            return
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                self._outlive(pipe, tenant, _ms(ttl_s))
                await self._call(pipe.execute())
        except StoreUnavailable:
            log.warning("redis store: the listing index's TTL could not follow a lock's lease", exc_info=True)

    async def _unindex(self, tenant: str, *session_ids: bytes | str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zrem(self.index_key(tenant), *session_ids).zrem(self.expiry_key(tenant), *session_ids)
            await self._call(pipe.execute())

    async def delete(self, tenant: str, session_id: str) -> bool:
        meta_k, state_k, hist_k, fence_k = self._keys(tenant, session_id, "meta", "state", "hist", "fence")

        async def run():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(meta_k).delete(state_k, hist_k, fence_k)
                return await pipe.execute()

        found = (await self._call(run()))[0] == 1
        await self._unindex(tenant, session_id)
        # the index lives in another slot, so this is a second step: a session created again
        # between the two (its own index entry added before our removal) is put back
        if await self._call(self._redis.exists(meta_k)):
            await self._call(self._write_index(tenant, session_id))
        return found

    async def list(self, tenant: str, after: str | None = None, limit: int = 20) -> Page:
        index = self.index_key(tenant)
        start = f"({after}" if after else "-"
        metas: list[SessionMeta] = []
        while len(metas) <= limit:  # one more than asked: is there a next page?
            want = limit + 1 - len(metas)
            ids = await self._call(self._redis.zrangebylex(index, start, "+", start=0, num=want))
            if not ids:
                break
            async with self._redis.pipeline(transaction=False) as pipe:
                for sid in ids:
                    pipe.hgetall(self.key(tenant, sid.decode(), "meta"))
                raws = await self._call(pipe.execute())
            gone = []
            for sid, raw in zip(ids, raws, strict=True):
                meta = self._meta(raw)
                if meta is None:
                    gone.append(sid)  # expired: its index entry is all that is left
                else:
                    metas.append(meta)
            if gone:
                await self._unindex(tenant, *gone)
            start = f"({ids[-1].decode()}"
            if len(ids) < want:
                break
        return Page(metas[:limit], has_more=len(metas) > limit)

    # ---- locks ------------------------------------------------------------------------------

    async def acquire_lock(self, tenant: str, session_id: str, ttl_s: float) -> str | None:
        keys = self._keys(tenant, session_id, "lock", "fence", "meta", "state", "hist")
        fence_ttl = _ms(self.ttl_s + ttl_s) if self.ttl_s else 0
        token = await self._call(self._acquire(keys=keys, args=[_ms(ttl_s), secrets.token_hex(4), fence_ttl]))
        if token:  # the lease keeps the session alive (_OUTLIVE_LOCK), and so its index
            await self._outlive_lease(tenant, ttl_s)
        return token.decode() if token else None

    async def refresh_lock(self, tenant: str, session_id: str, token: str, ttl_s: float) -> bool:
        keys = self._keys(tenant, session_id, "lock", "fence", "meta", "state", "hist")
        ok = await self._call(self._refresh(keys=keys, args=[_ms(ttl_s), token])) == 1
        if ok:
            await self._outlive_lease(tenant, ttl_s)
        return ok

    async def release_lock(self, tenant: str, session_id: str, token: str) -> None:
        await self._call(self._release(keys=self._keys(tenant, session_id, "lock"), args=[token]))

    async def close(self) -> None:
        await self._redis.aclose()
