"""Redis, the single source of truth, fails under the cluster: SIGKILLed mid-traffic (clients get
503 with Retry-After, nothing partial is written, the replicas recover by themselves when it is
back) and restarted from its append-only file (every committed session intact, byte for byte)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass

import httpx
import pytest

from tests.deploy.support import Cluster, chat_body, redis_session_keys, state_version, stream_chat, wait_until

DIGEST_BYTES = 8


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@dataclass
class Attempt:
    phase: str  # up | down | back: Redis's state when the request was sent
    status: int
    retry_after: str | None
    version: int | None  # the committed version the client was told about (a complete stream)
    error_code: str | None  # 503 body or an error event in the stream
    transport_error: str | None
    at: float  # when the answer was complete (monotonic)

    @property
    def ok(self) -> bool:
        return self.version is not None

    @property
    def ambiguous(self) -> bool:
        """A stream that began and then failed: its commit may or may not have been applied."""
        return self.status == 200 and not self.ok


def check_nothing_partial(cluster: Cluster) -> dict[str, dict]:
    """Every stored session is one whole commit: the metadata's version is the blob's version, the
    blob's size the recorded size, and the history holds the recorded messages."""
    import json

    sessions = redis_session_keys(cluster.redis.client(), cluster.prefix)
    for sid, parts in sessions.items():
        meta = json.loads(parts["meta"])
        assert state_version(parts["state"]) == int(meta["version"]), sid
        assert len(parts["state"]) == int(meta["state_bytes"]), sid
        assert len(parts["hist"]) % DIGEST_BYTES == 0 and len(parts["hist"]) // DIGEST_BYTES <= int(
            meta["history_total"]), sid
    return sessions


def test_redis_outage_503_then_recovery(cluster: Cluster, client: httpx.Client) -> None:
    sids = [uid("outage") for _ in range(4)]
    for sid in sids:
        r = client.post(f"{cluster.url}/v1/chat/completions", headers={"X-Session-Id": sid},
                        json=chat_body(cluster.model, "Before the outage."))
        assert r.status_code == 200 and r.json()["session"]["version"] == 1
    pids = {name: r.proc.pid for name, r in cluster.replicas.items()}
    attempts: dict[str, list[Attempt]] = defaultdict(list)
    phase = {"now": "up"}
    stop = threading.Event()

    def traffic(sid: str) -> None:
        with httpx.Client(timeout=30) as c:
            for n in range(1000):  # bounded; ends when told to
                if stop.is_set():
                    return
                sent_in = phase["now"]
                body = chat_body(cluster.model, f"Turn {n}.", max_tokens=20, ignore_eos=True)
                res = stream_chat(c, cluster.url, body, headers={"X-Session-Id": sid})
                error = res.error_event or (res.events[0].get("error") if res.status != 200 and res.events else None)
                attempts[sid].append(Attempt(
                    sent_in, res.status, res.headers.get("retry-after"),
                    res.session["version"] if res.done and res.session and not res.error_event else None,
                    (error or {}).get("code"), repr(res.error) if res.error else None, time.monotonic()))
                if res.status != 200:
                    time.sleep(0.2)  # a client honouring Retry-After, shortened for the test

    def oks(phase_name: str) -> int:
        return min(sum(a.ok and a.phase == phase_name for a in attempts[s]) for s in sids)

    threads = [threading.Thread(target=traffic, args=(sid,)) for sid in sids]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: oks("up") >= 2, 60, 0.05, "traffic under way")
        phase["now"] = "down"
        # taken before the kill: a request that the crash fails may be answered before kill()
        # returns, and only the answers complete before the crash began must all be commits
        killed = time.monotonic()
        cluster.redis.kill()  # a crash: no shutdown, mid-traffic
        wait_until(lambda: all(any(a.status == 503 for a in attempts[s]) for s in sids), 20, 0.05,
                   "every client met the outage")
        time.sleep(max(0.0, 1.0 - (time.monotonic() - killed)))
        cluster.redis.start()  # the same port and directory: it reloads its append-only file
        phase["now"] = "back"
        back = time.monotonic()
        wait_until(lambda: oks("back") >= 2, 60, 0.05, "recovery")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)

    flat = [a for s in sids for a in attempts[s]]
    refused = [a for a in flat if a.status == 503]
    cut = [a for a in flat if a.ambiguous]
    recovered = min(a.at for a in flat if a.ok and a.phase == "back") - back
    print(f"\n{len(flat)} requests: {sum(a.ok for a in flat)} committed, {len(refused)} refused with 503 "
          f"(Retry-After {sorted({a.retry_after for a in refused})}), {len(cut)} streams cut by the crash "
          f"(error event {sorted({a.error_code for a in cut})}); clients served again "
          f"{recovered:.2f} s after Redis was back")
    # what the clients saw: 200 or 503 with Retry-After, never a 500; a stream the crash cut ends
    # with an error event saying so
    assert {a.status for a in flat} <= {200, 503}, {a.status for a in flat}
    assert refused and all(a.retry_after and int(a.retry_after) >= 1 for a in refused)
    assert all(a.error_code == "store_unavailable" for a in refused)
    # a cut stream's commit met the dead store: whether it landed is unknown (the server could
    # not ask), or it did not land (the server asked: store_unavailable promises that)
    assert all(a.error_code in ("store_unavailable", "store_outcome_unknown") and a.transport_error is None
               for a in cut), cut
    assert all(a.ok for a in flat if a.at < killed), "a request failed before the outage"

    # what the store holds: for each session, exactly the turns the client was told were committed
    stored = check_nothing_partial(cluster)
    applied = 0  # cut streams whose commit had been applied before the crash
    for sid in sids:
        acked = [a.version for a in attempts[sid] if a.ok]
        prev, ambiguous_between = 1, False  # version 1: the turn before the traffic
        for a in attempts[sid]:  # between two acknowledged commits, only a cut stream may add one
            if a.ok:
                gap = a.version - prev
                assert gap == 1 or (gap == 2 and ambiguous_between), f"{sid}: versions {acked}"
                applied += gap - 1
                prev, ambiguous_between = a.version, False
            elif a.ambiguous:
                ambiguous_between = ambiguous_between or a.error_code == "store_outcome_unknown"
        meta = json.loads(stored[sid]["meta"])
        assert int(meta["version"]) == acked[-1], f"{sid}: stored {meta['version']}, last acknowledged {acked[-1]}"
        assert int(meta["history_total"]) == 2 * int(meta["version"])  # a user message and a reply per turn
    print(f"cut streams whose commit was in the store after all: {applied}")
    # the replicas were never restarted, and are ready again (a probe that draws a pooled
    # connection to the killed Redis fails once, like any request; the next one is fresh)
    assert {name: r.proc.pid for name, r in cluster.replicas.items()} == pids
    for r in cluster.replicas.values():
        wait_until(lambda r=r: httpx.get(f"{r.base_url}/readyz", timeout=5).status_code == 200, 10, 0.1,
                   "ready again")


def test_redis_restart_from_aof_keeps_every_committed_session(cluster: Cluster, client: httpx.Client) -> None:
    fresh = [uid("aof") for _ in range(4)]
    for k, sid in enumerate(fresh):
        for turn in range(k % 2 + 1):
            r = client.post(f"{cluster.url}/v1/chat/completions", headers={"X-Session-Id": sid},
                            json=chat_body(cluster.model, f"Committed turn {turn}."))
            assert r.status_code == 200, r.text
    before = check_nothing_partial(cluster)  # every session of this run: earlier tests' too
    assert set(fresh) <= set(before)

    cluster.redis.kill()  # SIGKILL: no shutdown save; only the append-only file survives
    assert cluster.redis.aof_files(), "no append-only file"
    cluster.redis.start()
    after = check_nothing_partial(cluster)
    assert after.keys() == before.keys()
    changed = [sid for sid in before if after[sid] != before[sid]]
    assert not changed, f"sessions changed by the restart: {changed}"
    print(f"\n{len(before)} committed sessions identical after a SIGKILL and a restart from the AOF")

    # the replicas (not restarted) go on from each session's commit. A replica's pooled Redis
    # connections still point at the killed process: each fails once (503, Retry-After) and is
    # replaced, so a client that honours Retry-After gets through.
    refused = 0
    for sid in fresh:
        for _ in range(20):  # bounded
            r = client.post(f"{cluster.url}/v1/chat/completions", headers={"X-Session-Id": sid},
                            json=chat_body(cluster.model, "After the restart."))
            if r.status_code != 503:
                break
            assert int(r.headers["retry-after"]) >= 1
            refused += 1
            time.sleep(0.1)  # Retry-After, shortened for the test
        assert r.status_code == 200, r.text
        assert r.json()["session"]["version"] == int(json.loads(before[sid]["meta"])["version"]) + 1
    print(f"first requests after the restart: {refused} answered 503 + Retry-After (stale pooled connections)")


@pytest.fixture(autouse=True)
def _redis_up(cluster: Cluster):
    """Whatever happens in a test, Redis is up for the next one."""
    yield
    if not cluster.redis.alive:
        cluster.redis.start()
