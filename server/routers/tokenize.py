"""POST /tokenize and /detokenize: the served tokenizer, as vLLM's server offers it.

The tokenizer ships with the checkpoint and is on no hub, so a client that sends completions
prompts as token ids, counts a prompt against `HOPE_MAX_PROMPT_TOKENS` before sending it, or
reads log-probabilities by id, asks the server. A `prompt` is encoded as completions encodes
one; `messages` as chat encodes new messages (each `[role] content [<|end|>]`, then
`<|assistant|>` with `add_generation_prompt`). Nothing touches a session.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from server.auth import Ctx, Sessions, get_tenant
from server.errors import bad_request
from server.inference import check_model
from server.schemas import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse

TOKENIZER_PATHS = ("/tokenize", "/detokenize")

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
        ids = tok.encode(body.prompt)
    return TokenizeResponse(count=len(ids), max_model_len=ctx.settings.max_prompt_tokens, tokens=ids,
                            token_strs=[tok.decode([t]) for t in ids] if body.return_token_strs else None)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, ctx: Ctx, sessions: Sessions) -> DetokenizeResponse:
    if body.model is not None:
        check_model(ctx, body.model)
    tok = sessions.engine.tokenizer
    if any(not 0 <= t < tok.vocab_size for t in body.tokens):
        raise bad_request(f"a token id is outside the vocabulary (0 to {tok.vocab_size - 1})", param="tokens")
    return DetokenizeResponse(prompt=tok.decode(body.tokens))
