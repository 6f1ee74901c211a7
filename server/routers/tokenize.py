"""/tokenize, /detokenize and /tokenizer_info: the served tokenizer, as vLLM's server offers it.

The tokenizer ships with the checkpoint and is on no hub, so a client that sends completions
prompts as token ids, counts a prompt against `HOPE_MAX_PROMPT_TOKENS` before sending it, or
reads log-probabilities by id, asks the server (lm-evaluation-harness's "remote" tokenizer does).
`messages` are encoded as chat encodes new messages (each `[role] content [<|end|>]`, then
`<|assistant|>` with `add_generation_prompt`). A `prompt` is encoded as completions encodes one,
except that special-token names in it (`<|endoftext|>`) stand for their ids, as in vLLM's and
Hugging Face's tokenizers: a client that builds token ids means them (lm-evaluation-harness
finds the end-of-text id by tokenizing its name), while a prompt sent as text, as at OpenAI,
reads them as text. Nothing touches a session.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from hope_core.tokenizer import ENDOFTEXT, SPECIAL_TOKENS
from server.auth import Ctx, Sessions, get_tenant
from server.inference import check_model, check_token_ids
from server.schemas import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse, TokenizerInfo

TOKENIZER_PATHS = ("/tokenize", "/detokenize", "/tokenizer_info")

# the chat format in Jinja, for clients that render prompts themselves (`tokenizer_info`); the
# text it renders, tokenized here, is the ids chat absorbs for the same messages
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ 'system' if m['role'] == 'developer' else m['role'] }}|>"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% elif m['content'] %}{% for part in m['content'] %}{{ part['text'] }}{% endfor %}{% endif %}"
    "<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")

router = APIRouter(tags=["tokenizer"], dependencies=[Depends(get_tenant)])


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, ctx: Ctx, sessions: Sessions) -> TokenizeResponse:
    if body.model is not None:
        check_model(ctx, body.model)
    tok = sessions.engine.tokenizer
    if body.messages is not None:
        ids = [t for m in body.messages for t in tok.encode_message(m.template_role(), m.text())]
        if body.add_generation_prompt:
            ids.append(tok.role_ids["assistant"])
    else:
        assert body.prompt is not None
        ids = tok.encode_with_special_names(body.prompt)
    return TokenizeResponse(count=len(ids), max_model_len=ctx.settings.max_prompt_tokens, tokens=ids,
                            token_strs=[tok.decode([t]) for t in ids] if body.return_token_strs else None)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, ctx: Ctx, sessions: Sessions) -> DetokenizeResponse:
    if body.model is not None:
        check_model(ctx, body.model)
    tok = sessions.engine.tokenizer
    check_token_ids(tok, body.tokens, "tokens")
    return DetokenizeResponse(prompt=tok.decode(body.tokens))


@router.get("/tokenizer_info", response_model=TokenizerInfo)
async def tokenizer_info(ctx: Ctx, sessions: Sessions) -> TokenizerInfo:
    tok = sessions.engine.tokenizer
    return TokenizerInfo(eos_token=ENDOFTEXT, bos_token=ENDOFTEXT, chat_template=CHAT_TEMPLATE,
                         model_max_length=ctx.settings.max_prompt_tokens, vocab_size=tok.vocab_size,
                         special_tokens=list(SPECIAL_TOKENS))
