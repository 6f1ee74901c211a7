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


async def test_tokenizer_routes_refuse_bad_input_and_need_the_key(engine: Engine) -> None:
    async with running_app(engine, api_keys="acme:secret") as api:
        for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})):
            assert_error(await api.client.post(path, json=body), 401)
            assert_error(await api.client.post(path, content=b"{not json"), 401)  # the key first
        key = {"Authorization": "Bearer secret"}
        post = api.client.post
        assert_error(await post("/tokenize", json={"prompt": "x", "messages": [{"role": "user", "content": "y"}]},
                                headers=key), 400)
        assert_error(await post("/tokenize", json={}, headers=key), 400)
        assert_error(await post("/tokenize", json={"model": "gpt-4", "prompt": "x"}, headers=key), 404, param="model")
        for bad in ([engine.tokenizer.vocab_size], [-1]):
            assert_error(await post("/detokenize", json={"tokens": bad}, headers=key), 400, param="tokens")
        assert (await post("/detokenize", json={"tokens": []}, headers=key)).json() == {"prompt": ""}
