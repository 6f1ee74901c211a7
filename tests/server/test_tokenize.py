"""POST /tokenize and /detokenize: the served tokenizer, as chat and completions read text."""

from __future__ import annotations

import pytest

from hope_core.engine import Engine
from tests.server.support import running_app
from tests.server.test_errors import assert_error

pytestmark = pytest.mark.anyio


async def test_tokenize_gives_the_ids_chat_and_completions_absorb(engine: Engine) -> None:
    """A prompt's ids are the ones completions absorbs; messages' ids are chat's prompt: a
    completion over them generates chat's reply, token for token."""
    tok = engine.tokenizer
    text = "Tokens, please: naïve café ☕"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is memory?"}]
    async with running_app(engine, max_prompt_tokens=300) as api:
        post = api.client.post
        out = (await post("/tokenize", json={"model": api.model, "prompt": text, "return_token_strs": True})).json()
        assert out["tokens"] == tok.encode(text) and out["count"] == len(out["tokens"])
        assert out["max_model_len"] == 300
        assert out["token_strs"] == [tok.decode([t]) for t in out["tokens"]]
        back = await post("/detokenize", json={"model": api.model, "tokens": out["tokens"]})
        assert back.json() == {"prompt": text}

        ids = (await post("/tokenize", json={"messages": messages})).json()["tokens"]
        body = {"max_tokens": 10, "temperature": 0, "ignore_eos": True, "learn": False}
        chat = await api.chat(messages, **body)
        assert chat["usage"]["prompt_tokens"] == len(ids)
        completion = (await post("/v1/completions", json={"model": api.model, "prompt": ids, **body})).json()
        assert completion["choices"][0]["text"] == chat["choices"][0]["message"]["content"]
        without = (await post("/tokenize", json={"messages": messages, "add_generation_prompt": False})).json()
        assert without["tokens"] == ids[:-1] and ids[-1] == tok.role_ids["assistant"]


async def test_a_client_can_tokenize_for_the_server_as_lm_eval_does(engine: Engine) -> None:
    """lm-evaluation-harness's remote tokenizer: the end-of-text id is the first id of the
    tokenized `eos_token`, and the Jinja chat template, rendered and tokenized, gives chat's ids."""
    jinja2 = pytest.importorskip("jinja2")  # (torch depends on it)
    tok = engine.tokenizer
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Say <|end|> now"}]
    async with running_app(engine) as api:
        info = (await api.client.get("/tokenizer_info")).json()
        assert info["special_tokens"][tok.eot_id] == info["eos_token"]

        async def tokenize(prompt: str) -> list[int]:
            return (await api.client.post("/tokenize", json={"prompt": prompt, "add_special_tokens": False})).json()[
                "tokens"]

        assert (await tokenize(info["eos_token"]))[0] == tok.eot_id
        assert await tokenize("a<|endoftext|><|user|>b") == [*tok.encode("a"), tok.eot_id, tok.role_ids["user"],
                                                            *tok.encode("b")]
        rendered = jinja2.Template(info["chat_template"]).render(messages=messages, add_generation_prompt=True)
        chat_ids = (await api.client.post("/tokenize", json={"messages": messages})).json()["tokens"]
        # the user typed "<|end|>" as text: only a client's own rendering makes it a special id
        typed = tok.encode("Say <|end|> now")
        assert chat_ids == [tok.role_ids["system"], *tok.encode("Be brief."), tok.end_id,
                            tok.role_ids["user"], *typed, tok.end_id, tok.role_ids["assistant"]]
        assert await tokenize(rendered) != chat_ids
        plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say it now"},
                 {"role": "assistant", "content": None},
                 {"role": "user", "content": [{"type": "text", "text": "in "}, {"type": "text", "text": "parts"}]}]
        rendered = jinja2.Template(info["chat_template"]).render(messages=plain, add_generation_prompt=True)
        assert await tokenize(rendered) == (await api.client.post("/tokenize", json={"messages": plain})).json()[
            "tokens"]
        # as text, completions reads special-token names as text
        r = await api.client.post("/v1/completions", json={"model": api.model, "prompt": "<|endoftext|>",
                                                           "max_tokens": 0, "echo": True, "logprobs": 0})
        assert r.json()["usage"]["prompt_tokens"] == len(tok.encode("<|endoftext|>")) > 1


async def test_tokenizer_routes_refuse_bad_input_and_need_the_key(engine: Engine) -> None:
    async with running_app(engine, api_keys="acme:secret") as api:
        for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})):
            assert_error(await api.client.post(path, json=body), 401)
            assert_error(await api.client.post(path, content=b"{not json"), 401)  # the key first
        assert_error(await api.client.get("/tokenizer_info"), 401)
        key = {"Authorization": "Bearer secret"}
        post = api.client.post
        assert_error(await post("/tokenize", json={"prompt": "x", "messages": [{"role": "user", "content": "y"}]},
                                headers=key), 400)
        assert_error(await post("/tokenize", json={}, headers=key), 400)
        assert_error(await post("/tokenize", json={"model": "gpt-4", "prompt": "x"}, headers=key), 404, param="model")
        for bad in ([engine.tokenizer.vocab_size], [-1]):
            assert_error(await post("/detokenize", json={"tokens": bad}, headers=key), 400, param="tokens")
        assert (await post("/detokenize", json={"tokens": []}, headers=key)).json() == {"prompt": ""}
