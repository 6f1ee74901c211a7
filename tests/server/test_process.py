"""Real server processes: the openai SDK streaming, a client that disconnects mid-stream, and a
server killed with SIGKILL whose sessions continue after a restart (SQLite and Redis)."""

from __future__ import annotations

import signal
import sqlite3
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.support import ServerProcess


def metric(base_url: str, name: str, labels: dict[str, str] | None = None) -> float:
    text = httpx.get(f"{base_url}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and (labels is None or all(sample.labels.get(k) == v for k, v in labels.items())):
                return sample.value
    raise KeyError(name)


def session(base_url: str, sid: str) -> dict:
    r = httpx.get(f"{base_url}/v1/sessions/{sid}")
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture
def sqlite_server(start_server, tmp_path) -> ServerProcess:
    # keep-alive comments between most events: clients (the SDK) must skip them, and uvicorn
    # refuses any that came after the stream's end
    return start_server(f"sqlite:///{tmp_path}/sessions.db", HOPE_SSE_KEEPALIVE_S="0.002")


def test_openai_sdk_streams(sqlite_server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{sqlite_server.base_url}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    started = time.perf_counter()
    arrivals, chunks = [], []
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Tell me a story."}], stream=True, max_tokens=48,
        temperature=0, stream_options={"include_usage": True}, extra_body={"session_id": "sdk", "ignore_eos": True})
    for chunk in stream:
        chunks.append(chunk)
        arrivals.append(time.perf_counter() - started)
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 48
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    # tokens went out as they were made: the first arrived well before the last
    assert arrivals[1] < arrivals[-1] - 0.05
    assert session(sqlite_server.base_url, "sdk")["version"] == 1

    # the SDK's non-streaming call continues the same session; the SDK's history is de-duplicated
    reply = client.chat.completions.create(
        model=model, max_tokens=8, temperature=0, extra_body={"session_id": "sdk"},
        messages=[{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": text},
                  {"role": "user", "content": "And then?"}])
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.model_extra["session"]["resent_messages"] == 2
    assert session(sqlite_server.base_url, "sdk")["version"] == 2

    completion = client.completions.create(model="hope", prompt="Once", max_tokens=4, temperature=0)
    assert completion.choices[0].text is not None

    # alternatives, in the SDK's own types
    reply = client.chat.completions.create(model=model, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3,
                                           messages=[{"role": "user", "content": "Hi"}], extra_body={"learn": False})
    content = reply.choices[0].logprobs.content
    assert content and all(len(c.top_logprobs) == 3 and c.top_logprobs[0].token == c.token for c in content)
    scored = client.completions.create(model="hope", prompt=[[1, 2, 3]], max_tokens=0, echo=True, logprobs=2)
    assert len(scored.choices[0].logprobs.top_logprobs) == 3
    assert all(2 <= len(top) <= 3 for top in scored.choices[0].logprobs.top_logprobs)


def test_disconnect_mid_stream_commits_nothing(sqlite_server: ServerProcess) -> None:
    base = sqlite_server.base_url
    model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
    httpx.post(f"{base}/v1/chat/completions", timeout=30,
               json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                     "session_id": "dc"}).raise_for_status()
    before = session(base, "dc")
    disconnects = metric(base, "hope_request_failure_total", {"reason": "disconnected"}) \
        if "disconnected" in httpx.get(f"{base}/metrics").text else 0.0
    generated = metric(base, "hope_generation_tokens_total")

    body = {"model": model, "messages": [{"role": "user", "content": "go on forever"}], "max_tokens": 4000,
            "ignore_eos": True, "stream": True, "session_id": "dc"}
    with httpx.Client(timeout=30) as client, client.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                seen += 1
            if seen >= 5:
                break  # leaving the block closes the connection mid-stream
    left = time.perf_counter()
    # generation stops at once: the running gauge drops long before 4000 tokens could be made
    while metric(base, "hope_requests_running") > 0:
        assert time.perf_counter() - left < 5, "generation kept running after the client left"
        time.sleep(0.05)
    after = session(base, "dc")
    assert (after["version"], after["tokens_absorbed"]) == (before["version"], before["tokens_absorbed"])
    assert metric(base, "hope_request_failure_total", {"reason": "disconnected"}) == disconnects + 1
    assert metric(base, "hope_generation_tokens_total") >= generated + 4  # the tokens it streamed count
    # and the session is free again: the next request is served at once
    r = httpx.post(f"{base}/v1/chat/completions", timeout=30,
                   json={"model": model, "messages": [{"role": "user", "content": "still there?"}],
                         "max_tokens": 4, "session_id": "dc"})
    assert r.status_code == 200 and r.json()["session"]["version"] == before["version"] + 1


def test_disconnect_during_a_non_streaming_request(sqlite_server: ServerProcess) -> None:
    base = sqlite_server.base_url
    body = {"model": "hope", "messages": [{"role": "user", "content": "a long answer please"}],
            "max_tokens": 4000, "ignore_eos": True, "session_id": "dc2"}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{base}/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=1.0))
    left = time.perf_counter()
    while metric(base, "hope_requests_running") > 0:
        assert time.perf_counter() - left < 5, "generation kept running after the client left"
        time.sleep(0.05)
    assert httpx.get(f"{base}/v1/sessions/dc2").status_code == 404  # nothing was committed


def test_a_client_that_leaves_while_queued_gives_its_place_back(start_server, tmp_path) -> None:
    """One engine slot, one waiting place: a request queued behind a long one whose client gives
    up must leave the queue at once (not hold its place, turning the next client away with 429,
    and count as waiting), and one queued behind a busy session likewise."""
    server = start_server(f"sqlite:///{tmp_path}/sessions.db", HOPE_MAX_CONCURRENT_REQUESTS="1",
                          HOPE_MAX_WAITING_REQUESTS="1")
    base = server.base_url
    long = {"model": "hope", "messages": [{"role": "user", "content": "a long answer"}], "max_tokens": 4000,
            "ignore_eos": True, "stream": True, "session_id": "long"}
    short = {"model": "hope", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with httpx.Client(timeout=30) as client, client.stream("POST", f"{base}/v1/chat/completions", json=long) as r:
        lines = r.iter_lines()  # kept: a line iterator that is dropped closes the response
        next(line for line in lines if '"content"' in line)  # the long one holds the slot
        for queued in (short | {"session_id": "other"}, short | {"session_id": "long"}):  # for a slot; for a session
            with pytest.raises(httpx.ReadTimeout):  # the client gives up while queued
                httpx.post(f"{base}/v1/chat/completions", json=queued, timeout=httpx.Timeout(30, read=0.5))
            left = time.perf_counter()
            while metric(base, "hope_requests_waiting") > 0:
                assert time.perf_counter() - left < 5, "a departed client kept its place in the queue"
                time.sleep(0.05)
        # its place is free: the next client queues (not 429), and runs once the slot is
        answers: list[httpx.Response] = []
        later = threading.Thread(target=lambda: answers.append(httpx.post(
            f"{base}/v1/chat/completions", json=short | {"session_id": "x"}, timeout=60)))
        later.start()
        queued_at = time.perf_counter()
        while metric(base, "hope_requests_waiting") < 1:
            assert time.perf_counter() - queued_at < 5 and later.is_alive(), answers and answers[0].text
            time.sleep(0.05)
    later.join(timeout=60)  # leaving the block cut the long stream: the slot is free
    assert answers[0].status_code == 200 and answers[0].json()["session"]["version"] == 1
    assert httpx.get(f"{base}/v1/sessions/other").status_code == 404  # the departed requests did nothing


def test_a_request_cut_by_shutdown_is_answered_in_openais_format(start_server, tmp_path) -> None:
    """SIGTERM: a request that outlives the graceful period (5 s) is cancelled; before anything
    was sent it gets 503 `shutting_down` with Retry-After (not uvicorn's plain-text 500), and
    nothing is stored."""
    server = start_server(f"sqlite:///{tmp_path}/sessions.db", HOPE_MAX_TOKENS_LIMIT="100000")
    body = {"model": "hope", "messages": [{"role": "user", "content": "a very long answer"}], "max_tokens": 100000,
            "ignore_eos": True, "session_id": "cut"}
    answers: list[httpx.Response] = []
    request = threading.Thread(target=lambda: answers.append(
        httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60)))
    request.start()
    started = time.perf_counter()
    while metric(server.base_url, "hope_requests_running") < 1:
        assert time.perf_counter() - started < 10
        time.sleep(0.05)
    server.proc.send_signal(signal.SIGTERM)
    request.join(timeout=60)
    r = answers[0]
    assert r.status_code == 503 and r.headers["content-type"] == "application/json", r.text
    assert r.json()["error"]["code"] == "shutting_down" and int(r.headers["retry-after"]) >= 1
    assert server.proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
    with sqlite3.connect(tmp_path / "sessions.db") as db:
        assert db.execute("SELECT count(*) FROM sessions WHERE session_id = 'cut'").fetchone()[0] == 0


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_sigkill_and_restart_continue_from_last_commit(start_server, tmp_path, request, store: str) -> None:
    url = f"sqlite:///{tmp_path}/sessions.db" if store == "sqlite" else request.getfixturevalue("redis_store_url")
    env = {"HOPE_LOCK_TTL_S": "1"}  # a killed server's lock must not outlive the test for long
    first = start_server(url, **env)
    model = httpx.get(f"{first.base_url}/v1/models").json()["data"][0]["id"]

    def turn(server: ServerProcess, text: str, **extra) -> dict:
        r = httpx.post(f"{server.base_url}/v1/chat/completions", timeout=60,
                       json={"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 6,
                             "temperature": 0, "session_id": "durable", **extra})
        assert r.status_code == 200, r.text
        return r.json()

    turn(first, "first")
    turn(first, "second")
    committed = session(first.base_url, "durable")
    state = httpx.get(f"{first.base_url}/v1/sessions/durable/state").content

    # kill it while a third turn is being generated: that turn was never committed
    body = {"model": model, "messages": [{"role": "user", "content": "third"}], "max_tokens": 4000,
            "ignore_eos": True, "stream": True, "session_id": "durable"}
    with httpx.Client(timeout=30) as client, client.stream("POST", f"{first.base_url}/v1/chat/completions",
                                                            json=body) as r:
        for line in r.iter_lines():
            if '"content"' in line:
                first.kill()
                break

    second = start_server(url, **env)
    assert session(second.base_url, "durable") == committed
    assert httpx.get(f"{second.base_url}/v1/sessions/durable/state").content == state
    out = turn(second, "third, again")  # waits out the dead server's lock lease, then continues
    assert out["session"]["version"] == committed["version"] + 1
    assert out["session"]["tokens_absorbed"] > committed["tokens_absorbed"]


def test_a_500_keeps_the_connection_usable(tiny_checkpoint, tmp_path) -> None:
    """An unexpected error (here: a Redis user not allowed a command the commit script runs) is a
    500 in OpenAI's format on a connection that stays open: nginx keeps its upstream connections
    alive, and one dropped after an unannounced close turns the next client's POST into a 502."""
    import redis

    from tests.server.support import own_redis

    with own_redis(tmp_path) as (url, _):
        admin = redis.Redis.from_url(url)
        admin.execute_command("ACL", "SETUSER", "limited", "on", ">pw", "~*", "+@all", "-hmget")
        admin.close()
        server = ServerProcess(tiny_checkpoint, url.replace("redis://", "redis://limited:pw@"),
                               tmp_path / "server.log")
        try:
            with httpx.Client(base_url=server.base_url, timeout=30) as client:
                body = {"model": "hope", "session_id": "s", "max_tokens": 2,
                        "messages": [{"role": "user", "content": "hi"}]}
                failed = client.post("/v1/chat/completions", json=body)
                assert failed.status_code == 500 and failed.json()["error"]["code"] == "internal_error"
                # the same connection, at once: a 400 for a bad body, not a reset
                again = client.post("/v1/chat/completions", json={"model": "hope", "messages": []})
                assert again.status_code == 400
                assert failed.extensions["network_stream"] is again.extensions["network_stream"]
        finally:
            server.stop()
