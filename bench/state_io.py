"""Session state load and store latency against state size, for every store the server has.

What the server does per request (server/sessions.py), timed the same way here:
* store = encode (`SessionState.to_bytes`, safetensors, fp32 or bf16 floats) + `store.commit`
  (compare-and-set on the version: an fsync'd SQLite transaction, a Redis Lua script);
* load = `store.load` with the blob + decode (`SessionState.from_bytes`, which validates the
  fingerprint, names, shapes, dtypes, finiteness and counters before any tensor is used).

States: the bundled checkpoint's in fp32 and bf16, and those of smaller and larger HopeConfigs
(random init: the size of a state depends only on the config). Median and p99 over `reps`
repetitions after one warm-up. Redis keys live under a prefix of their own on db 15 by default and
are deleted afterwards.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from bench.timing import percentile
from hope_core.checkpoint import DEFAULT_CHECKPOINT, Checkpoint
from hope_core.model import HopeLM
from hope_core.state import SessionState

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"
TENANT = "bench"


@dataclass
class StateCase:
    name: str
    model: HopeLM
    fingerprint: str
    dtype: str  # storage dtype of the floats
    session: SessionState = field(init=False)
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.session = SessionState(self.model.init_state(1), self.fingerprint)
        self.nbytes = len(self.session.to_bytes(self.dtype))


@dataclass
class IORow:
    store: str  # memory, sqlite, redis
    case: str
    nbytes: int
    load_p50_ms: float | None = None
    load_p99_ms: float | None = None
    store_p50_ms: float | None = None
    store_p99_ms: float | None = None
    note: str = ""


@dataclass
class StateIOResults:
    reps: int
    rows: list[IORow] = field(default_factory=list)


def cases(checkpoint: Checkpoint, d_models: list[int], seed: int = 0) -> list[StateCase]:
    """The checkpoint's state in fp32 and bf16, then fp32 states of the same config at other widths
    (heads scaled with the width, so the head size stays that of the checkpoint)."""
    cfg = checkpoint.model.cfg
    label = "bundled" if checkpoint.path.resolve() == DEFAULT_CHECKPOINT.resolve() else checkpoint.path.name
    out = [StateCase(f"{label} d{cfg.d_model} fp32", checkpoint.model, checkpoint.fingerprint,
                     "float32"),
           StateCase(f"{label} d{cfg.d_model} bf16", checkpoint.model, checkpoint.fingerprint,
                     "bfloat16")]
    for d in d_models:
        if d == cfg.d_model:
            continue
        heads = max(1, d // cfg.head_dim)
        other = replace(cfg, d_model=d, n_heads=heads, slow_hidden=4 * d)
        torch.manual_seed(seed)
        out.append(StateCase(f"random d{d} fp32", HopeLM(other).eval().requires_grad_(False), f"bench-d{d}",
                             "float32"))
    return sorted(out, key=lambda c: c.nbytes)


async def measure(store, store_name: str, case: StateCase, reps: int) -> IORow:
    from server.stores.base import SessionMeta, SessionRecord

    sid = f"state-io-{uuid.uuid4().hex[:12]}"
    loads, stores = [], []
    version = 0
    try:
        for i in range(reps + 1):  # the first round warms connections, pages and caches
            t0 = time.perf_counter()
            blob = case.session.to_bytes(case.dtype)
            now = time.time()
            meta = SessionMeta(tenant=TENANT, session_id=sid, uid="bench", version=version + 1, created=now,
                               updated=now, tokens_absorbed=case.session.tokens_absorbed,
                               updates=case.session.updates, state_bytes=len(blob), checkpoint=case.fingerprint,
                               dtype=case.dtype)
            if not await store.commit(SessionRecord(meta, b"", blob), version, None):
                raise RuntimeError(f"{store_name}: commit of version {version + 1} refused")
            version += 1
            t1 = time.perf_counter()
            record = await store.load(TENANT, sid, with_state=True)
            SessionState.from_bytes(record.state, case.model, case.fingerprint)
            t2 = time.perf_counter()
            if i:
                stores.append((t1 - t0) * 1e3)
                loads.append((t2 - t1) * 1e3)
    finally:
        await store.delete(TENANT, sid)
    return IORow(store_name, case.name, case.nbytes, percentile(loads, 50), percentile(loads, 99),
                 percentile(stores, 50), percentile(stores, 99))


def _delete_redis_prefix(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


async def _run(state_cases: list[StateCase], stores: list[str], reps: int, redis_url: str, tmp: Path,
               rows: list[IORow], log=print) -> None:
    from server.stores import open_store

    prefix = f"hopebench-{uuid.uuid4().hex[:8]}"
    urls = {"memory": "memory://", "sqlite": f"sqlite:///{tmp / 'bench.db'}",
            "redis": f"{redis_url}{'&' if '?' in redis_url else '?'}prefix={prefix}"}
    for name in stores:
        store = open_store(urls[name])
        try:
            try:
                await store.ping()
            except Exception as e:  # an unreachable store is a row, not a crash
                log(f"state_io {name}: unavailable ({e})")
                rows += [IORow(name, c.name, c.nbytes, note="unavailable") for c in state_cases]
                continue
            for case in state_cases:
                row = await measure(store, name, case, reps)
                rows.append(row)
                log(f"state_io {name:<6} {case.name:<28} {case.nbytes / 2**20:7.2f} MiB: load p50 "
                    f"{row.load_p50_ms:7.2f} ms p99 {row.load_p99_ms:7.2f}, store p50 {row.store_p50_ms:7.2f} ms "
                    f"p99 {row.store_p99_ms:7.2f}")
        finally:
            await store.close()
            if name == "redis":
                _delete_redis_prefix(redis_url.split("?")[0], prefix)


def run(checkpoint: Checkpoint, d_models: list[int], reps: int = 10, stores: list[str] | None = None,
        redis_url: str = DEFAULT_REDIS_URL, log=print, publish=None) -> StateIOResults:
    state_cases = cases(checkpoint, d_models)
    res = StateIOResults(reps)
    if publish:
        publish(res)
    with tempfile.TemporaryDirectory(prefix="hope-bench-") as tmp:
        asyncio.run(_run(state_cases, stores or ["memory", "sqlite", "redis"], reps, redis_url, Path(tmp),
                         res.rows, log))
    return res
