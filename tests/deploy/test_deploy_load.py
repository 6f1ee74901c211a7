"""A bounded load run through nginx: a fixed number of chat turns from several concurrent clients.
It prints throughput and latency percentiles (no timing is asserted: the machine is shared) and
asserts that no turn was lost: every session holds exactly the turns its client was told about."""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from collections import Counter

import httpx

from tests.deploy.support import Cluster, chat_body, stream_chat

CLIENTS = 8  # each with a session of its own, affinity by X-Session-Id
TURNS = 12  # per client
SHARED_CLIENTS, SHARED_TURNS = 2, 10  # two clients on one session, session in the body only
MAX_TOKENS = 8


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(p / 100 * len(values) + 0.5) - 1))]


def test_bounded_load_run_loses_no_turn(cluster: Cluster, capsys) -> None:
    run = uuid.uuid4().hex[:6]
    own = [f"load-{run}-{k}" for k in range(CLIENTS)]
    shared = f"load-{run}-shared"
    latencies: list[float] = []
    ttfts: list[float] = []
    versions: dict[str, list[int]] = {sid: [] for sid in [*own, shared]}
    failures: list[str] = []
    request_ids: list[str] = []
    lock = threading.Lock()

    def own_client(sid: str) -> None:
        history: list[dict] = []
        with httpx.Client(timeout=60) as c:
            for turn in range(TURNS):
                history.append({"role": "user", "content": f"{sid} says {turn}: remember {turn * 13}."})
                body = chat_body(cluster.model, history, max_tokens=MAX_TOKENS)
                started = time.perf_counter()
                first: list[float] = []
                if turn % 2:
                    def on_event(i, event, first: list[float] = first) -> None:
                        if not first and isinstance(event, dict) and event.get("choices") and \
                                event["choices"][0]["delta"].get("content"):
                            first.append(time.perf_counter())

                    res = stream_chat(c, cluster.url, body, headers={"X-Session-Id": sid}, on_event=on_event)
                    ok = res.done and res.session is not None and res.error_event is None
                    info, reply, rid = res.session, res.text, res.headers.get("x-request-id", "")
                else:
                    r = c.post(f"{cluster.url}/v1/chat/completions", json=body, headers={"X-Session-Id": sid})
                    ok = r.status_code == 200
                    info = r.json().get("session") if ok else None
                    reply = r.json()["choices"][0]["message"]["content"] if ok else ""
                    rid = r.headers.get("x-request-id", "")
                elapsed = time.perf_counter() - started
                with lock:
                    if not ok:
                        failures.append(f"{sid} turn {turn}")
                        return
                    latencies.append(elapsed)
                    if first:
                        ttfts.append(first[0] - started)
                    versions[sid].append(info["version"])
                    request_ids.append(rid)
                history.append({"role": "assistant", "content": reply})

    def shared_client(k: int) -> None:
        with httpx.Client(timeout=60) as c:
            for turn in range(SHARED_TURNS):
                body = chat_body(cluster.model, f"client {k} turn {turn}", max_tokens=MAX_TOKENS, session_id=shared)
                started = time.perf_counter()
                r = c.post(f"{cluster.url}/v1/chat/completions", json=body)
                elapsed = time.perf_counter() - started
                with lock:
                    if r.status_code != 200:
                        failures.append(f"shared {k} turn {turn}: {r.status_code} {r.text[:200]}")
                        return
                    latencies.append(elapsed)
                    versions[shared].append(r.json()["session"]["version"])
                    request_ids.append(r.headers.get("x-request-id", ""))

    def generated() -> float:
        total = 0.0
        for replica in cluster.replicas.values():
            for line in httpx.get(f"{replica.base_url}/metrics", timeout=10).text.splitlines():
                if line.startswith("hope_generation_tokens_total "):
                    total += float(line.split()[1])
        return total

    tokens_before = generated()
    threads = [threading.Thread(target=own_client, args=(sid,)) for sid in own]
    threads += [threading.Thread(target=shared_client, args=(k,)) for k in range(SHARED_CLIENTS)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    wall = time.perf_counter() - started
    made = generated() - tokens_before
    assert not any(t.is_alive() for t in threads), "a client did not finish"
    assert not failures, failures

    # zero lost turns: each session holds exactly the turns its clients were told were committed
    with httpx.Client(timeout=30) as c:
        for sid in own:
            meta = c.get(f"{cluster.url}/v1/sessions/{sid}").json()
            assert versions[sid] == list(range(1, TURNS + 1)), (sid, versions[sid])
            assert meta["version"] == TURNS and meta["messages_logged"] == 2 * TURNS, meta
        meta = c.get(f"{cluster.url}/v1/sessions/{shared}").json()
    total_shared = SHARED_CLIENTS * SHARED_TURNS
    assert sorted(versions[shared]) == list(range(1, total_shared + 1)), versions[shared]
    assert meta["version"] == total_shared and meta["messages_logged"] == 2 * total_shared, meta

    by_replica = Counter(cluster.replica_by_addr(e["upstream"].split(",")[-1].strip())
                         for e in cluster.nginx.access_entries() if e["rid"] in set(request_ids))
    n = len(latencies)
    with capsys.disabled():
        print(f"\nload run: {n} chat turns ({CLIENTS} clients x {TURNS} turns on their own sessions, "
              f"{SHARED_CLIENTS} x {SHARED_TURNS} on one shared session), max_tokens {MAX_TOKENS}, "
              f"through nginx to 2 replicas ({dict(sorted(by_replica.items()))})")
        print(f"  wall {wall:.2f} s, throughput {n / wall:.1f} turns/s, {made / wall:.0f} generated tokens/s")
        print(f"  latency p50 {percentile(latencies, 50) * 1000:.0f} ms, "
              f"p99 {percentile(latencies, 99) * 1000:.0f} ms, "
              f"mean {statistics.mean(latencies) * 1000:.0f} ms; streams' time to first token "
              f"p50 {percentile(ttfts, 50) * 1000:.0f} ms, p99 {percentile(ttfts, 99) * 1000:.0f} ms")
        print("  lost turns: 0 (every session's version = the turns acknowledged to its clients)")
