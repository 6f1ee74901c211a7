"""`memory://`: sessions in this process's memory, for tests and throwaway use.

No method awaits inside its critical section, so on one event loop every method is atomic.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, replace

from server.stores.base import Page, SessionMeta, SessionRecord, StateStore, check_key


@dataclass
class _Lock:
    token: str
    expires: float


class MemoryStore(StateStore):
    def __init__(self, url: str = "memory://", ttl_s: float = 0.0) -> None:
        self.url, self.ttl_s = url, ttl_s
        self._sessions: dict[tuple[str, str], tuple[SessionRecord, float]] = {}  # -> (record, expires)
        self._locks: dict[tuple[str, str], _Lock] = {}
        self._fence = 0

    def _get(self, tenant: str, session_id: str) -> SessionRecord | None:
        check_key(tenant, session_id)
        item = self._sessions.get((tenant, session_id))
        if item is None:
            return None
        if item[1] and item[1] <= time.time():
            del self._sessions[(tenant, session_id)]
            return None
        return item[0]

    def _put(self, record: SessionRecord) -> None:
        expires = time.time() + self.ttl_s if self.ttl_s else 0.0
        meta = replace(record.meta)  # a copy: callers may keep mutating theirs
        self._sessions[(meta.tenant, meta.session_id)] = (SessionRecord(meta, record.history, record.state),
                                                          expires)

    async def ping(self) -> None:
        return None

    async def get_meta(self, tenant: str, session_id: str) -> SessionMeta | None:
        record = self._get(tenant, session_id)
        return replace(record.meta) if record else None

    async def load(self, tenant: str, session_id: str, with_state: bool = True) -> SessionRecord | None:
        record = self._get(tenant, session_id)
        if record is None:
            return None
        return SessionRecord(replace(record.meta), record.history, record.state if with_state else None)

    async def commit(self, record: SessionRecord, expected_version: int, lock_token: str | None) -> bool:
        tenant, sid = record.meta.tenant, record.meta.session_id
        current = self._get(tenant, sid)
        if (current.meta.version if current else 0) != expected_version:
            return False
        if current is not None and current.meta.uid != record.meta.uid:  # deleted and made again
            return False
        if lock_token is not None and not self._holds(tenant, sid, lock_token):
            return False
        self._put(record)
        return True

    async def create(self, record: SessionRecord) -> bool:
        if self._get(record.meta.tenant, record.meta.session_id) is not None:
            return False
        self._put(record)
        return True

    async def delete(self, tenant: str, session_id: str) -> bool:
        found = self._get(tenant, session_id) is not None
        self._sessions.pop((tenant, session_id), None)
        return found

    async def list(self, tenant: str, after: str | None = None, limit: int = 20) -> Page:
        ids = sorted(sid for (t, sid) in list(self._sessions) if t == tenant and (after is None or sid > after))
        metas = [r.meta for r in (self._get(tenant, sid) for sid in ids) if r is not None]
        return Page([replace(m) for m in metas[:limit]], has_more=len(metas) > limit)

    def _holds(self, tenant: str, session_id: str, token: str) -> bool:
        lock = self._locks.get((tenant, session_id))
        return lock is not None and lock.token == token and lock.expires > time.time()

    async def acquire_lock(self, tenant: str, session_id: str, ttl_s: float) -> str | None:
        check_key(tenant, session_id)
        lock = self._locks.get((tenant, session_id))
        if lock is not None and lock.expires > time.time():
            return None
        self._fence += 1
        token = f"{self._fence}-{secrets.token_hex(4)}"
        self._locks[(tenant, session_id)] = _Lock(token, time.time() + ttl_s)
        self._outlive_lock(tenant, session_id, time.time() + ttl_s)
        return token

    async def refresh_lock(self, tenant: str, session_id: str, token: str, ttl_s: float) -> bool:
        if not self._holds(tenant, session_id, token):
            return False
        self._locks[(tenant, session_id)].expires = time.time() + ttl_s
        self._outlive_lock(tenant, session_id, time.time() + ttl_s)
        return True

    def _outlive_lock(self, tenant: str, session_id: str, until: float) -> None:
        """A session does not expire while it is locked (its request commits after its TTL)."""
        record = self._get(tenant, session_id)  # None once expired
        if record is not None and 0 < self._sessions[(tenant, session_id)][1] < until:
            self._sessions[(tenant, session_id)] = (record, until)

    async def release_lock(self, tenant: str, session_id: str, token: str) -> None:
        lock = self._locks.get((tenant, session_id))
        if lock is not None and lock.token == token:
            del self._locks[(tenant, session_id)]
