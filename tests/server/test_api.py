"""The API in-process (httpx against the app): sessions that continue, dedup, learn=false,
ephemeral sessions, completions scoring, session resources and tenant isolation."""

from __future__ import annotations

import json
import logging

import httpx
import pytest
import torch
from safetensors.torch import load

from hope_core.engine import Engine
from hope_core.sampling import SamplingParams
from hope_core.tokenizer import SPECIAL_TOKENS
from tests.server.support import running_app

pytestmark = pytest.mark.anyio


def stop_ids(engine: Engine) -> list[int]:
    return [engine.tokenizer.end_id, engine.tokenizer.eot_id]


def reference_turns(engine: Engine, user_messages: list[str], max_tokens: int = 8) -> list[str]:
    """The same conversation straight on the engine, in one process, no store: what the server
    must reproduce if it really continues the session from its stored state."""
    tok, session, replies = engine.tokenizer, engine.new_session(), []
    params = SamplingParams(max_tokens=max_tokens, temperature=0, stop_token_ids=stop_ids(engine))
    for text in user_messages:
        generation = engine.generate(session, [*tok.encode_message("user", text), tok.role_ids["assistant"]], params)
        list(generation)
        result = generation.result
        if result.token_ids[-1] not in stop_ids(engine):
            engine.absorb(session, [tok.end_id])  # the server closes an unfinished turn
        replies.append(result.text)
    return replies


@pytest.mark.parametrize("store", ["memory", "sqlite"])
async def test_session_continues_across_requests(engine: Engine, tmp_path, store: str) -> None:
    url = "memory://" if store == "memory" else f"sqlite:///{tmp_path}/s.db"
    turns = ["Hello, who are you?", "Tell me about the sea.", "And the mountains?"]
    expected = reference_turns(engine, turns)
    # a cache of size 0: every request reads and decodes the stored state
    async with running_app(engine, url, session_cache_size=0) as api:
        absorbed = 1  # BOS
        for i, text in enumerate(turns, start=1):
            out = await api.chat(text, session="conv")
            assert out["choices"][0]["message"]["content"] == expected[i - 1]
            usage, finish = out["usage"], out["choices"][0]["finish_reason"]
            absorbed += usage["prompt_tokens"] + usage["completion_tokens"] + (finish == "length")
            assert out["session"] == {"id": "conv", "version": i, "tokens_absorbed": absorbed,
                                      "resent_messages": 0, "learned": True}
        meta = await api.session("conv")
        assert meta["version"] == 3 and meta["tokens_absorbed"] == absorbed and meta["messages_logged"] == 6
        assert meta["checkpoint"] == engine.fingerprint and meta["state_bytes"] > 0
        assert sum(meta["updates"].values()) > 0


async def test_resent_history_equals_new_message_only(engine: Engine) -> None:
    """An OpenAI-style client (whole history every turn) and one that sends only its new message
    end in the same state: every message is absorbed once."""
    async with running_app(engine) as api:
        history = [{"role": "system", "content": "You are terse."}]
        for i, text in enumerate(["one", "two", "three"]):
            history.append({"role": "user", "content": text})
            full = await api.chat(history, session="resend")
            assert full["session"]["resent_messages"] == (0 if i == 0 else len(history) - 1)
            history.append(full["choices"][0]["message"])
            new_only = [{"role": "system", "content": "You are terse."}] if i == 0 else []
            short = await api.chat([*new_only, {"role": "user", "content": text}], session="single")
            assert short["session"]["resent_messages"] == 0
            assert short["choices"][0]["message"] == full["choices"][0]["message"]
            assert short["usage"] == full["usage"]
        a, b = await api.session("resend"), await api.session("single")
        assert a["tokens_absorbed"] == b["tokens_absorbed"] and a["version"] == b["version"] == 3
        state_a = load((await api.client.get("/v1/sessions/resend/state")).content)
        state_b = load((await api.client.get("/v1/sessions/single/state")).content)
        assert state_a.keys() == state_b.keys()
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


async def test_a_retried_or_edited_turn_absorbs_only_what_is_new(engine: Engine) -> None:
    """A client that sends a stored turn again (a retry, a regenerate) or edits its last message
    re-sends the conversation without the logged reply: the earlier messages are not absorbed
    a second time."""
    async with running_app(engine) as api:
        history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "one"}]
        history.append((await api.chat(history, session="retry"))["choices"][0]["message"])
        history.append({"role": "user", "content": "two"})
        first = await api.chat(history, session="retry")
        before = (await api.session("retry"))["tokens_absorbed"]
        again = await api.chat(history, session="retry")  # the same request again
        assert again["session"]["resent_messages"] == 4
        assert again["usage"]["prompt_tokens"] < first["usage"]["prompt_tokens"]
        reply_and_prompt = again["usage"]["prompt_tokens"] + again["usage"]["completion_tokens"] + 1  # <|end|>
        assert (await api.session("retry"))["tokens_absorbed"] - before <= reply_and_prompt
        edited = [*history[:3], {"role": "user", "content": "two, edited"}]
        out = await api.chat(edited, session="retry")  # after the regenerate: two replies logged
        assert out["session"]["resent_messages"] == 3


async def test_learn_false_changes_nothing(engine: Engine) -> None:
    async with running_app(engine) as api:
        await api.chat("remember this", session="ro")
        before = (await api.client.get("/v1/sessions/ro/state")).content
        out = await api.chat("what did I say?", session="ro", learn=False)
        assert out["session"]["learned"] is False and out["session"]["version"] == 1
        assert (await api.client.get("/v1/sessions/ro/state")).content == before
        assert (await api.session("ro"))["version"] == 1
        await api.chat("read only", session="never-made", learn=False)  # no session: none is created
        await api.session("never-made", expect=404)


async def test_ephemeral_sessions_are_never_stored(engine: Engine) -> None:
    async with running_app(engine) as api:
        out = await api.chat("no session here")
        assert out["session"]["id"] is None and out["session"]["version"] is None
        assert out["session"]["tokens_absorbed"] > 1  # it learned within the request
        assert (await api.client.get("/v1/sessions")).json()["data"] == []


async def test_session_named_by_header_or_user(engine: Engine) -> None:
    async with running_app(engine) as api:
        await api.chat("hi", headers={"X-Session-Id": "by-header"})
        await api.chat("hi", user="alice@example.com")
        await api.chat("hi", session="same", headers={"X-Session-Id": "same"})
        ids = [s["id"] for s in (await api.client.get("/v1/sessions")).json()["data"]]
        assert ids == ["alice@example.com", "by-header", "same"]
        await api.chat("hi", session="a", headers={"X-Session-Id": "b"}, expect=400)
        # OpenAI's `user` is any string: one that is no session id names a session by its hash
        first = await api.chat("hi", user="John Smith")
        again = await api.chat("hi again", user="John Smith")
        other = await api.chat("hi", user="John Smith\n")
        sid = first["session"]["id"]
        assert sid.startswith("user-") and len(sid) == 5 + 32 and again["session"]["id"] == sid
        assert again["session"]["version"] == 2 and other["session"]["id"] not in (sid, "John Smith\n")
        # a user named like that hash gets a session of its own, not John Smith's
        mimic = await api.chat("hi", user=sid)
        assert mimic["session"]["id"] not in (sid, None) and mimic["session"]["version"] == 1


async def test_null_parameters_are_their_defaults(engine: Engine) -> None:
    async with running_app(engine) as api:
        nulls = dict(n=None, stream=None, logprobs=None, top_k=None, temperature=None, top_p=None, seed=None,
                     stop=None, stream_options=None, learn=None, ignore_eos=None, max_completion_tokens=None)
        out = await api.chat("hi", session="nulls", max_tokens=None, **nulls)
        assert out["object"] == "chat.completion" and out["choices"][0]["logprobs"] is None
        assert out["session"]["version"] == 1  # learn: null is learn: true
        assert out["system_fingerprint"].startswith("fp_")
        r = await api.client.post("/v1/chat/completions", json={
            "model": api.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": None, "include_surprise": None}})
        assert r.status_code == 200 and "[DONE]" in r.text and '"usage"' not in r.text, r.text
        greedy = await api.chat("hi", top_p=0, temperature=0.9, max_tokens=5)  # OpenAI's range includes 0
        assert greedy["choices"] == (await api.chat("hi", temperature=0, max_tokens=5))["choices"]
        body = {"model": api.model, "prompt": "Once", "max_tokens": None, "echo": None, "logprobs": None,
                "temperature": 0, "ignore_eos": True}
        r = await api.client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 16  # OpenAI's default, as when left out


async def test_default_max_tokens_is_capped_by_the_limit(engine: Engine) -> None:
    async with running_app(engine, max_tokens_limit=6) as api:  # the default (256) is above it
        out = await api.chat("hi", max_tokens=None, ignore_eos=True)
        assert out["usage"]["completion_tokens"] == 6
        for body in ({}, {"max_tokens": None}):  # completions' default (OpenAI's 16) too
            r = await api.client.post("/v1/completions", json={"model": api.model, "prompt": "Once",
                                                               "ignore_eos": True, **body})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6, r.text


async def test_a_huge_top_k_is_no_limit(engine: Engine) -> None:
    async with running_app(engine) as api:
        huge = await api.chat("hi", session="k1", top_k=10**30, temperature=0.8, seed=3, max_tokens=6)
        none = await api.chat("hi", session="k2", top_k=0, temperature=0.8, seed=3, max_tokens=6)
        assert huge["choices"] == none["choices"]


async def test_content_parts_and_developer_role(engine: Engine) -> None:
    async with running_app(engine) as api:
        parts = [{"role": "developer", "content": "Be brief."},
                 {"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]}]
        a = await api.chat(parts, session="parts")
        b = await api.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}],
                           session="plain")
        assert a["choices"] == b["choices"]


async def test_chat_logprobs(engine: Engine) -> None:
    async with running_app(engine) as api:
        out = await api.chat("hi", logprobs=True, max_tokens=5)
        content = out["choices"][0]["logprobs"]["content"]
        assert len(content) == out["usage"]["completion_tokens"]
        assert all(c["logprob"] <= 0 and isinstance(c["bytes"], list) for c in content)


async def test_streaming_chat_format(engine: Engine) -> None:
    async with running_app(engine) as api:
        body = {"model": api.model, "messages": [{"role": "user", "content": "stream please"}], "max_tokens": 12,
                "temperature": 0, "stream": True, "session_id": "st",
                "stream_options": {"include_usage": True, "include_surprise": True}}
        r = await api.client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.text.split("\n\n") if line]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        prompt_loss = chunks[0]["surprise"]["loss"]
        assert len(prompt_loss) == chunks[-1]["usage"]["prompt_tokens"] and all(x > 0 for x in prompt_loss)
        finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        assert len(finals) == 1 and finals[0]["session"]["version"] == 1
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
        token_losses = [x for c in chunks[1:-1] for x in c.get("surprise", {}).get("loss", [])]
        assert len(token_losses) == chunks[-1]["usage"]["completion_tokens"]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        plain = await api.chat("stream please", max_tokens=12)  # ephemeral, same greedy reply
        assert text == plain["choices"][0]["message"]["content"]


def _stream_chunks(r: httpx.Response) -> list[dict]:
    events = [line[len("data: "):] for line in r.text.split("\n\n") if line and not line.startswith(":")]
    assert r.status_code == 200 and events[-1] == "[DONE]", r.text
    return [json.loads(e) for e in events[:-1]]


async def test_a_quiet_stream_sends_comments_that_change_nothing_else(engine: Engine) -> None:
    """`HOPE_SSE_KEEPALIVE_S`: an SSE comment whenever the stream was quiet that long (here a
    millisecond: between most events); the events are those of a stream without them."""
    body = {"messages": [{"role": "user", "content": "word " * 300}], "max_tokens": 12, "temperature": 0,
            "stream": True, "learn": False, "ignore_eos": True}
    texts = []
    for keepalive in (0.001, 0):
        async with running_app(engine, sse_keepalive_s=keepalive) as api:
            r = await api.client.post("/v1/chat/completions", json={"model": api.model, **body})
            texts.append(r.text)
    quiet, plain = texts
    assert ": keep-alive\n\n" in quiet and ": keep-alive" not in plain
    assert quiet.startswith(": keep-alive") and quiet.endswith("data: [DONE]\n\n")  # (while the prompt is read)

    def contents(text: str) -> list:
        return [c["choices"][0] for c in map(json.loads, (e[len("data: "):] for e in text.split("\n\n")
                                                          if e.startswith("data: {")))
                if c["choices"]]
    assert contents(quiet) == contents(plain)


async def test_a_stream_that_ends_on_a_stop_token_lists_its_logprob(engine: Engine) -> None:
    """The stop token has no text, so no chunk with text carries it: the final chunk must."""
    async with running_app(engine) as api:
        body = {"model": api.model, "messages": [{"role": "user", "content": "Once"}], "max_tokens": 48,
                "temperature": 1.0, "seed": 74, "learn": False, "logprobs": True}  # a seed that ends on one
        plain = (await api.client.post("/v1/chat/completions", json=body)).json()
        assert plain["choices"][0]["finish_reason"] == "stop", "this seed no longer ends on a stop token"
        chunks = _stream_chunks(await api.client.post("/v1/chat/completions", json=body | {"stream": True}))
        streamed = [x for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
                    for x in c["choices"][0]["logprobs"]["content"]]
        assert streamed == plain["choices"][0]["logprobs"]["content"]
        assert len(streamed) == plain["usage"]["completion_tokens"]


async def test_streamed_logprobs_match_the_whole_answer_around_stop_strings(engine: Engine) -> None:
    """Text held back for a possible stop string arrives later than its tokens: the streamed
    text offsets must still be the tokens' own, and tokens whose text a stop string cut must
    still be listed, as in the answer that is not streamed."""
    async with running_app(engine) as api:
        base = {"model": api.model, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0,
                "logprobs": 0, "ignore_eos": True, "learn": False}
        whole = (await api.client.post("/v1/completions", json=base)).json()["choices"][0]
        text = whole["text"]
        assert len(text) >= 6, text
        for stop in ("never-in-the-text", text[len(text) // 2:len(text) // 2 + 3]):
            for echo in (False, True):
                body = base | {"stop": [stop], "echo": echo}
                plain = (await api.client.post("/v1/completions", json=body)).json()
                chunks = _stream_chunks(await api.client.post("/v1/completions", json=body | {"stream": True}))
                streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
                for key in ("tokens", "token_logprobs", "text_offset"):
                    assert [x for lp in streamed for x in lp[key]] == plain["choices"][0]["logprobs"][key], (stop, key)
                assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == plain["choices"][0]["text"]
        chat = {"model": api.model, "messages": [{"role": "user", "content": "Once upon a time"}], "max_tokens": 12,
                "temperature": 0, "logprobs": True, "ignore_eos": True, "learn": False}
        reply = (await api.client.post("/v1/chat/completions", json=chat)).json()["choices"][0]["message"]["content"]
        assert len(reply) >= 6, reply
        body = chat | {"stop": [reply[len(reply) // 2:len(reply) // 2 + 3]]}
        plain = (await api.client.post("/v1/chat/completions", json=body)).json()
        chunks = _stream_chunks(await api.client.post("/v1/chat/completions", json=body | {"stream": True}))
        streamed = [x for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
                    for x in c["choices"][0]["logprobs"]["content"]]
        assert streamed == plain["choices"][0]["logprobs"]["content"]
        assert len(streamed) == plain["usage"]["completion_tokens"]
        # and each chunk carries the tokens whose text it completes (the last one: those cut):
        # after every chunk, the tokens sent so far spell the text sent so far, up to a part of
        # the next token
        if reply.isascii():
            text, count = "", 0
            for c in chunks:
                if not c["choices"] or c["choices"][0]["finish_reason"] is not None:
                    continue
                text += c["choices"][0]["delta"].get("content") or ""
                count += len((c["choices"][0]["logprobs"] or {}).get("content") or [])
                spelled = "".join(x["token"] for x in streamed[:count])
                assert text.startswith(spelled) and (spelled + "".join(
                    x["token"] for x in streamed[count:count + 1])).startswith(text), (text, spelled)


async def test_completions_score_only(engine: Engine) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    tok = engine.tokenizer
    ids = tok.encode(text)
    expected = engine.absorb(engine.new_session(), ids, learn=True).logprobs
    async with running_app(engine) as api:
        r = await api.client.post("/v1/completions", json={"model": api.model, "prompt": text, "max_tokens": 0,
                                                           "echo": True, "logprobs": 0})
        out = r.json()
        choice = out["choices"][0]
        assert choice["text"] == text and choice["finish_reason"] == "length"
        lp = choice["logprobs"]
        assert lp["tokens"] == [tok.decode([i]) for i in ids] and "".join(lp["tokens"]) == text
        assert lp["token_logprobs"] == pytest.approx(expected, abs=1e-5)
        # logprobs 0: each map holds the token itself only
        assert lp["top_logprobs"] == [{tok.decode([i]): v} for i, v in zip(ids, lp["token_logprobs"])]
        assert lp["text_offset"] == [len(tok.decode(ids[:i])) for i in range(len(ids))]
        assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}


async def test_completions_alternatives_are_the_most_likely_tokens(engine: Engine) -> None:
    """`logprobs: k` with echo: at every prompt and generated token, the map holds the k most
    likely tokens and the token itself (as lm-evaluation-harness reads it: a greedy token's
    log-probability is the map's largest), streamed or not; a prompt of token ids is the text's."""
    tok = engine.tokenizer
    text = "The quick brown fox jumps over the lazy dog."
    ids = tok.encode(text)
    scored = engine.absorb(engine.new_session(), ids, alternatives=3)
    async with running_app(engine) as api:
        body = {"model": api.model, "prompt": text, "max_tokens": 5, "temperature": 0, "echo": True,
                "logprobs": 3, "ignore_eos": True, "learn": False}
        whole = (await api.client.post("/v1/completions", json=body)).json()
        lp = whole["choices"][0]["logprobs"]
        n = len(ids) + 5
        assert len(lp["top_logprobs"]) == len(lp["tokens"]) == n
        for i, (token, value, top) in enumerate(zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"])):
            assert 3 <= len(top) <= 4 and top[token] == value, (i, top)
            if i >= len(ids):  # generated greedily: the most likely token
                assert value == max(top.values())
        for want, top in zip(scored.top, lp["top_logprobs"]):
            expect = {tok.decode([t]): v for t, v in reversed(want)}  # (a shared text: the likelier one)
            assert {k: top[k] for k in expect} == pytest.approx(expect, abs=1e-5)
        by_ids = (await api.client.post("/v1/completions", json={**body, "prompt": ids})).json()
        assert by_ids["choices"][0]["text"] == whole["choices"][0]["text"]
        assert by_ids["choices"][0]["logprobs"]["tokens"] == lp["tokens"]
        assert by_ids["choices"][0]["logprobs"]["top_logprobs"] == [pytest.approx(t, abs=1e-5)
                                                                     for t in lp["top_logprobs"]]
        chunks = _stream_chunks(await api.client.post("/v1/completions", json={**body, "stream": True}))
        streamed = [t for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
                    for t in c["choices"][0]["logprobs"]["top_logprobs"]]
        assert streamed == [pytest.approx(t, abs=1e-5) for t in lp["top_logprobs"]]


async def test_completions_of_several_prompts(engine: Engine) -> None:
    """A list of prompts (as lm-evaluation-harness sends with --batch_size, and vLLM takes): one
    choice per prompt, in order, each what the prompt alone gives on a fresh ephemeral session,
    streamed or not; usage counts them all."""
    tok = engine.tokenizer
    prompts = ["Once upon a time", tok.encode("The quick brown fox"), "A", tok.encode("x")]
    async with running_app(engine) as api:
        body = {"model": api.model, "max_tokens": 5, "temperature": 0, "echo": True, "logprobs": 2,
                "ignore_eos": True}
        alone = [(await api.client.post("/v1/completions", json={**body, "prompt": p})).json() for p in prompts]
        out = (await api.client.post("/v1/completions", json={**body, "prompt": prompts})).json()
        assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
        for choice, single in zip(out["choices"], alone):
            want = single["choices"][0]
            assert (choice["text"], choice["finish_reason"]) == (want["text"], want["finish_reason"])
            assert choice["logprobs"]["tokens"] == want["logprobs"]["tokens"]
            assert choice["logprobs"]["text_offset"] == want["logprobs"]["text_offset"]
            assert choice["logprobs"]["token_logprobs"] == pytest.approx(want["logprobs"]["token_logprobs"], abs=1e-5)
        for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
            assert out["usage"][key] == sum(a["usage"][key] for a in alone)
        assert "session" not in out  # several sessions, none stored

        r = await api.client.post("/v1/completions", json={**body, "prompt": prompts, "stream": True,
                                                           "stream_options": {"include_usage": True}})
        assert r.text.endswith("data: [DONE]\n\n") and r.text.count("[DONE]") == 1
        chunks = _stream_chunks(r)
        texts, finished = ["", "", "", ""], []
        for c in chunks:
            for choice in c["choices"]:
                texts[choice["index"]] += choice["text"]
                if choice["finish_reason"] is not None:
                    finished.append(choice["index"])
        assert texts == [c["choices"][0]["text"] for c in alone]
        assert sorted(finished) == [0, 1, 2, 3]
        usage = [c["usage"] for c in chunks if c.get("usage")]
        assert usage == [out["usage"]]


async def test_chat_top_logprobs(engine: Engine) -> None:
    """`top_logprobs: k`: each token lists the k most likely tokens at its place, most likely
    first; greedy, the first is the token itself. Streamed as in the whole answer."""
    async with running_app(engine) as api:
        body = {"logprobs": True, "top_logprobs": 4, "max_tokens": 6, "ignore_eos": True, "learn": False}
        out = await api.chat("hi", **body)
        content = out["choices"][0]["logprobs"]["content"]
        assert len(content) == out["usage"]["completion_tokens"] == 6
        for c in content:
            top = c["top_logprobs"]
            assert len(top) == 4 and set(top[0]) == {"token", "logprob", "bytes"}
            assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
            assert (top[0]["token"], top[0]["logprob"], top[0]["bytes"]) == (c["token"], c["logprob"], c["bytes"])
        r = await api.client.post("/v1/chat/completions", json={
            "model": api.model, "messages": [{"role": "user", "content": "hi"}], "temperature": 0,
            "stream": True, **body})
        streamed = [x for ch in _stream_chunks(r) if ch["choices"] and ch["choices"][0]["logprobs"]
                    for x in ch["choices"][0]["logprobs"]["content"]]
        assert streamed == content
        plain = (await api.chat("hi", logprobs=True, max_tokens=6, ignore_eos=True, learn=False))
        assert all(c["top_logprobs"] == [] for c in plain["choices"][0]["logprobs"]["content"])


async def test_text_offsets_of_a_character_cut_in_two(engine: Engine) -> None:
    """Token ids that spell a character byte by byte start where it does; a lone first byte
    reads U+FFFD, and the token after it starts after that character."""
    tok = engine.tokenizer
    byte = {tok.token_bytes(i)[0]: i for i in range(len(SPECIAL_TOKENS), tok.vocab_size)
            if len(tok.token_bytes(i)) == 1}
    emoji = "😀".encode()
    x, y, z = (tok.encode(c)[0] for c in "xyz")
    cases = {(x, *(byte[b] for b in emoji), y): ("x😀y", [0, 1, 1, 1, 1, 2]),
             (x, byte[emoji[0]], y, z): ("x\ufffdyz", [0, 1, 2, 3]),
             (x, byte[emoji[0]], byte[emoji[1]], y): ("x\ufffdy", [0, 1, 1, 2])}
    async with running_app(engine) as api:
        for ids, (text, offsets) in cases.items():
            body = {"model": api.model, "prompt": list(ids), "max_tokens": 0, "echo": True, "logprobs": 0}
            choice = (await api.client.post("/v1/completions", json=body)).json()["choices"][0]
            assert (choice["text"], choice["logprobs"]["text_offset"]) == (text, offsets)


async def test_completions_generate_and_echo(engine: Engine) -> None:
    async with running_app(engine) as api:
        body = {"model": "hope", "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0, "echo": True,
                "logprobs": 1, "session_id": "story", "ignore_eos": True}
        out = (await api.client.post("/v1/completions", json=body)).json()
        choice = out["choices"][0]
        assert choice["text"].startswith("Once upon a time")
        n = out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]
        assert len(choice["logprobs"]["tokens"]) == n == len(choice["logprobs"]["text_offset"])
        assert out["usage"]["completion_tokens"] == 6 and out["session"]["version"] == 1
        assert (await api.session("story"))["tokens_absorbed"] == 1 + n
        r = await api.client.post("/v1/completions", json={**body, "stream": True, "echo": False})
        events = [e[len("data: "):] for e in r.text.split("\n\n") if e]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["session"]["version"] == 2


async def test_session_resources(engine: Engine, other_engine: Engine) -> None:
    async with running_app(engine) as api:
        for sid in ("a", "b", "c"):
            await api.chat("hello", session=sid)
        page = (await api.client.get("/v1/sessions", params={"limit": 2})).json()
        assert [s["id"] for s in page["data"]] == ["a", "b"] and page["has_more"] and page["last_id"] == "b"
        page = (await api.client.get("/v1/sessions", params={"limit": 2, "after": "b"})).json()
        assert [s["id"] for s in page["data"]] == ["c"] and not page["has_more"]

        # fork: same state, then each goes its own way
        r = await api.client.post("/v1/sessions/a/fork", json={"new_id": "a2"})
        assert r.status_code == 201 and r.json()["version"] == 1
        state_a = (await api.client.get("/v1/sessions/a/state")).content
        assert (await api.client.get("/v1/sessions/a2/state")).content == state_a
        await api.chat("only in the fork", session="a2")
        assert (await api.session("a"))["version"] == 1 and (await api.session("a2"))["version"] == 2
        taken = await api.client.post("/v1/sessions/a/fork", json={"new_id": "b"})
        assert taken.status_code == 409 and taken.headers["x-should-retry"] == "false"
        metrics = await api.metrics()  # a name taken is no busy session
        assert 'hope_request_failure_total{reason="session_exists"} 1.0' in metrics
        assert 'reason="session_busy"' not in metrics
        assert (await api.client.post("/v1/sessions/nope/fork", json={"new_id": "x"})).status_code == 404

        # export, import under a new id: the same state, and it continues
        exported = await api.client.get("/v1/sessions/b/state")
        assert exported.headers["content-type"] == "application/octet-stream"
        r = await api.client.put("/v1/sessions/b-copy/state", content=exported.content)
        assert r.status_code == 200, r.text
        assert r.json()["tokens_absorbed"] == (await api.session("b"))["tokens_absorbed"]
        assert r.json()["messages_logged"] == 0  # the history starts over
        one = await api.chat("next", session="b")
        two = await api.chat("next", session="b-copy")
        assert one["choices"] == two["choices"]

        # states that do not belong here are refused, and change nothing
        foreign = other_engine.new_session().to_bytes()
        r = await api.client.put("/v1/sessions/b/state", content=foreign)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_state"
        r = await api.client.put("/v1/sessions/b/state", content=b"\x00" * 100)
        assert r.status_code == 400
        r = await api.client.put("/v1/sessions/b/state", content=exported.content[:-10])
        assert r.status_code == 400
        assert (await api.session("b"))["version"] == 2

        # delete
        assert (await api.client.delete("/v1/sessions/c")).json() == {"id": "c", "object": "session.deleted",
                                                                      "deleted": True}
        await api.session("c", expect=404)
        assert (await api.client.delete("/v1/sessions/c")).status_code == 404
        assert (await api.client.get("/v1/sessions/c/state")).status_code == 404


async def test_bfloat16_storage(engine: Engine) -> None:
    async with running_app(engine, state_dtype="bfloat16", session_cache_size=0) as api:
        await api.chat("half the bytes", session="half")
        await api.chat("and it continues", session="half")
        meta = await api.session("half")
        assert meta["version"] == 2
        assert meta["state_bytes"] < engine.new_session().nbytes("float32") * 0.6


async def test_bfloat16_storage_answers_the_same_from_the_cache_and_the_store(engine: Engine) -> None:
    """The cache keeps what the bf16 blob holds, not the float32 working copy: the session (a
    cache hit) and its fork (read from the store) answer alike."""
    async with running_app(engine, state_dtype="bfloat16") as api:
        await api.chat("half the bytes", session="half", max_tokens=12, ignore_eos=True)
        assert (await api.client.post("/v1/sessions/half/fork", json={"new_id": "copy"})).status_code == 201
        body = {"max_tokens": 6, "logprobs": True, "learn": False}
        cached = await api.chat("and then?", session="half", **body)
        stored = await api.chat("and then?", session="copy", **body)
        assert cached["choices"] == stored["choices"]


async def test_tenant_isolation(engine: Engine) -> None:
    keys = "acme:key-a,globex:key-g"
    acme, globex = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-g"}
    async with running_app(engine, api_keys=keys) as api:
        await api.chat("acme's secret", session="shared", headers=acme)
        assert (await api.session("shared", headers=acme))["version"] == 1
        c = api.client
        assert (await c.get("/v1/sessions/shared", headers=globex)).status_code == 404
        assert (await c.get("/v1/sessions/shared/state", headers=globex)).status_code == 404
        r = await c.post("/v1/sessions/shared/fork", json={"new_id": "stolen"}, headers=globex)
        assert r.status_code == 404
        assert (await c.delete("/v1/sessions/shared", headers=globex)).status_code == 404
        assert (await c.get("/v1/sessions", headers=globex)).json()["data"] == []
        # globex's own "shared" is another session; acme's is untouched
        await api.chat("globex's own", session="shared", headers=globex)
        assert (await api.session("shared", headers=globex))["version"] == 1
        out = await api.chat("again", session="shared", headers=acme)
        assert out["session"]["version"] == 2
        acme_state = (await c.get("/v1/sessions/shared/state", headers=acme)).content
        globex_state = (await c.get("/v1/sessions/shared/state", headers=globex)).content
        a, g = load(acme_state), load(globex_state)
        assert any(not torch.equal(a[k], g[k]) for k in a)


async def test_warns_when_open_beyond_loopback(engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="hope.server"):
        async with running_app(engine, host="0.0.0.0"):
            pass
        assert any("HOPE_API_KEYS" in r.getMessage() for r in caplog.records)
        caplog.clear()
        async with running_app(engine, host="0.0.0.0", api_keys="acme:k"), running_app(engine, host="127.0.0.1"):
            pass
        assert not any("HOPE_API_KEYS" in r.getMessage() for r in caplog.records)


def _huge_state(engine: Engine, version: int) -> bytes:
    """A state of the right layout whose values are finite but too large for the model."""
    from safetensors.torch import save

    blob = engine.new_session().to_bytes()
    meta = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])["__metadata__"]
    huge = {k: (torch.full_like(v, 3e38) * (1 - 2 * (torch.arange(v.numel()) % 2)).view(v.shape)
                if v.is_floating_point() else v) for k, v in load(blob).items()}
    return save(huge, metadata={**meta, "version": str(version)})


async def test_an_import_that_would_overflow_is_refused(engine: Engine) -> None:
    """Finite values too large for the model pass the loader's checks, but every turn on them
    would fail: the import tries a chunk on a copy and refuses the state, creating nothing."""
    async with running_app(engine) as api:
        r = await api.client.put("/v1/sessions/huge/state", content=_huge_state(engine, 1))
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_state", r.text
        assert "overflows" in r.json()["error"]["message"]
        await api.session("huge", expect=404)
        good = (await api.client.put("/v1/sessions/fine/state", content=engine.new_session().to_bytes()))
        assert good.status_code == 200, good.text


async def test_a_turn_that_overflows_the_memory_stores_nothing(engine: Engine) -> None:
    """A stored state of huge but finite values (written before imports were tried, or by
    another writer of the store): the turn on it overflows. The server must not store what its
    own loader would refuse (the session could then never be used again): the turn fails, is
    not counted as a server error that pages, and the session stays as stored."""
    from dataclasses import replace

    from server.settings import DEFAULT_TENANT
    from server.stores import SessionRecord

    async with running_app(engine) as api:
        r = await api.client.put("/v1/sessions/huge/state", content=engine.new_session().to_bytes())
        assert r.status_code == 200, r.text
        store = api.app.state.ctx.sessions.store
        stored = await store.load(DEFAULT_TENANT, "huge")
        huge = _huge_state(engine, 2)
        assert await store.commit(SessionRecord(replace(stored.meta, version=2, state_bytes=len(huge)),
                                                stored.history, huge), 1, None)
        for _ in range(2):  # the second from the cache, if the first had left anything there
            failed = await api.chat("hello there, how are you today?", session="huge", expect=500)
            assert failed["error"]["code"] == "state_not_finite"
        assert (await api.session("huge"))["version"] == 2
        assert (await api.client.get("/v1/sessions/huge/state")).content == huge
        metrics = await api.metrics()
        assert 'hope_request_failure_total{reason="state_not_finite"} 2.0' in metrics
        assert 'reason="internal"' not in metrics


async def test_a_lone_surrogate_in_an_echoed_prompt(engine: Engine) -> None:
    """JSON's "\\ud83d" (a string cut inside an emoji) is valid JSON but not encodable text: it is
    read as U+FFFD, as the tokenizer reads it, so that the echo can be sent. It used to be
    stored, then answered with a 500 that clients retry, absorbing the prompt again each time."""
    async with running_app(engine) as api:
        body = ('{"model": "%s", "prompt": "smile \\ud83d", "echo": true, "max_tokens": 2, "session_id": "sur"%s}')
        r = await api.client.post("/v1/completions", content=body % (api.model, ""),
                                  headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"].startswith("smile \ufffd")
        chunks = _stream_chunks(await api.client.post("/v1/completions", content=body % (api.model, ', "stream": true'),
                                                      headers={"content-type": "application/json"}))
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]).startswith("smile \ufffd")
        assert (await api.session("sur"))["version"] == 2


async def test_vllm_extensions(engine: Engine) -> None:
    """Clients moved from vLLM or llama.cpp send their extensions: -1 is vLLM's "no top-k", and
    the ones that would change the output are refused unless neutral, as OpenAI's are."""
    async with running_app(engine) as api:
        same = dict(temperature=0.9, seed=5, max_tokens=6)
        assert (await api.chat("hi", top_k=-1, **same))["choices"] == (await api.chat("hi", top_k=0, **same))["choices"]
        await api.chat("hi", top_k=-2, expect=400)
        await api.chat("hi", repetition_penalty=1.0, min_p=0, guided_json=None, include_stop_str_in_output=False)
        for extra in ({"repetition_penalty": 1.1}, {"min_p": 0.05}, {"min_tokens": 4}, {"guided_choice": ["a", "b"]},
                      {"grammar": "root ::= \"a\""}, {"include_stop_str_in_output": True}):
            err = await api.chat("hi", expect=400, **extra)
            assert err["error"]["param"] == next(iter(extra)), err
