"""Every error status, in OpenAI's shape, and that a refused request changes nothing."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from hope_core.engine import Engine
from server.settings import DEFAULT_TENANT
from tests.server.support import Api, free_port, running_app

pytestmark = pytest.mark.anyio


def assert_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


def chat_body(api: Api, **extra) -> dict:
    return {"model": api.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}


async def test_400_bad_input(engine: Engine) -> None:
    async with running_app(engine, max_tokens_limit=64, max_prompt_tokens=512) as api:
        post = api.client.post
        r = await post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert_error(r, 400)
        assert_error(await post("/v1/chat/completions", json={"messages": []}), 400)
        assert_error(await post("/v1/chat/completions", json=chat_body(api, n=2)), 400, param="n")
        assert_error(await post("/v1/chat/completions", json=chat_body(api, temperature=5)), 400, param="temperature")
        assert_error(await post("/v1/chat/completions", json=chat_body(api, max_tokens=65)), 400, param="max_tokens",
                     code="max_tokens_too_large")
        assert_error(await post("/v1/chat/completions", json=chat_body(api, stop=[str(i) for i in range(17)])), 400,
                     param="stop")
        bad_role = chat_body(api, messages=[{"role": "tool", "content": "x"}])
        assert_error(await post("/v1/chat/completions", json=bad_role), 400)
        image = chat_body(api, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
        assert_error(await post("/v1/chat/completions", json=image), 400)
        for bad in ("../etc/passwd", "a b", "{acme:x}", "x" * 200, ".hidden"):
            assert_error(await post("/v1/chat/completions", json=chat_body(api, session_id=bad)), 400,
                         param="session_id", code="invalid_session_id")
        assert_error(await post("/v1/chat/completions", json=chat_body(api, max_completion_tokens=65)), 400,
                     param="max_completion_tokens", code="max_tokens_too_large")
        # OpenAI parameters this server does not implement: refused unless neutral
        for name, value in (("frequency_penalty", 0.5), ("presence_penalty", -1), ("logit_bias", {"1": 5}),
                            ("tools", [{"type": "function", "function": {"name": "f"}}]),
                            ("functions", [{"name": "f"}]), ("response_format", {"type": "json_object"}),
                            ("tool_choice", "required")):
            err = assert_error(await post("/v1/chat/completions", json=chat_body(api, **{name: value})), 400,
                               param=name)
            assert not err["message"].startswith(f"{name}: Value error"), err
        assert_error(await post("/v1/chat/completions", json=chat_body(api, top_logprobs=2)), 400,
                     param="top_logprobs")  # without logprobs: true
        assert_error(await post("/v1/chat/completions", json=chat_body(api, logprobs=True, top_logprobs=21)), 400,
                     param="top_logprobs")
        assert_error(await post("/v1/completions", json={"model": api.model, "prompt": "x", "logprobs": 6}), 400,
                     param="logprobs")
        for prompt in ([5, 1 << 20], [-1], [[1, 2], [3]], [], [True, False], [1, 2.5], [[1], "a"]):
            r = await post("/v1/completions", json={"model": api.model, "prompt": prompt, "session_id": "ids"})
            assert_error(r, 400, param="prompt")
        # one bad entry in a long list of ids is one error, found in one pass (a union of list
        # types used to report every element against every member, which took seconds)
        r = await post("/v1/completions", json={"model": api.model, "prompt": [1] * 200_000 + ["x"]})
        assert assert_error(r, 400, param="prompt")["message"].startswith("prompt: a prompt is a string")
        assert_error(await post("/tokenize", json={}), 400, param="messages")
        assert_error(await api.client.get("/v1/sessions/ids"), 404)  # nothing was absorbed
        for name, value in (("suffix", "end"), ("best_of", 3)):
            r = await post("/v1/completions", json={"model": api.model, "prompt": "x", name: value})
            assert_error(r, 400, param=name)
        assert_error(await post("/v1/completions", json={"model": api.model, "prompt": "word " * 600}), 400,
                     param="prompt", code="context_length_exceeded")
        # a text that cannot fit is refused before it is encoded (encoding holds the GIL)
        too_long = "x" * (512 * engine.tokenizer.max_token_bytes + 1)
        for path, body in (("/v1/completions", {"prompt": too_long}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": too_long}]})):
            err = assert_error(await post(path, json={"model": api.model, **body}), 400,
                               code="context_length_exceeded")
            assert "characters" in err["message"]
        # a union's member is not part of the parameter's name
        err = assert_error(await post("/v1/chat/completions", json=image), 400, param="messages.0.content.0.type")
        assert "'text'" in err["message"]
        assert_error(await post("/v1/chat/completions", json=chat_body(api, stop=5)), 400, param="stop")
        # a body that is no JSON object says so
        r = await post("/v1/chat/completions", content=b"model=x", headers={"content-type": "text/plain"})
        assert "JSON object" in assert_error(r, 400)["message"]
        assert "no body" in assert_error(await post("/v1/chat/completions"), 400)["message"]
        for bad in ("a\n", "a\r", ""):  # "$" of a Python regex matches before a final newline
            assert_error(await post("/v1/chat/completions", json=chat_body(api, session_id=bad)), 400,
                         param="session_id", code="invalid_session_id")
        # an empty id is an unset variable, not a wish for an ephemeral session that forgets
        r = await post("/v1/chat/completions", json=chat_body(api), headers={"X-Session-Id": ""})
        assert_error(r, 400, param="X-Session-Id", code="invalid_session_id")
        for role in ("user", "system"):  # only an assistant's message may have no content
            body = chat_body(api, messages=[{"role": role}])
            assert "needs content" in assert_error(await post("/v1/chat/completions", json=body), 400,
                                                   param="messages.0")["message"]
        r = await post("/v1/chat/completions", json=chat_body(api, session_id="a"), headers={"X-Session-Id": "b"})
        assert_error(r, 400, param="session_id")
        assert_error(await api.client.get("/v1/sessions/bad%20id"), 400, param="session_id")
        assert_error(await post("/v1/sessions/ok/fork", json={"new_id": "../x"}), 400, param="new_id")
        r = await post("/v1/completions", json={"model": api.model, "prompt": ["a", "b"], "session_id": "s"})
        assert_error(r, 400, param="prompt")
        assert_error(await post("/v1/completions", json={"model": api.model, "prompt": ["a", 5]}), 400, param="prompt")
        assert (await api.client.get("/v1/sessions")).json()["data"] == []  # nothing was created


async def test_401_without_or_with_a_wrong_key(engine: Engine) -> None:
    async with running_app(engine, api_keys="acme:secret") as api:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic secret"}):
            for method, path in (("GET", "/v1/models"), ("GET", "/v1/sessions"), ("POST", "/v1/chat/completions")):
                r = await api.client.request(method, path, headers=headers, json=chat_body(api))
                assert_error(r, 401)
                assert r.headers["WWW-Authenticate"] == "Bearer"
        # a malformed request without a key is refused for the key first: its errors say nothing
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = await api.client.post("/v1/chat/completions", content=b"{not json", headers=headers)
            assert_error(r, 401)
            for body in (b'{"model": "\xff"}', b"[" * 100_000 + b"]" * 100_000):  # not UTF-8; too deep
                r = await api.client.post("/v1/chat/completions", content=body, headers=headers)
                assert_error(r, 401)
            assert_error(await api.client.post("/v1/chat/completions", json={"messages": []}, headers=headers), 401)
        ok = await api.client.get("/v1/models", headers={"Authorization": "Bearer secret"})
        assert ok.status_code == 200
        assert (await api.client.get("/healthz")).status_code == 200  # probes need no key
        assert (await api.client.get("/metrics")).status_code == 200


async def test_404_unknown_model_session_route(engine: Engine) -> None:
    async with running_app(engine) as api:
        r = await api.client.post("/v1/chat/completions", json=chat_body(api, model="gpt-4"))
        assert_error(r, 404, param="model", code="model_not_found")
        r = await api.client.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"})
        assert_error(r, 404, param="model")
        assert_error(await api.client.get("/v1/models/gpt-4"), 404)
        assert_error(await api.client.get("/v1/sessions/missing"), 404)
        assert_error(await api.client.get("/v1/sessions/missing/state"), 404)
        assert_error(await api.client.delete("/v1/sessions/missing"), 404)
        assert_error(await api.client.get("/v1/nothing-here"), 404)


async def test_409_busy_session_with_reject_policy(engine: Engine) -> None:
    async with running_app(engine, busy_policy="reject") as api:
        await api.chat("first", session="busy")
        # another replica holds the session's lock
        store = api.app.state.ctx.store
        token = await store.acquire_lock(DEFAULT_TENANT, "busy", 30)
        r = await api.client.post("/v1/chat/completions", json=chat_body(api, session_id="busy"))
        assert_error(r, 409, code="session_busy")
        assert "x-should-retry" not in r.headers  # busy: a retry may well succeed
        await store.release_lock(DEFAULT_TENANT, "busy", token)
        # two requests of this replica at once: one runs, the other is refused
        slow = chat_body(api, session_id="busy", max_tokens=300, ignore_eos=True)
        first = asyncio.create_task(api.client.post("/v1/chat/completions", json=slow))
        await _wait_running(api, 1)
        assert_error(await api.client.post("/v1/chat/completions", json=chat_body(api, session_id="busy")), 409)
        assert (await first).status_code == 200
        assert (await api.session("busy"))["version"] == 2


async def test_409_after_waiting_too_long(engine: Engine) -> None:
    async with running_app(engine, busy_policy="wait", busy_timeout_s=0.3) as api:
        store = api.app.state.ctx.store
        token = await store.acquire_lock(DEFAULT_TENANT, "held", 30)
        r = await api.client.post("/v1/chat/completions", json=chat_body(api, session_id="held"))
        assert_error(r, 409, code="session_busy")
        await store.release_lock(DEFAULT_TENANT, "held", token)
        await api.session("held", expect=404)


async def test_409_state_of_another_checkpoint(engine: Engine, other_engine: Engine, tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    async with running_app(engine, url) as api:
        await api.chat("made by the first checkpoint", session="old")
    async with running_app(other_engine, url) as api:
        r = await api.client.post("/v1/chat/completions", json=chat_body(api, session_id="old"))
        assert_error(r, 409, code="session_incompatible")
        assert r.headers["x-should-retry"] == "false"  # OpenAI's SDKs would retry a 409 otherwise
        assert (await api.session("old"))["checkpoint"] == engine.fingerprint  # untouched, still listed


async def test_413_too_large(engine: Engine) -> None:
    async with running_app(engine, max_body_bytes=2048, max_prompt_tokens=20, max_state_bytes=4096) as api:
        big = chat_body(api, messages=[{"role": "user", "content": "x" * 4000}])
        assert_error(await api.client.post("/v1/chat/completions", json=big), 413, code="body_too_large")

        async def chunked():  # no Content-Length: counted while reading
            yield b'{"model": "hope", "messages": [{"role": "user", "content": "'
            for _ in range(10):
                yield b"y" * 500
            yield b'"}]}'

        r = await api.client.post("/v1/chat/completions", content=chunked(),
                                  headers={"content-type": "application/json"})
        assert_error(r, 413)
        long_prompt = chat_body(api, session_id="long", messages=[{"role": "user", "content": "word " * 50}])
        assert_error(await api.client.post("/v1/chat/completions", json=long_prompt), 400,
                     param="messages", code="context_length_exceeded")
        # a state bigger than max_state_bytes is neither imported nor stored
        state = engine.new_session().to_bytes()
        assert_error(await api.client.put("/v1/sessions/imp/state", content=state), 413)
        r = await api.client.post("/v1/chat/completions", json=chat_body(api, session_id="fits-not"))
        assert_error(r, 413, code="state_too_large")
        for sid in ("long", "imp", "fits-not"):
            await api.session(sid, expect=404)


async def test_429_overloaded(engine: Engine) -> None:
    async with running_app(engine, max_concurrent_requests=1, max_waiting_requests=0,
                           overload_retry_after_s=3) as api:
        slow = asyncio.create_task(api.client.post(
            "/v1/chat/completions", json=chat_body(api, session_id="s1", max_tokens=300, ignore_eos=True)))
        await _wait_running(api, 1)
        r = await api.client.post("/v1/chat/completions", json=chat_body(api, session_id="s2"))
        assert_error(r, 429, code="overloaded")
        assert r.headers["Retry-After"] == "3"
        assert (await slow).status_code == 200
        await api.session("s2", expect=404)


async def test_429_after_waiting_too_long_for_an_engine_slot(engine: Engine) -> None:
    """The queue for an engine slot is bounded in time as the one for a busy session is: a
    request is refused (429, and changes nothing) instead of waiting unseen behind long ones."""
    async with running_app(engine, max_concurrent_requests=1, busy_timeout_s=0.3, overload_retry_after_s=2) as api:
        slow = asyncio.create_task(api.client.post(
            "/v1/chat/completions", json=chat_body(api, session_id="s1", max_tokens=2000, ignore_eos=True)))
        await _wait_running(api, 1)
        for sid in ("s2", None):  # a stored session (its lock is given back) and an ephemeral one
            r = await api.client.post("/v1/chat/completions", json=chat_body(api, session_id=sid, stream=True))
            assert "0.3 s" in assert_error(r, 429, code="overloaded")["message"]
            assert r.headers["Retry-After"] == "2"
        assert api.app.state.ctx.sessions.admission.waiting == 0
        assert (await slow).status_code == 200
        await api.session("s2", expect=404)
        assert (await api.client.post("/v1/chat/completions", json=chat_body(api, session_id="s2"))).status_code == 200


async def test_429_after_waiting_too_long_for_a_row_of_the_batch(engine: Engine) -> None:
    """With more engine slots than batch rows, a non-streaming request (silent until it ends)
    waits for a row no longer than for a slot: 429, and nothing absorbed. A stream waits, with
    keep-alives, and runs once a row is free."""
    async with running_app(engine, max_concurrent_requests=3, max_batch_size=1, busy_timeout_s=0.3,
                           overload_retry_after_s=2) as api:
        slow = asyncio.create_task(api.client.post(
            "/v1/chat/completions", json=chat_body(api, session_id="s1", max_tokens=300, ignore_eos=True, stream=True)))
        await _wait_running(api, 1)
        patient = asyncio.create_task(api.client.post(
            "/v1/completions", json={"model": api.model, "prompt": "later", "session_id": "s3", "max_tokens": 2,
                                     "stream": True}))
        for path, body in (("/v1/chat/completions", chat_body(api, session_id="s2")),
                           ("/v1/completions", {"model": api.model, "prompt": "hi", "session_id": "s2"})):
            r = await api.client.post(path, json=body)
            assert "row of the batch came free in 0.3 s" in assert_error(r, 429, code="overloaded")["message"]
            assert r.headers["Retry-After"] == "2"
        await api.session("s2", expect=404)
        assert (await slow).status_code == 200
        assert "data: [DONE]" in (await patient).text
        assert (await api.session("s3"))["version"] == 1


async def test_several_prompts_are_refused_where_they_cannot_run(engine: Engine) -> None:
    async with running_app(engine, max_concurrent_requests=3) as api:
        post = api.client.post
        err = assert_error(await post("/v1/completions", json={"model": api.model, "prompt": ["a", "b"],
                                                               "session_id": "s"}), 400, param="prompt")
        assert "one prompt per request" in err["message"]
        err = assert_error(await post("/v1/completions", json={"model": api.model, "prompt": ["a"] * 4}),
                           400, param="prompt")
        assert "at most 3" in err["message"] or "is 3" in err["message"]
        assert_error(await post("/v1/completions", json={"model": api.model, "prompt": ["a", ""], "max_tokens": 0}),
                     400, param="prompt")
        assert (await api.client.get("/v1/sessions")).json()["data"] == []


async def test_requests_of_several_prompts_share_the_slots_without_deadlock(engine: Engine) -> None:
    """Two requests that each need every engine slot take them one at a time: each holding some
    and waiting for the rest would deadlock (then 429 after the busy timeout). They take turns."""
    async with running_app(engine, max_concurrent_requests=3, busy_timeout_s=30) as api:
        body = {"model": api.model, "prompt": ["a", "b", "c"], "max_tokens": 40, "ignore_eos": True}
        answers = await asyncio.gather(*(api.client.post("/v1/completions", json=body) for _ in range(3)))
        assert [r.status_code for r in answers] == [200, 200, 200], [r.text for r in answers]
        assert all(len(r.json()["choices"]) == 3 for r in answers)
        assert api.app.state.ctx.sessions.admission.running == 0


async def test_503_store_unreachable(engine: Engine) -> None:
    async with running_app(engine, store=f"redis://127.0.0.1:{free_port()}/0", overload_retry_after_s=2) as api:
        r = await api.client.post("/v1/chat/completions", json=chat_body(api, session_id="s"))
        assert_error(r, 503, code="store_unavailable")
        assert r.headers["Retry-After"] == "2"
        assert_error(await api.client.get("/v1/sessions"), 503)
        ready = await api.client.get("/readyz")
        assert ready.status_code == 503 and "store" in ready.json()["detail"]
        assert (await api.client.get("/healthz")).status_code == 200
        # an ephemeral session needs no store
        assert (await api.client.post("/v1/chat/completions", json=chat_body(api))).status_code == 200


async def _wait_running(api: Api, n: int, timeout: float = 10) -> None:
    ctx = api.app.state.ctx
    for _ in range(int(timeout / 0.01)):
        if ctx.sessions.admission.running == n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the request never started")
