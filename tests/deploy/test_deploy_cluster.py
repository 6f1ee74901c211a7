"""Two replicas behind the repository's nginx config, one Redis: a session is one memory whichever
replica serves it, and losing a replica (SIGKILL, SIGTERM, a client that leaves) loses no commit
and commits nothing partial."""

from __future__ import annotations

import signal
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.deploy.support import (
    Cluster,
    Nginx,
    StreamResult,
    chat_body,
    same_state,
    state_version,
    stream_chat,
    wait_until,
)


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def chat(client: httpx.Client, url: str, body: dict, headers: dict[str, str] | None = None) -> httpx.Response:
    r = client.post(f"{url}/v1/chat/completions", json=body, headers=headers)
    assert r.status_code == 200, r.text
    return r


def served_by(cluster: Cluster, request_id: str) -> str:
    """The replica that answered a request, from nginx's access log (the last upstream tried)."""
    def entry():
        return next((e for e in cluster.nginx.access_entries() if e["rid"] == request_id), None)

    wait_until(lambda: entry() is not None, 5, 0.02, "the access log line")
    return cluster.replica_by_addr(entry()["upstream"].split(",")[-1].strip())


def session_meta(client: httpx.Client, url: str, sid: str) -> dict:
    r = client.get(f"{url}/v1/sessions/{sid}")
    assert r.status_code == 200, r.text
    return r.json()


def export(client: httpx.Client, url: str, sid: str) -> bytes:
    r = client.get(f"{url}/v1/sessions/{sid}/state")
    assert r.status_code == 200, r.text
    return r.content


def metric(client: httpx.Client, url: str, name: str) -> float:
    for line in client.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_conversation_across_replicas_keeps_one_memory(cluster: Cluster, client: httpx.Client) -> None:
    """An OpenAI-style client (the whole conversation re-sent every turn, the session only in the
    body, so nginx spreads the turns) talks to both replicas in turn. Every turn adds exactly its
    new messages, the version grows by one per turn, and the memory at the end is bit-identical
    to the memory of the same conversation held on one replica alone."""
    sid, ref = uid("conv"), uid("conv-ref")
    a = cluster.replicas["hope-a"].base_url
    history: list[dict] = []
    ref_history: list[dict] = []
    served: list[str] = []
    last_tokens = 0
    for i in range(24):  # until both replicas served at least two turns (bounded)
        user = {"role": "user", "content": f"Turn {i}: the number of the day is {i * 7 + 3}."}
        history.append(user)
        ref_history.append(user)
        body = chat_body(cluster.model, history, session_id=sid, max_tokens=6)
        if i % 2:  # streaming and non-streaming turns alternate
            res = stream_chat(client, cluster.url, body)
            assert res.done and res.error is None, res
            reply, info, rid = res.text, res.session, res.headers["x-request-id"]
        else:
            r = chat(client, cluster.url, body)
            reply, info, rid = r.json()["choices"][0]["message"]["content"], r.json()["session"], \
                r.headers["x-request-id"]
        served.append(served_by(cluster, rid))
        assert info["version"] == i + 1, f"turn {i}: version {info['version']}"
        assert info["resent_messages"] == 2 * i, "the re-sent history was not recognised as absorbed"
        assert info["tokens_absorbed"] > last_tokens
        last_tokens = info["tokens_absorbed"]
        history.append({"role": "assistant", "content": reply})

        # the reference: the same conversation, every turn on replica a
        r = chat(client, a, chat_body(cluster.model, ref_history, session_id=ref, max_tokens=6))
        ref_reply = r.json()["choices"][0]["message"]["content"]
        assert ref_reply == reply, f"turn {i}: the replies diverged ({served[-1]} answered {reply!r})"
        ref_history.append({"role": "assistant", "content": ref_reply})
        if i >= 5 and min(served.count("hope-a"), served.count("hope-b")) >= 2:
            break
    assert min(served.count("hope-a"), served.count("hope-b")) >= 2, served
    turns = len(served)

    metas = [session_meta(client, r.base_url, sid) for r in cluster.replicas.values()]
    assert metas[0] == metas[1]
    assert metas[0]["version"] == turns and metas[0]["messages_logged"] == 2 * turns
    blobs = [export(client, r.base_url, sid) for r in cluster.replicas.values()]
    assert blobs[0] == blobs[1] and state_version(blobs[0]) == turns
    # the same tensors, bit for bit (the bytes differ: safetensors orders the metadata at random)
    assert same_state(export(client, a, ref), blobs[0]), "the memory depends on which replica served which turn"


def test_session_affinity(cluster: Cluster, client: httpx.Client) -> None:
    """nginx hashes X-Session-Id (or the id in a /v1/sessions/{id} path): one session, one
    replica; many sessions, both replicas."""
    seen: dict[str, set[str]] = {}
    for k in range(16):
        sid = uid(f"aff{k}")
        rids = [client.get(f"{cluster.url}/v1/sessions/{sid}").headers["x-request-id"],
                client.get(f"{cluster.url}/v1/sessions/{sid}/state", headers={"X-Session-Id": sid})
                .headers["x-request-id"]]
        if k < 3:
            rids.append(chat(client, cluster.url, chat_body(cluster.model, "hello", max_tokens=2),
                             headers={"X-Session-Id": sid}).headers["x-request-id"])
        seen[sid] = {served_by(cluster, rid) for rid in rids}
    assert all(len(s) == 1 for s in seen.values()), seen
    assert set().union(*seen.values()) == {"hope-a", "hope-b"}, seen


def test_sigkill_mid_stream(cluster: Cluster, client: httpx.Client) -> None:
    """The replica serving a stream is SIGKILLed after a few tokens: the client gets an error, the
    session stays at its last commit, and the other replica serves the next turn."""
    sid = uid("kill")
    headers = {"X-Session-Id": sid}
    r = chat(client, cluster.url, chat_body(cluster.model, "Remember: the key is under the mat."),
             headers=headers)
    victim = served_by(cluster, r.headers["x-request-id"])
    committed = session_meta(client, cluster.url, sid)
    blob = export(client, cluster.url, sid)

    def kill_after_three(i: int, event) -> None:
        if i == 3:
            cluster.replicas[victim].kill()

    body = chat_body(cluster.model, "Now tell me a very long story.", max_tokens=4000, ignore_eos=True)
    res = stream_chat(client, cluster.url, body, headers=headers, on_event=kill_after_three)
    assert not cluster.replicas[victim].alive
    assert not res.done and res.session is None, "a stream cut by SIGKILL must not look complete"
    assert res.error is not None or res.error_event is not None
    print(f"client saw: {len(res.events)} events, then {type(res.error).__name__}: {res.error}")

    try:
        # the store holds the last commit (read through nginx: the other replica answers)
        assert session_meta(client, cluster.url, sid) == committed
        assert export(client, cluster.url, sid) == blob
        # the next turn: nginx skips the dead replica; the dead one's lock lease (2 s) runs out
        started = time.monotonic()
        r = chat(client, cluster.url, chat_body(cluster.model, "Where is the key?"), headers=headers)
        assert served_by(cluster, r.headers["x-request-id"]) == cluster.other(victim)
        assert r.json()["session"]["version"] == committed["version"] + 1
        print(f"next turn served by {cluster.other(victim)} after {time.monotonic() - started:.2f} s")
    finally:
        cluster.restart(victim)


def tried(cluster: Cluster, nginx: Nginx, request_id: str) -> list[tuple[str, str]]:
    """The replicas nginx sent a request to, in order, each with the status it got from it."""
    def entry():
        return next((e for e in nginx.access_entries() if e["rid"] == request_id), None)

    wait_until(lambda: entry() is not None, 5, 0.02, "the access log line")
    e = entry()
    return [(cluster.replica_by_addr(addr.strip()), status.strip())
            for addr, status in zip(e["upstream"].split(","), e["ustatus"].split(","), strict=True)]


def test_frozen_replica(cluster: Cluster, client: httpx.Client, tmp_path: Path) -> None:
    """A SIGSTOPped replica still accepts connections (the kernel queues them), so nginx finds
    out only when a read times out. A read of one of its sessions times out after the short
    read timeout and is answered by the other replica; from then on nginx skips the frozen one,
    and turns of its sessions go straight to the other replica instead of waiting for it."""
    # an nginx of its own: the failure it records must not change where the other tests' requests go
    nginx = Nginx(tmp_path / "nginx", {name: r.port for name, r in cluster.replicas.items()}).start()
    try:
        _check_frozen_replica(cluster, client, nginx, victim="hope-a")
    finally:
        nginx.stop()


def _check_frozen_replica(cluster: Cluster, client: httpx.Client, nginx: Nginx, victim: str) -> None:
    on_victim: list[str] = []
    for k in range(64):  # consistent hashing: which sessions the victim serves
        sid = uid(f"frozen{k}")
        r = client.get(f"{nginx.base_url}/v1/models", headers={"X-Session-Id": sid})
        if tried(cluster, nginx, r.headers["x-request-id"]) == [(victim, "200")]:
            on_victim.append(sid)
        if len(on_victim) == 3:
            break
    read_sid, turn_sid, stream_sid = on_victim
    chat(client, nginx.base_url, chat_body(cluster.model, "Hello."), headers={"X-Session-Id": read_sid})
    committed = session_meta(client, nginx.base_url, read_sid)
    other = cluster.other(victim)

    frozen = cluster.replicas[victim]
    frozen.signal(signal.SIGSTOP)
    try:
        # far below the turns' read timeout (600 s), well above the reads' (15 s)
        with httpx.Client(timeout=httpx.Timeout(45, connect=5)) as c:
            started = time.monotonic()
            r = c.get(f"{nginx.base_url}/v1/sessions/{read_sid}")
            read_s = time.monotonic() - started
            assert r.status_code == 200 and r.json() == committed
            assert tried(cluster, nginx, r.headers["x-request-id"]) == [(victim, "504"), (other, "200")]

            started = time.monotonic()
            r = chat(c, nginx.base_url, chat_body(cluster.model, "Hello."), headers={"X-Session-Id": turn_sid})
            turn_s = time.monotonic() - started
            assert tried(cluster, nginx, r.headers["x-request-id"]) == [(other, "200")]
            res = stream_chat(c, nginx.base_url, chat_body(cluster.model, "Hello."),
                              headers={"X-Session-Id": stream_sid})
            assert res.done and res.error is None and res.session["version"] == 1
            assert tried(cluster, nginx, res.headers["x-request-id"]) == [(other, "200")]
        print(f"frozen replica: a read answered by the other replica after {read_s:.1f} s, "
              f"then a turn served there in {turn_s:.2f} s")
    finally:
        frozen.signal(signal.SIGCONT)
    frozen.wait_ready(timeout=30)


def test_sigterm_finishes_or_aborts_in_flight_requests(cluster: Cluster, client: httpx.Client) -> None:
    """SIGTERM (a rollout, a scale-down) with two streams in flight: uvicorn stops accepting and
    gives in-flight requests 5 s. The short one finishes and is committed; the long one is aborted
    and commits nothing; its session lock is given back, so the other replica continues at once."""
    name = "hope-a"
    target, other = cluster.replicas[name], cluster.replicas["hope-b"]
    short, long_ = uid("term-short"), uid("term-long")
    for sid in (short, long_):
        chat(client, target.base_url, chat_body(cluster.model, "First turn.", session_id=sid))
    before = {sid: (session_meta(client, other.base_url, sid), export(client, other.base_url, sid))
              for sid in (short, long_)}

    results: dict[str, StreamResult] = {}
    counts = {short: 0, long_: 0}

    def run(sid: str, max_tokens: int) -> None:
        def on_event(i, event) -> None:
            counts[sid] = i + 1

        with httpx.Client(timeout=60) as c:
            body = chat_body(cluster.model, "Go on.", session_id=sid, max_tokens=max_tokens, ignore_eos=True)
            results[sid] = stream_chat(c, target.base_url, body, on_event=on_event)

    threads = [threading.Thread(target=run, args=(short, 300)), threading.Thread(target=run, args=(long_, 4096))]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: min(counts.values()) >= 3, 30, 0.01, "both streams under way")
        assert short not in results, "the short stream ended before SIGTERM: the test proves nothing"
        target.signal(15)
        signalled = time.monotonic()
        for t in threads:
            t.join(timeout=60)
        # uvicorn shuts down, then re-raises the signal it caught: the exit status says SIGTERM
        assert target.proc.wait(timeout=30) in (0, -15)
        print(f"replica exited {time.monotonic() - signalled:.2f} s after SIGTERM")
    finally:
        for t in threads:
            t.join(timeout=60)

    # finished: the whole stream, committed
    done = results[short]
    assert done.done and done.error is None and done.session["version"] == before[short][0]["version"] + 1
    assert session_meta(client, other.base_url, short)["version"] == before[short][0]["version"] + 1
    # aborted: the client sees a cut stream, the store the last commit, and no lock is left behind
    cut = results[long_]
    assert not cut.done and cut.session is None
    assert (session_meta(client, other.base_url, long_), export(client, other.base_url, long_)) == before[long_]
    lock_key = f"{cluster.prefix}:{{default:{long_}}}:lock"
    assert not cluster.redis.client().exists(lock_key), "the aborted request kept its session lock"
    started = time.monotonic()
    r = chat(client, other.base_url, chat_body(cluster.model, "Again.", session_id=long_))
    assert r.json()["session"]["version"] == before[long_][0]["version"] + 1
    assert time.monotonic() - started < 1.5, "the next turn waited for a lock lease"
    cluster.restart(name)


def test_client_disconnect_through_nginx(cluster: Cluster, client: httpx.Client) -> None:
    """A client that leaves mid-stream: nginx closes the upstream connection, the replica stops
    generating at once and commits nothing."""
    sid = uid("leave")
    headers = {"X-Session-Id": sid}
    chat(client, cluster.url, chat_body(cluster.model, "Hello."), headers=headers)
    committed = session_meta(client, cluster.url, sid)
    body = chat_body(cluster.model, "Talk forever.", max_tokens=4000, ignore_eos=True, stream=True)
    with httpx.Client(timeout=30) as c, c.stream("POST", f"{cluster.url}/v1/chat/completions", json=body,
                                                 headers=headers) as r:
        for n, _ in enumerate(r.iter_lines()):
            if n >= 10:
                break  # leaving the block closes the connection
    left = time.monotonic()

    def running() -> float:
        return sum(metric(client, p.base_url, "hope_requests_running") for p in cluster.replicas.values())

    wait_until(lambda: running() == 0, 5, 0.05, "generation stopped")
    print(f"generation stopped {time.monotonic() - left:.2f} s after the client left")
    assert session_meta(client, cluster.url, sid) == committed


@pytest.fixture(autouse=True)
def _cluster_whole(cluster: Cluster):
    """Every test starts and ends with both replicas up."""
    yield
    for name, replica in cluster.replicas.items():
        if not replica.alive:
            cluster.restart(name)
