"""`sqlite:///path`: the embedded default store, one file, persistent, no server needed.

URL paths follow SQLAlchemy's rule: `sqlite:///sessions.db` is relative to the working
directory, `sqlite:////var/lib/hope/sessions.db` is absolute, `~` is expanded.

The file is in WAL mode (with SQLite's default synchronous=FULL): a commit that returned survives
a killed process, and a power cut. Metadata and blobs are separate tables, so listing never reads a blob.
Compare-and-set is `UPDATE ... WHERE version = ?` inside a `BEGIN IMMEDIATE` transaction that
also checks the lock's fencing token. Locks live in the file too, so several server processes
on one machine can share it. All calls run on one dedicated thread (sqlite3 is blocking).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from server.stores.base import Page, SessionMeta, SessionRecord, StateStore, StoreUnavailable, check_key

log = logging.getLogger("hope.store")

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    tenant TEXT NOT NULL, session_id TEXT NOT NULL, uid TEXT NOT NULL, version INTEGER NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL, tokens_absorbed INTEGER NOT NULL,
    updates TEXT NOT NULL, state_bytes INTEGER NOT NULL, checkpoint TEXT NOT NULL,
    dtype TEXT NOT NULL, history_total INTEGER NOT NULL, expires REAL NOT NULL,
    last_update_norms TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (tenant, session_id));
CREATE TABLE IF NOT EXISTS blobs (
    tenant TEXT NOT NULL, session_id TEXT NOT NULL, state BLOB NOT NULL, history BLOB NOT NULL,
    PRIMARY KEY (tenant, session_id));
CREATE TABLE IF NOT EXISTS locks (
    tenant TEXT NOT NULL, session_id TEXT NOT NULL, fence INTEGER NOT NULL, nonce TEXT NOT NULL,
    expires REAL NOT NULL, PRIMARY KEY (tenant, session_id));
"""
_META_COLS = ("tenant, session_id, uid, version, created, updated, tokens_absorbed, updates, "
              "state_bytes, checkpoint, dtype, history_total, last_update_norms")
_PURGE_EVERY = 200  # commits between sweeps of expired sessions
_BUSY_TIMEOUT_S = 10.0  # how long a write waits for another process's transaction
_SWEEP_BATCH = 8  # expired sessions deleted per transaction: each one's blob passes through the WAL
_WAL_LIMIT_BYTES = 64 * 1024 * 1024


def sqlite_path(url: str) -> Path:
    if not url.startswith("sqlite:///"):
        raise ValueError(f"a SQLite store URL is sqlite:///relative/path or sqlite:////absolute/path, got {url!r}")
    path = url[len("sqlite:///"):].split("?", 1)[0]
    if not path:
        raise ValueError("the SQLite store URL has no path")
    return Path(path).expanduser()


class SQLiteStore(StateStore):
    def __init__(self, url: str, ttl_s: float = 0.0) -> None:
        self.url, self.ttl_s = url, ttl_s
        self.path = sqlite_path(url)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hope-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._commits = 0

    # ---- plumbing: every call runs on the store's own thread ----------------------------------

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=_BUSY_TIMEOUT_S)
            conn.execute("PRAGMA journal_mode=WAL")
            # a deleted session's memory is overwritten, not left in free pages (whatever the
            # build's default); the WAL file is cut back after checkpoints instead of keeping
            # the size of the largest transaction for good
            conn.execute("PRAGMA secure_delete=ON")
            conn.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT_BYTES}")
            conn.executescript(_SCHEMA)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(sessions)")}
            if "last_update_norms" not in columns:  # a file made before that column existed
                conn.execute("ALTER TABLE sessions ADD COLUMN last_update_norms TEXT NOT NULL DEFAULT '{}'")
            self._conn = conn
        return self._conn

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            try:
                return fn(self._db())
            except (sqlite3.OperationalError, sqlite3.DatabaseError, OSError) as e:
                # "unable to open", "disk I/O error", a lock held too long by another process
                if self._conn is not None and self._conn.in_transaction:
                    self._conn.rollback()
                raise StoreUnavailable(f"sqlite: {e}") from e

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def _expires(self) -> float:
        return time.time() + self.ttl_s if self.ttl_s else 0.0

    @staticmethod
    def _drop_expired(db: sqlite3.Connection, tenant: str, session_id: str) -> None:
        gone = db.execute("DELETE FROM sessions WHERE tenant=? AND session_id=? AND expires>0 AND expires<=?",
                          (tenant, session_id, time.time())).rowcount
        if gone:
            db.execute("DELETE FROM blobs WHERE tenant=? AND session_id=?", (tenant, session_id))

    @staticmethod
    def _meta(row: tuple) -> SessionMeta:
        keys = [c.strip() for c in _META_COLS.split(",")]
        return SessionMeta.from_strings({k: str(v) for k, v in zip(keys, row, strict=True)})

    # ---- StateStore -------------------------------------------------------------------------

    async def ping(self) -> None:
        await self._run(lambda db: db.execute("SELECT 1").fetchone())

    async def get_meta(self, tenant: str, session_id: str) -> SessionMeta | None:
        check_key(tenant, session_id)

        def q(db: sqlite3.Connection) -> SessionMeta | None:
            row = db.execute(f"SELECT {_META_COLS} FROM sessions WHERE tenant=? AND session_id=? "
                             "AND (expires=0 OR expires>?)", (tenant, session_id, time.time())).fetchone()
            return self._meta(row) if row else None

        return await self._run(q)

    async def load(self, tenant: str, session_id: str, with_state: bool = True) -> SessionRecord | None:
        check_key(tenant, session_id)

        def q(db: sqlite3.Connection) -> SessionRecord | None:
            db.execute("BEGIN")  # one read transaction: meta and blobs from the same commit
            try:
                row = db.execute(f"SELECT {_META_COLS} FROM sessions WHERE tenant=? AND session_id=? "
                                 "AND (expires=0 OR expires>?)", (tenant, session_id, time.time())).fetchone()
                if row is None:
                    return None
                cols = "state, history" if with_state else "NULL, history"
                blob = db.execute(f"SELECT {cols} FROM blobs WHERE tenant=? AND session_id=?",
                                  (tenant, session_id)).fetchone()
                return SessionRecord(self._meta(row), bytes(blob[1]), bytes(blob[0]) if with_state else None)
            finally:
                db.execute("COMMIT")

        return await self._run(q)

    def _write(self, db: sqlite3.Connection, record: SessionRecord, insert: bool,
               expected_version: int = 0) -> bool:
        m = record.meta
        if record.state is None:
            raise ValueError("a stored session needs its state")
        strings = m.to_strings()
        values = (m.uid, m.version, m.created, m.updated, m.tokens_absorbed, strings["updates"],
                  m.state_bytes, m.checkpoint, m.dtype, m.history_total, strings["last_update_norms"],
                  self._expires())
        if insert:
            try:
                db.execute("INSERT INTO sessions (uid, version, created, updated, tokens_absorbed, updates, "
                           "state_bytes, checkpoint, dtype, history_total, last_update_norms, expires, tenant, "
                           "session_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", (*values, m.tenant, m.session_id))
            except sqlite3.IntegrityError:
                return False
        else:
            changed = db.execute(
                "UPDATE sessions SET uid=?, version=?, created=?, updated=?, tokens_absorbed=?, updates=?, "
                "state_bytes=?, checkpoint=?, dtype=?, history_total=?, last_update_norms=?, expires=? "
                "WHERE tenant=? AND session_id=? AND version=? AND uid=?",
                (*values, m.tenant, m.session_id, expected_version, m.uid)).rowcount
            if not changed:
                return False
        db.execute("INSERT OR REPLACE INTO blobs (tenant, session_id, state, history) VALUES (?,?,?,?)",
                   (m.tenant, m.session_id, record.state, record.history))
        return True

    @staticmethod
    def _transaction(db: sqlite3.Connection, fn: Callable[[], T]) -> T:
        """Run `fn` in a write transaction; a failed compare-and-set has written nothing, so the
        transaction always commits unless `fn` raised."""
        db.execute("BEGIN IMMEDIATE")  # take the write lock first: no upgrade deadlocks
        try:
            out = fn()
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return out

    async def commit(self, record: SessionRecord, expected_version: int, lock_token: str | None) -> bool:
        m = record.meta
        check_key(m.tenant, m.session_id)

        def tx(db: sqlite3.Connection) -> bool:
            def body() -> bool:
                self._drop_expired(db, m.tenant, m.session_id)
                if lock_token is not None and not self._holds(db, m.tenant, m.session_id, lock_token):
                    return False
                return self._write(db, record, insert=expected_version == 0, expected_version=expected_version)

            ok = self._transaction(db, body)
            self._commits += 1
            if self._commits % _PURGE_EVERY == 0:
                try:
                    self._purge(db)
                except sqlite3.Error:  # the commit is stored: its answer does not depend on this
                    log.warning("sqlite store: sweeping expired sessions failed", exc_info=True)
            return ok

        return await self._run(tx)

    async def create(self, record: SessionRecord) -> bool:
        m = record.meta
        check_key(m.tenant, m.session_id)

        def tx(db: sqlite3.Connection) -> bool:
            def body() -> bool:
                self._drop_expired(db, m.tenant, m.session_id)
                return self._write(db, record, insert=True)

            return self._transaction(db, body)

        return await self._run(tx)

    async def delete(self, tenant: str, session_id: str) -> bool:
        check_key(tenant, session_id)

        def body(db: sqlite3.Connection) -> bool:
            self._drop_expired(db, tenant, session_id)
            return self._remove(db, tenant, session_id, time.time())

        return await self._run(lambda db: self._transaction(db, lambda: body(db)))

    async def list(self, tenant: str, after: str | None = None, limit: int = 20) -> Page:
        def q(db: sqlite3.Connection) -> Page:
            rows = db.execute(f"SELECT {_META_COLS} FROM sessions WHERE tenant=? AND session_id>? "
                              "AND (expires=0 OR expires>?) ORDER BY session_id LIMIT ?",
                              (tenant, after or "", time.time(), limit + 1)).fetchall()
            return Page([self._meta(r) for r in rows[:limit]], has_more=len(rows) > limit)

        return await self._run(q)

    # ---- locks ------------------------------------------------------------------------------

    @staticmethod
    def _holds(db: sqlite3.Connection, tenant: str, session_id: str, token: str) -> bool:
        fence, _, nonce = token.partition("-")
        row = db.execute("SELECT 1 FROM locks WHERE tenant=? AND session_id=? AND fence=? AND nonce=? "
                         "AND expires>?", (tenant, session_id, fence, nonce, time.time())).fetchone()
        return row is not None

    async def acquire_lock(self, tenant: str, session_id: str, ttl_s: float) -> str | None:
        check_key(tenant, session_id)

        def body(db: sqlite3.Connection) -> str | None:
            now = time.time()
            row = db.execute("SELECT fence, expires FROM locks WHERE tenant=? AND session_id=?",
                             (tenant, session_id)).fetchone()
            if row is not None and row[1] > now:
                return None
            fence = (row[0] if row else 0) + 1  # never reused: the row outlives the lease
            nonce = secrets.token_hex(4)
            db.execute("INSERT OR REPLACE INTO locks (tenant, session_id, fence, nonce, expires) "
                       "VALUES (?,?,?,?,?)", (tenant, session_id, fence, nonce, now + ttl_s))
            self._outlive_lock(db, tenant, session_id, now, now + ttl_s)
            return f"{fence}-{nonce}"

        return await self._run(lambda db: self._transaction(db, lambda: body(db)))

    async def refresh_lock(self, tenant: str, session_id: str, token: str, ttl_s: float) -> bool:
        fence, _, nonce = token.partition("-")

        def q(db: sqlite3.Connection) -> bool:
            now = time.time()
            held = db.execute("UPDATE locks SET expires=? WHERE tenant=? AND session_id=? AND fence=? "
                              "AND nonce=? AND expires>?",
                              (now + ttl_s, tenant, session_id, fence, nonce, now)).rowcount == 1
            if held:
                self._outlive_lock(db, tenant, session_id, now, now + ttl_s)
            return held

        return await self._run(lambda db: self._transaction(db, lambda: q(db)))

    @staticmethod
    def _outlive_lock(db: sqlite3.Connection, tenant: str, session_id: str, now: float, until: float) -> None:
        """A session does not expire while it is locked, so that a request that outlasts the
        session's last TTL still commits (the commit then sets the full TTL)."""
        db.execute("UPDATE sessions SET expires=? WHERE tenant=? AND session_id=? AND expires>? AND expires<?",
                   (until, tenant, session_id, now, until))

    async def release_lock(self, tenant: str, session_id: str, token: str) -> None:
        fence, _, nonce = token.partition("-")
        # keep the row (expired) so the fence counter keeps growing
        await self._run(lambda db: db.execute(
            "UPDATE locks SET expires=0 WHERE tenant=? AND session_id=? AND fence=? AND nonce=?",
            (tenant, session_id, fence, nonce)))

    # ---- upkeep -----------------------------------------------------------------------------

    @staticmethod
    def _purge(db: sqlite3.Connection) -> None:
        """Sweep expired sessions, if the write lock is free right now. It runs after a commit
        that is already stored, so it must neither fail that commit nor make it wait for another
        process's transaction: a busy database skips the sweep until the next one."""
        while True:  # in batches, so that no transaction (and the WAL) holds many blobs
            now = time.time()
            db.execute("PRAGMA busy_timeout=0")
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError:
                log.debug("sqlite store busy: expired sessions are swept later")
                return
            finally:
                db.execute(f"PRAGMA busy_timeout={int(_BUSY_TIMEOUT_S * 1000)}")
            try:
                expired = db.execute("SELECT tenant, session_id FROM sessions WHERE expires>0 AND expires<=? "
                                     "LIMIT ?", (now, _SWEEP_BATCH)).fetchall()
                for tenant, session_id in expired:
                    SQLiteStore._remove(db, tenant, session_id, now)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            if len(expired) < _SWEEP_BATCH:
                return

    @staticmethod
    def _remove(db: sqlite3.Connection, tenant: str, session_id: str, now: float) -> bool:
        """Delete a session: its row, its blob, and its lock row unless a request holds the lock
        (the row keeps a fencing counter, which a session that is gone no longer needs)."""
        found = db.execute("DELETE FROM sessions WHERE tenant=? AND session_id=?", (tenant, session_id)).rowcount
        db.execute("DELETE FROM blobs WHERE tenant=? AND session_id=?", (tenant, session_id))
        db.execute("DELETE FROM locks WHERE tenant=? AND session_id=? AND expires<=?", (tenant, session_id, now))
        return bool(found)

    async def close(self) -> None:
        def shut(db: sqlite3.Connection) -> None:
            db.close()
            self._conn = None

        if self._conn is not None:
            await self._run(shut)
        self._executor.shutdown(wait=True)
