"""The interface every session store implements, and `open_store(url)`.

A stored session is three things kept apart, so that listing and metadata never touch the blob:
- `SessionMeta`: version, counters, sizes, times, the checkpoint fingerprint;
- the state blob (safetensors bytes from `SessionState.to_bytes`);
- the history: the digests of the chat messages absorbed so far (see server.sessions), 8 bytes
  each, concatenated; only the most recent ones are kept.

Writes are compare-and-set on the version: `commit(record, expected_version, lock_token)`
succeeds only when the stored version is still `expected_version` (0: no session yet) of the
same session (`uid`: not one deleted and made again meanwhile, by a fork, with the same version) and,
when a lock token is given, that token still holds the session's lock. The lock is the
serialisation between requests (and replicas); its token is a fencing token, so a holder whose
lease expired (a long pause, a partition) can never overwrite the work of the next holder.

Every session key is namespaced by tenant: the same session id in two tenants is two sessions.
"""

from __future__ import annotations

import json
import re
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from urllib.parse import parse_qsl, urlencode, urlsplit

# A session id is also a key component and a URL path segment: letters, digits and . _ - @ +,
# not starting with a dot (no "..", no "/", no braces, colons or whitespace). Check it with
# `valid_session_id`: Python's `match` lets "$" match before a final newline.
SESSION_ID_RE = re.compile(r"^[A-Za-z0-9_@+-][A-Za-z0-9._@+-]{0,127}$")
TENANT_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
DIGEST_BYTES = 8


class StoreUnavailable(RuntimeError):
    """The store cannot be reached or answered with an I/O error (the server answers 503)."""


class StoreFull(StoreUnavailable):
    """The store refuses writes for lack of room (Redis at maxmemory with noeviction). A write
    it refused wrote nothing."""


def valid_session_id(session_id: str) -> bool:
    return SESSION_ID_RE.fullmatch(session_id) is not None


def valid_tenant(tenant: str) -> bool:
    return TENANT_RE.fullmatch(tenant) is not None


def check_key(tenant: str, session_id: str) -> None:
    """Defence in depth: the HTTP layer validates ids too, but a store never builds a key from
    an unchecked one."""
    if not valid_session_id(session_id) or not valid_tenant(tenant):
        raise ValueError(f"invalid tenant or session id: {tenant!r} {session_id!r}")


@dataclass
class SessionMeta:
    tenant: str
    session_id: str
    uid: str  # random per creation: a deleted and re-created session is a different session
    version: int  # 1 after the first commit, +1 per commit
    created: float  # unix seconds
    updated: float
    tokens_absorbed: int
    updates: dict[str, int]  # memory updates per level
    state_bytes: int  # size of the stored blob
    checkpoint: str  # fingerprint of the checkpoint that made the state
    dtype: str  # float storage of the blob
    history_total: int = 0  # chat messages ever logged (the history keeps the last ones)
    # per level, ||delta W|| / ||W|| of the session's latest memory update at that level
    last_update_norms: dict[str, float] = field(default_factory=dict)

    def to_strings(self) -> dict[str, str]:
        return {"tenant": self.tenant, "session_id": self.session_id, "uid": self.uid,
                "version": str(self.version), "created": repr(self.created),
                "updated": repr(self.updated), "tokens_absorbed": str(self.tokens_absorbed),
                "updates": json.dumps(self.updates, sort_keys=True),
                "state_bytes": str(self.state_bytes), "checkpoint": self.checkpoint,
                "dtype": self.dtype, "history_total": str(self.history_total),
                "last_update_norms": json.dumps(self.last_update_norms, sort_keys=True)}

    @classmethod
    def from_strings(cls, d: dict[str, str]) -> SessionMeta:
        return cls(tenant=d["tenant"], session_id=d["session_id"], uid=d["uid"],
                   version=int(d["version"]), created=float(d["created"]),
                   updated=float(d["updated"]), tokens_absorbed=int(d["tokens_absorbed"]),
                   updates=json.loads(d["updates"]), state_bytes=int(d["state_bytes"]),
                   checkpoint=d["checkpoint"], dtype=d["dtype"],
                   history_total=int(d.get("history_total", "0")),
                   last_update_norms=json.loads(d.get("last_update_norms") or "{}"))


@dataclass
class SessionRecord:
    """One session as stored: what `commit`/`create` write and `load` returns."""

    meta: SessionMeta
    history: bytes = b""
    state: bytes | None = None  # None when loaded without the blob

    def renamed(self, tenant: str, session_id: str, uid: str) -> SessionRecord:
        now = time.time()
        meta = replace(self.meta, tenant=tenant, session_id=session_id, uid=uid, created=now, updated=now)
        return SessionRecord(meta, self.history, self.state)


@dataclass
class Page:
    sessions: list[SessionMeta] = field(default_factory=list)
    has_more: bool = False


class StateStore(ABC):
    """Async session store. Every method may raise `StoreUnavailable`."""

    url: str
    ttl_s: float  # sessions expire after this long without a commit; 0: never

    @abstractmethod
    async def ping(self) -> None: ...

    @abstractmethod
    async def get_meta(self, tenant: str, session_id: str) -> SessionMeta | None:
        """Metadata only: never reads the state blob."""

    @abstractmethod
    async def load(self, tenant: str, session_id: str, with_state: bool = True) -> SessionRecord | None:
        """A consistent snapshot of meta, history and (when asked) the blob."""

    @abstractmethod
    async def commit(self, record: SessionRecord, expected_version: int, lock_token: str | None) -> bool:
        """Write `record` if the stored version is `expected_version` (0: absent) with the uid
        `record.meta.uid`, and the lock is still held with `lock_token` (when given). False:
        nothing was written."""

    @abstractmethod
    async def create(self, record: SessionRecord) -> bool:
        """Write `record` as a new session; False when the id is taken."""

    @abstractmethod
    async def delete(self, tenant: str, session_id: str) -> bool: ...

    @abstractmethod
    async def list(self, tenant: str, after: str | None = None, limit: int = 20) -> Page:
        """A tenant's sessions ordered by id, those after `after` (a cursor)."""

    @abstractmethod
    async def acquire_lock(self, tenant: str, session_id: str, ttl_s: float) -> str | None:
        """A fresh fencing token when the lock was free (or its lease had expired), else None."""

    @abstractmethod
    async def refresh_lock(self, tenant: str, session_id: str, token: str, ttl_s: float) -> bool:
        """Extend the lease; False when `token` no longer holds the lock."""

    @abstractmethod
    async def release_lock(self, tenant: str, session_id: str, token: str) -> None: ...

    async def close(self) -> None:  # noqa: B027 - optional
        pass


def open_store(url: str, ttl_s: float = 0.0) -> StateStore:
    """`memory://`, `sqlite:///path/to/file.db` or `redis://host:port/db[?prefix=hope]`."""
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        from server.stores.memory import MemoryStore

        return MemoryStore(url, ttl_s)
    if scheme == "sqlite":
        from server.stores.sqlite import SQLiteStore

        return SQLiteStore(url, ttl_s)
    if scheme in ("redis", "rediss", "unix"):
        from server.stores.redis import RedisStore

        return RedisStore(url, ttl_s)
    raise ValueError(f"unknown store URL {redact_url(url)!r}: use memory://, sqlite:///path or redis://host:port/db")


def redact_url(url: str) -> str:
    """A store URL without its secrets: the password in its userinfo or in its query."""
    parts = urlsplit(url)
    if parts.password:
        url = url.replace(f":{parts.password}@", ":***@", 1)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(k.lower() in _SECRET_QUERY for k, _ in query):
        hidden = urlencode([(k, "***" if k.lower() in _SECRET_QUERY else v) for k, v in query], safe="*")
        url = url.replace(f"?{parts.query}", f"?{hidden}", 1)
    return url


_SECRET_QUERY = {"password", "pass", "passwd", "secret", "token"}
