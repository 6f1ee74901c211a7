"""The transaction around every request, and what the server keeps per session.

A session is one endless token stream (HOPE.md section 3). A request that learns is a
transaction on it:

1. Lock. First an in-process FIFO lock per session (waiters in this replica queue without
   polling), then the store's lock, whose token is a fencing token (replicas sharing one store
   exclude each other, and a holder whose lease ran out can no longer commit). A busy session
   makes a request wait up to `busy_timeout_s` or, with `busy_policy=reject`, answers 409.
2. Take an engine slot (at most `max_concurrent_requests` run; `max_waiting_requests` may queue
   for a slot or a session, beyond that: 429; a slot not free within `busy_timeout_s`: 429).
3. Load: metadata and message history, and the state blob unless the decoded state of exactly
   this version (and incarnation) is still in the session cache (`StateCache`).
4. Work on a copy (`SessionState.copy()`; the engine never modifies tensors in place).
5. Commit: compare-and-set on the version, checked together with the fencing token. Only a
   request that completed commits; one whose client went away, or that failed, commits nothing.
   The committed state then enters the cache (write-through); a failed commit drops it.
6. Release lock and slot (always, also on cancellation).

A request with `learn=false` reads a snapshot without locking and commits nothing; an ephemeral
request (no session id) starts from a fresh state and is never stored.

Chat history deduplication. OpenAI clients re-send the whole conversation every turn; a session
must absorb each message once. The store keeps, per session, digests of the chat messages
absorbed so far (the generated replies included, as the client will send them back). A request's
messages m[0..n) are matched against that history: the largest k such that m[:k] equals the
last k messages of the history is taken as re-sent, and only m[k:] is absorbed. A client that
sends only its new message has k = 0 and simply continues the stream.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import anyio
import torch

from hope_core.engine import Engine
from hope_core.state import SessionState, StateError
from server.errors import NO_RETRY, APIError, not_found, overloaded, session_busy, store_unavailable, too_large
from server.metrics import Metrics
from server.settings import Settings
from server.stores.base import DIGEST_BYTES, Page, SessionMeta, SessionRecord, StateStore, StoreFull, StoreUnavailable
from server.worker import run_blocking

log = logging.getLogger("hope.server")


# ---- chat history ------------------------------------------------------------------------------

def message_digest(role: str, content: str) -> bytes:
    """8 bytes naming one chat message; a collision needs ~2^32 messages in one session.

    Surrounding whitespace is ignored: some clients trim the replies they send back, and one
    unrecognised message would make the whole re-sent history look new."""
    data = role.encode() + b"\0" + content.strip().encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


def split_digests(blob: bytes) -> list[bytes]:
    return [blob[i:i + DIGEST_BYTES] for i in range(0, len(blob) - DIGEST_BYTES + 1, DIGEST_BYTES)]


RESENT_ANYWHERE = 3  # messages a request must share with the log to match away from its end


def resent_prefix(request: Sequence[bytes], history: Sequence[bytes], truncated: bool = False) -> int:
    """How many leading messages of a request the session has already absorbed.

    The request's first k messages must equal k consecutive logged messages. Ending at the
    log's end, any k counts: the client re-sent the conversation and adds to it. Ending earlier,
    k >= RESENT_ANYWHERE: the client left the log's last messages out (a retry whose first
    attempt was stored, a regenerated reply, an edited message); those stay absorbed (a stream
    cannot forget) and the rest of the request is absorbed after them. A client that sends only
    its new message (with a system prompt, two) may well say the same thing twice, so fewer
    messages never match away from the end. The largest such k; 0 when none.

    `truncated`: the history keeps only its last len(history) messages, so a request's first
    messages may predate it: an alignment that starts before the kept history compares only the
    messages that fall inside it, and only those count towards RESENT_ANYWHERE (a new "continue"
    equal to the oldest kept message is not a re-send of everything before it).
    """
    n = len(history)
    if not n or not request:
        return 0
    best = 0
    # request[0] at history[start]: the match runs request[:k] against history[start:start + k]
    for start, k in enumerate(common_prefixes(request, history)):
        if k > best and (start + k == n or k >= RESENT_ANYWHERE):
            best = k
    if truncated:  # request[0] before the kept history, at -offset: compare request[offset:]
        for offset, k in enumerate(common_prefixes(history, request)[1:], start=1):
            if k and offset + k > best and (k == n or k >= RESENT_ANYWHERE):
                best = offset + k
    return best


def common_prefixes(pattern: Sequence[bytes], text: Sequence[bytes]) -> list[int]:
    """For every position i of `text`, the length of the longest common prefix of `pattern` and
    text[i:]. Linear in len(pattern) + len(text) (the Z-algorithm), so that a request of 100k
    messages against a long log costs milliseconds, not the event loop's minutes."""
    seq = [*pattern, None, *text]  # None equals no digest: no match runs across it
    z = [0] * len(seq)
    left = right = 0  # the rightmost window seq[left:right] known to equal seq[:right - left]
    for i in range(1, len(seq)):
        k = min(right - i, z[i - left]) if i < right else 0
        while i + k < len(seq) and seq[k] == seq[i + k]:
            k += 1
        z[i] = k
        if i + k > right:
            left, right = i, i + k
    return z[len(pattern) + 1:]


# ---- in-process state cache --------------------------------------------------------------------

def state_nbytes(state: SessionState) -> int:
    """The bytes a state's tensors take in memory, at their in-memory dtypes, wherever they live
    (CPU or GPU). Metadata only: no device read."""
    return sum(t.numel() * t.element_size() for t in state.state.tensors().values())


def commit_id(meta: SessionMeta) -> tuple[str, int, float]:
    """What names one commit. The incarnation (uid) and version do, unless the store lost its
    last writes (a Redis restarted from an older snapshot, a failover to a lagging replica):
    then two commits share them, and the time a commit was made tells them apart."""
    return meta.uid, meta.version, meta.updated


@dataclass
class _Cached:
    commit: tuple[str, int, float]  # commit_id of the state held
    state: SessionState
    nbytes: int

    @property
    def uid(self) -> str:
        return self.commit[0]

    @property
    def version(self) -> int:
        return self.commit[1]


class StateCache:
    """Decoded states of recently used sessions, so a session's next request skips reading and
    decoding the blob; the states stay on the engine's device, so a hit costs no transfer.

    An LRU bounded by bytes (`session_cache_bytes`) and by count (`session_cache_size`); either
    at 0 disables it. An entry is keyed by (tenant, session id) and remembers the commit it holds
    (`commit_id`): the caller uses it only when the store still holds exactly that commit
    (`SessionManager._load` checks with the metadata read it makes anyway), so replicas sharing
    a store never serve a stale state, nor one whose commit the store has lost. Commits write
    through: the committed state enters the cache only after the store accepted it, and a
    failed commit drops the entry.

    Touched only from the event loop (no method awaits), so every method is atomic.
    """

    def __init__(self, max_bytes: int, max_entries: int, metrics: Metrics) -> None:
        self.max_bytes, self.max_entries, self.metrics = max_bytes, max_entries, metrics
        self._items: OrderedDict[tuple[str, str], _Cached] = OrderedDict()
        self.nbytes = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0 and self.max_entries > 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._items

    def keys(self) -> list[tuple[str, str]]:
        """The cached sessions, least recently used first."""
        return list(self._items)

    def get(self, key: tuple[str, str]) -> _Cached | None:
        """The entry (marked most recently used), unvalidated: compare its commit with the
        store's before using it."""
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: tuple[str, str], meta: SessionMeta, state: SessionState) -> None:
        if not self.enabled:
            return
        old = self._items.get(key)
        if old is not None and old.uid == meta.uid and old.version > meta.version:
            return  # a read that began before a commit finished after it: keep the newer state
        self._remove(key)
        size = state_nbytes(state)
        if size > self.max_bytes:  # could never fit: not cached at all
            self.metrics.cache_evictions.inc()
        else:
            self._items[key] = _Cached(commit_id(meta), state, size)
            self.nbytes += size
            while self.nbytes > self.max_bytes or len(self._items) > self.max_entries:
                _, evicted = self._items.popitem(last=False)  # least recently used first
                self.nbytes -= evicted.nbytes
                self.metrics.cache_evictions.inc()
        self._publish()

    def drop(self, key: tuple[str, str]) -> None:
        if self._remove(key):
            self._publish()

    def _remove(self, key: tuple[str, str]) -> bool:
        item = self._items.pop(key, None)
        if item is None:
            return False
        self.nbytes -= item.nbytes
        return True

    def _publish(self) -> None:
        self.metrics.sessions_cached.set(len(self._items))
        self.metrics.cache_bytes.set(self.nbytes)


# ---- admission: engine slots and the waiting queue ---------------------------------------------

class Admission:
    """Engine slots and the queue for them. The request gauges read its counts (Metrics.read_requests_from)."""

    def __init__(self, settings: Settings) -> None:
        self.max_waiting = settings.max_waiting_requests
        self.retry_after = settings.overload_retry_after_s
        self.timeout_s = settings.busy_timeout_s
        self.waiting = 0
        self.running = 0
        self._slots = asyncio.Semaphore(settings.max_concurrent_requests)
        # held by a request while it takes several slots, one at a time: two such requests, each
        # holding some and waiting for more, would wait for each other forever (a request of one
        # slot never waits while holding it)
        self.group = asyncio.Lock()

    @contextmanager
    def queued(self):
        """Count a request as waiting; refuse it (429) when the queue is full."""
        if self.waiting >= self.max_waiting:
            raise overloaded("too many requests are waiting; try again shortly", self.retry_after)
        self.waiting += 1
        try:
            yield
        finally:
            self.waiting -= 1

    async def acquire(self) -> None:
        """A slot, or 429 after `busy_timeout_s` in the queue, so that a request does not wait
        unseen for a slot for longer than that (a proxy's read timeout must outlast it). With
        `max_batch_size` below `max_concurrent_requests`, its job may then wait in the
        scheduler's queue for a row of the batch: as long again if it is not a stream
        (`Plan.admit_within_s`), and with keep-alives if it is."""
        if self._slots.locked():
            with self.queued():
                try:
                    with anyio.fail_after(self.timeout_s):
                        await self._slots.acquire()
                except TimeoutError:
                    raise overloaded(f"no engine slot came free in {self.timeout_s:g} s; try again shortly",
                                     self.retry_after) from None
        else:
            await self._slots.acquire()
        self.running += 1

    def release(self) -> None:
        self._slots.release()
        self.running -= 1


class _LocalLocks:
    """One asyncio.Lock per session in use, dropped when nobody holds or awaits it."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}

    def ref(self, key: tuple[str, str]) -> asyncio.Lock:
        lock, n = self._locks.get(key, (None, 0))
        lock = lock or asyncio.Lock()
        self._locks[key] = (lock, n + 1)
        return lock

    def release(self, key: tuple[str, str]) -> None:
        self._locks[key][0].release()
        self.unref(key)

    def unref(self, key: tuple[str, str]) -> None:
        lock, n = self._locks[key]
        if n <= 1:
            del self._locks[key]
        else:
            self._locks[key] = (lock, n - 1)


# ---- one request's hold on a session -----------------------------------------------------------

async def keep_lock(store: StateStore, tenant: str, session_id: str, token: str, ttl_s: float) -> None:
    """Renew a lock's lease while its request runs; a lost lock makes the commit fail. A task of
    its own that knows nothing of the turn: a cancelled task keeps its frames (in its
    exception's traceback), and a frame holding the turn would keep the turn's states, megabytes
    each, alive in a cycle until a full garbage collection."""
    while True:
        await asyncio.sleep(ttl_s / 3)
        try:
            if not await store.refresh_lock(tenant, session_id, token, ttl_s):
                log.warning("session lock lost", extra={"session": session_id})
                return
        except StoreUnavailable:
            continue


@dataclass
class Turn:
    """What a request works with: the committed state, a working copy, and the means to commit.

    `persist` is False for ephemeral sessions and for `learn=false`: `commit` then stores nothing.
    """

    manager: SessionManager
    tenant: str
    session_id: str | None
    persist: bool
    base: SessionState | None  # the committed state (None: not loaded, for a state import)
    meta: SessionMeta | None  # None: the session is not stored yet
    history: list[bytes] = field(default_factory=list)
    lock_token: str | None = None
    work: SessionState | None = field(init=False, default=None)  # what the engine advances
    # what became of a commit that the request's cancellation interrupted (uvicorn cancels
    # requests still running past its graceful period): "stored" (the request then goes on to
    # its answer), "not_stored" or "unknown"; None while no commit was interrupted.
    # LastAnswer (server.app) says it to a client that gets no answer.
    interrupted_commit: str | None = field(init=False, default=None)
    stored: bool = field(init=False, default=False)  # a commit of this turn is in the store
    _uid: str = field(default_factory=lambda: uuid.uuid4().hex)
    _local_key: tuple[str, str] | None = None
    _slot: bool = False
    _refresher: asyncio.Task | None = None
    _released: bool = False

    def __post_init__(self) -> None:
        self.work = self.base.copy() if self.base is not None else None
        if self.meta is not None:
            self._uid = self.meta.uid

    @property
    def version(self) -> int:
        return self.meta.version if self.meta else 0

    @property
    def history_truncated(self) -> bool:
        return self.meta is not None and self.meta.history_total > len(self.history)

    def resent_prefix(self, digests: Sequence[bytes]) -> int:
        return resent_prefix(digests, self.history, self.history_truncated)

    async def commit(self, new_digests: Sequence[bytes] = (), reset_history: bool = False,
                     update_norms: dict[str, float] | None = None) -> SessionMeta | None:
        """Store the working copy as the next version, if nobody changed the session meanwhile
        (409 otherwise). Once begun, a commit is not interrupted by cancellation: a cancelled
        request waits for it, and goes on if it was stored (`_outlives_cancel`).

        `update_norms`: per level, the norm of this request's last update at that level; levels
        it did not update keep the norm stored before (an import starts over)."""
        if not self.persist:
            return None
        m = self.manager
        key = (self.tenant, self.session_id or "")
        # the write runs in a task of its own: anyio's shield keeps anyio's cancellations out,
        # but asyncio's own (uvicorn's, at shutdown) passes it, and a write cut there may still
        # land in the store
        write = asyncio.ensure_future(self._write(new_digests, reset_history, update_norms))
        with anyio.CancelScope(shield=True):
            try:
                await asyncio.wait({write})
            except asyncio.CancelledError:
                if not await self._outlives_cancel(write):
                    raise
            try:
                meta = write.result()
            except BaseException:
                # refused, failed or unknown outcome: the cache must not vouch for this session
                # until a load has read the store again
                m.cache.drop(key)
                raise
            # write-through, only after the store accepted the commit; a copy (shallow at float32),
            # so that nothing done to the working copy afterwards reaches the cache, holding what
            # the blob holds, so that a replica that loads it answers as this one does
            self.stored = True
            m.cache.put(key, meta, self.work.stored_as(m.settings.state_dtype))
            return meta

    async def _outlives_cancel(self, write: asyncio.Future[SessionMeta]) -> bool:
        """This request was cancelled during its commit (the server's shutdown, past its grace):
        wait for the write, and note what became of it (`interrupted_commit`). A stored turn has
        done what the request was for, and its answer can still go out (the shutdown waits for
        open turns): then the cancellation is spent and True is returned."""
        try:
            await asyncio.wait({write})
        except asyncio.CancelledError:  # cancelled again: stop waiting
            write.add_done_callback(lambda w: w.cancelled() or w.exception())  # retrieved, not logged
            self.interrupted_commit = "unknown"
            return False
        error = None if write.cancelled() else write.exception()
        if error is None and not write.cancelled():
            self.interrupted_commit = "stored"
            task = asyncio.current_task()
            if task is not None and hasattr(task, "uncancel"):  # Python 3.11+: it counts cancellations
                task.uncancel()
            return True
        unknown = isinstance(error, APIError) and error.code == "store_outcome_unknown"
        self.interrupted_commit = "unknown" if unknown else "not_stored"
        self.manager.cache.drop((self.tenant, self.session_id or ""))
        return False

    async def _write(self, new_digests: Sequence[bytes], reset_history: bool,
                     update_norms: dict[str, float] | None) -> SessionMeta:
        """Encode the working copy and compare-and-set it as the next version in the store."""
        m = self.manager
        t0 = time.perf_counter()
        work = self.work
        work.version = self.version + 1
        try:
            blob = await run_blocking(m.io_executor, work.to_bytes, m.settings.state_dtype)
        except StateError as e:
            raise APIError(500, f"this request left the session's memory not finite ({e}); nothing was stored "
                           "and the session is as it was before it", code="state_not_finite",
                           reason="state_not_finite", headers=NO_RETRY) from None
        if len(blob) > m.settings.max_state_bytes:
            raise too_large(f"the session state ({len(blob)} bytes) exceeds the limit "
                            f"({m.settings.max_state_bytes} bytes)", code="state_too_large")
        kept = [] if reset_history else self.history
        history = ([*kept, *new_digests])[-m.settings.history_max_messages:]
        total = (0 if reset_history or self.meta is None else self.meta.history_total) + len(new_digests)
        norms = {} if reset_history or self.meta is None else dict(self.meta.last_update_norms)
        norms.update({lvl: n for lvl, n in (update_norms or {}).items() if math.isfinite(n)})
        now = time.time()
        meta = SessionMeta(tenant=self.tenant, session_id=self.session_id or "", uid=self._uid,
                           version=work.version, created=self.meta.created if self.meta else now,
                           updated=now, tokens_absorbed=work.tokens_absorbed, updates=work.updates,
                           state_bytes=len(blob), checkpoint=work.fingerprint,
                           dtype=m.settings.state_dtype, history_total=total, last_update_norms=norms)
        record = SessionRecord(meta, b"".join(history), blob)
        try:
            ok = await m.store.commit(record, self.version, self.lock_token)
        except StoreFull:  # refused whole: nothing landed
            raise store_unavailable(m.settings.overload_retry_after_s, full=True) from None
        except StoreUnavailable:
            ok = await self._settle(meta)
        if not ok:
            m.metrics.version_conflicts.inc()
            raise APIError(409, "the session changed while this request ran; nothing was stored",
                           code="session_conflict", reason="version_conflict")
        m.metrics.state_store.observe(time.perf_counter() - t0)
        m.metrics.state_bytes.observe(len(blob))
        return meta

    async def _settle(self, meta: SessionMeta) -> bool:
        """The store did not answer a commit, which it may still have applied (Redis stalled
        past the client's timeout runs the script it already received): find out which, so
        that "try again" is said only when trying again cannot absorb the request twice. The
        lock goes first: a commit still queued in the store then fails its token check, and the
        version read afterwards is final. True: the commit is stored."""
        m = self.manager
        # not to be retried blindly: the request may be stored already
        unknown = APIError(503, "the session store did not answer the commit, so whether this request was "
                           "stored is unknown; read the session's version before sending it again",
                           code="store_outcome_unknown", reason="store_unavailable", headers=NO_RETRY)
        if self.lock_token is None or not self.session_id:
            raise unknown
        try:
            await m.store.release_lock(self.tenant, self.session_id, self.lock_token)
            stored = await m.store.get_meta(self.tenant, self.session_id)
        except StoreUnavailable:
            raise unknown from None
        if stored is not None and commit_id(stored) == commit_id(meta):
            log.warning("a commit the store did not answer was stored", extra={"session": self.session_id})
            return True
        raise store_unavailable(m.settings.overload_retry_after_s)

    async def release(self) -> None:
        """Give back the slot and the locks. Idempotent; runs to the end even when cancelled."""
        if self._released:
            return
        self._released = True
        m = self.manager
        with anyio.CancelScope(shield=True):
            if self._refresher is not None:
                self._refresher.cancel()
                self._refresher = None
            if self._slot:
                m.admission.release()
            if self.lock_token is not None and self.session_id:
                try:
                    await m.store.release_lock(self.tenant, self.session_id, self.lock_token)
                except Exception:  # the lease expires by itself
                    log.warning("could not release a session lock", exc_info=True)
            if self._local_key is not None:
                m.local_locks.release(self._local_key)
            m.open_turns.pop(id(self), None)


# ---- the manager -------------------------------------------------------------------------------

class SessionManager:
    def __init__(self, engine: Engine, store: StateStore, settings: Settings, metrics: Metrics) -> None:
        self.engine, self.store, self.settings, self.metrics = engine, store, settings, metrics
        self.cache = StateCache(settings.session_cache_bytes, settings.session_cache_size, metrics)
        self.admission = Admission(settings)
        # encoding/decoding states: short, and must not queue behind long generations
        self.io_executor: Executor = ThreadPoolExecutor(4, thread_name_prefix="hope-io",
                                                        initializer=torch.set_num_threads, initargs=(1,))
        self.local_locks = _LocalLocks()
        self.open_turns: dict[int, Turn] = {}  # turns that may hold a store lock, until released
        self._releasing: set[asyncio.Future] = set()  # locks granted to callers that had left

    async def close(self, timeout: float = 5.0) -> None:
        """At shutdown, before the store closes: the turns of requests that the server aborted
        (uvicorn cancels them once its graceful period is over) give back their session locks
        first, so the sessions are free at once instead of after the lock's lease."""
        deadline = time.monotonic() + timeout
        while (self.open_turns or self._releasing) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self.io_executor.shutdown(wait=False, cancel_futures=True)

    # ---- turns -------------------------------------------------------------------------------

    async def begin(self, tenant: str, session_id: str | None, *, learn: bool = True,
                    with_state: bool = True, engine_slot: bool = True) -> Turn:
        """Open a turn on a session (None: ephemeral). Raises 409/429/503 before anything runs."""
        if session_id is None:
            turn = Turn(self, tenant, None, persist=False, base=self.engine.new_session(), meta=None)
            return await self._with_slot(turn, engine_slot)
        if not learn:  # a read-only snapshot: no lock, nothing committed
            meta, history, base = await self._load(tenant, session_id, with_state)
            turn = Turn(self, tenant, session_id, persist=False, base=base, meta=meta, history=history)
            return await self._with_slot(turn, engine_slot)

        turn = Turn(self, tenant, session_id, persist=True, base=None, meta=None)
        self.open_turns[id(turn)] = turn
        try:
            await self._lock(turn)
            if engine_slot:
                await self.admission.acquire()
                turn._slot = True
            turn.meta, turn.history, turn.base = await self._load(tenant, session_id, with_state)
            turn.work = turn.base.copy() if turn.base is not None else None
            if turn.meta is not None:
                turn._uid = turn.meta.uid
        except BaseException:
            await turn.release()
            raise
        return turn

    async def _with_slot(self, turn: Turn, engine_slot: bool) -> Turn:
        if engine_slot:
            await self.admission.acquire()
            turn._slot = True
        return turn

    async def _lock(self, turn: Turn) -> None:
        s, key = self.settings, (turn.tenant, turn.session_id or "")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + s.busy_timeout_s
        busy = f"session {turn.session_id!r} is busy with another request"
        local = self.local_locks.ref(key)
        try:
            if local.locked():
                if s.busy_policy == "reject":
                    raise session_busy(busy)
                with self.admission.queued(), anyio.fail_after(max(deadline - loop.time(), 0)):
                    await local.acquire()
            else:
                await local.acquire()
        except TimeoutError:
            self.local_locks.unref(key)
            raise session_busy(busy + f" (waited {s.busy_timeout_s:g} s)") from None
        except BaseException:
            self.local_locks.unref(key)
            raise
        turn._local_key = key  # from here on, release() gives the local lock back

        token = await self._acquire_store_lock(turn.tenant, key[1])
        if token is None:  # another replica holds it: poll with backoff
            if s.busy_policy == "reject":
                raise session_busy(busy)
            delay = 0.005
            with self.admission.queued():
                while token is None:
                    left = deadline - loop.time()
                    if left <= 0:
                        raise session_busy(busy + f" (waited {s.busy_timeout_s:g} s)")
                    await asyncio.sleep(min(delay, left))
                    delay = min(delay * 2, 0.1)
                    token = await self._acquire_store_lock(turn.tenant, key[1])
        turn.lock_token = token
        turn._refresher = asyncio.create_task(keep_lock(self.store, turn.tenant, key[1], token, s.lock_ttl_s))

    async def _acquire_store_lock(self, tenant: str, session_id: str) -> str | None:
        """One attempt at the store's lock. A caller cancelled meanwhile (its client left) must
        not orphan a lock that the store grants after all, which would keep the session busy for
        a whole lease: the attempt runs on, and a token it gets is given back."""
        attempt = asyncio.ensure_future(self.store.acquire_lock(tenant, session_id, self.settings.lock_ttl_s))
        try:
            return await asyncio.shield(attempt)
        except asyncio.CancelledError:
            self._releasing.add(attempt)  # held until done: the loop keeps only weak references
            attempt.add_done_callback(lambda done: self._give_back(tenant, session_id, done))
            raise

    def _give_back(self, tenant: str, session_id: str, attempt: asyncio.Future) -> None:
        self._releasing.discard(attempt)
        if attempt.cancelled() or attempt.exception() is not None or attempt.result() is None:
            return
        release = asyncio.ensure_future(self.store.release_lock(tenant, session_id, attempt.result()))
        self._releasing.add(release)
        release.add_done_callback(self._released)

    def _released(self, release: asyncio.Future) -> None:
        self._releasing.discard(release)
        if not release.cancelled() and release.exception() is not None:  # the lease frees it later
            log.warning("could not give back an abandoned session lock", extra={"error": str(release.exception())})

    async def _load(self, tenant: str, session_id: str, with_state: bool = True
                    ) -> tuple[SessionMeta | None, list[bytes], SessionState | None]:
        """The stored session (meta, history, decoded state), or a fresh one when there is none.

        A cached state is used only when the store still holds its incarnation and version: the
        read of metadata and history that every turn needs is the check, so a hit costs that
        one read and no blob read; a stale entry costs one more read, with the blob."""
        key = (tenant, session_id)
        t0 = time.perf_counter()
        cached = self.cache.get(key) if with_state else None
        record = await self.store.load(tenant, session_id, with_state=with_state and cached is None)
        if record is None:
            if cached is not None:  # deleted (or expired) meanwhile, maybe by another replica
                self.metrics.cache_misses.labels("stale").inc()
            self.cache.drop(key)
            return None, [], self.engine.new_session() if with_state else None
        history = split_digests(record.history)
        if not with_state:
            return record.meta, history, None
        if cached is not None and cached.commit == commit_id(record.meta):
            self.metrics.cache_hits.inc()
            return record.meta, history, cached.state
        self.metrics.cache_misses.labels("absent" if cached is None else "stale").inc()
        if record.state is None:  # the cached state was stale: read the blob after all
            self.cache.drop(key)
            record = await self.store.load(tenant, session_id, with_state=True)
            if record is None:
                return None, [], self.engine.new_session()
            history = split_digests(record.history)
        state = await self._decode(record.state or b"", "the stored state of this session")
        if state.version != record.meta.version:
            raise APIError(500, "the stored state does not match its metadata", code="state_mismatch")
        self.metrics.state_load.observe(time.perf_counter() - t0)
        self.cache.put(key, record.meta, state)
        return record.meta, history, state

    async def _decode(self, blob: bytes, what: str) -> SessionState:
        try:
            return await run_blocking(self.io_executor, self.engine.load_session, blob)
        except StateError as e:
            raise APIError(409, f"{what} cannot be used with this checkpoint: {e}",
                           code="session_incompatible", reason="session_incompatible", headers=NO_RETRY) from None

    # ---- session resources -------------------------------------------------------------------

    async def get(self, tenant: str, session_id: str) -> SessionMeta:
        meta = await self.store.get_meta(tenant, session_id)
        if meta is None:
            raise not_found(f"no session {session_id!r}", param="session_id")
        return meta

    async def list(self, tenant: str, after: str | None, limit: int) -> Page:
        return await self.store.list(tenant, after, limit)

    async def delete(self, tenant: str, session_id: str) -> None:
        self.cache.drop((tenant, session_id))
        if not await self.store.delete(tenant, session_id):
            raise not_found(f"no session {session_id!r}", param="session_id")

    async def export(self, tenant: str, session_id: str) -> SessionRecord:
        record = await self.store.load(tenant, session_id, with_state=True)
        if record is None:
            raise not_found(f"no session {session_id!r}", param="session_id")
        return record

    async def fork(self, tenant: str, session_id: str, new_id: str) -> SessionMeta:
        """A new session starting from a consistent snapshot of another (history included)."""
        record = await self.export(tenant, session_id)
        copy = record.renamed(tenant, new_id, uuid.uuid4().hex)
        if not await self.store.create(copy):
            raise APIError(409, f"session {new_id!r} already exists", param="new_id", code="session_exists",
                           reason="session_exists", headers=NO_RETRY)
        return copy.meta

    async def import_state(self, tenant: str, session_id: str, blob: bytes) -> SessionMeta:
        """Replace a session's state by an exported one (validated; the message history starts
        over, since the blob does not say which messages made it)."""
        if len(blob) > self.settings.max_state_bytes:
            raise too_large(f"the state ({len(blob)} bytes) exceeds the limit "
                            f"({self.settings.max_state_bytes} bytes)", code="state_too_large")
        try:
            state = await run_blocking(self.io_executor, self.engine.load_session, blob)
            await run_blocking(self.io_executor, self.engine.check_usable, state)
        except StateError as e:
            raise APIError(400, f"not a valid state for this checkpoint: {e}", code="invalid_state") from None
        turn = await self.begin(tenant, session_id, with_state=False, engine_slot=False)
        try:
            turn.work = state
            meta = await turn.commit(reset_history=True)
            assert meta is not None
            return meta
        finally:
            await turn.release()
