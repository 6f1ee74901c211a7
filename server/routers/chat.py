"""POST /v1/chat/completions: OpenAI's chat API on a session that remembers.

The prompt of a turn is the request's new messages (those not recognised as a re-send of the
session's history, see server.sessions), each `[role] content [<|end|>]`, then `<|assistant|>`.
The reply is absorbed as it is generated; a reply that did not end on <|end|> (cut by max_tokens
or a stop string) gets one appended, so every assistant turn in the stream is closed exactly as
a re-sent assistant message would be.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse
from starlette.background import BackgroundTask

from hope_core.engine import TokenEvent
from hope_core.sampling import Alternatives
from server.auth import Ctx, Sessions, Tenant
from server.inference import (
    EventStream,
    Plan,
    PromptAbsorbed,
    SentTokens,
    TurnRun,
    begin_turn,
    check_model,
    check_prompt_chars,
    check_prompt_size,
    client_closed,
    collect,
    guarded_stream,
    resolve_session_id,
    sampling_params,
    sse,
    surprise_of,
)
from server.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatRequest,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    TokenLogprob,
    TopLogprob,
    Usage,
    dump,
)
from server.sessions import message_digest
from server.worker import Stopped

router = APIRouter(tags=["chat"])
log = logging.getLogger("hope.server")


def _token_logprobs(tokenizer, token_ids: Sequence[int], logprobs: Sequence[float],
                    tops: Sequence[Alternatives]) -> ChoiceLogprobs:
    """Each token's log-probability and, when asked for, the most likely tokens at its place."""
    def entry(t: int, lp: float) -> dict:
        return {"token": tokenizer.decode([t]), "logprob": lp, "bytes": list(tokenizer.token_bytes(t))}

    tops = tops or [[] for _ in token_ids]
    return ChoiceLogprobs(content=[
        TokenLogprob(**entry(t, lp), top_logprobs=[TopLogprob(**entry(a, alp)) for a, alp in top])
        for t, lp, top in zip(token_ids, logprobs, tops, strict=True)])


@router.post("/v1/chat/completions", response_model=ChatCompletion)
async def chat_completions(body: ChatRequest, request: Request, ctx: Ctx,
                           sessions: Sessions, tenant: Tenant,
                           x_session_id: Annotated[str | None, Header()] = None):
    started = time.perf_counter()
    model = check_model(ctx, body.model)
    session_id = resolve_session_id(body.session_id, x_session_id, body.user)
    tok = sessions.engine.tokenizer
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens"
    params = sampling_params(ctx, body, max_tokens, param, [tok.end_id, tok.eot_id],
                             top_logprobs=body.top_logprobs)
    messages = [(m.template_role(), m.text()) for m in body.messages]
    digests = [message_digest(role, content) for role, content in messages]

    turn = await begin_turn(request, sessions, tenant, session_id, body.learn)
    try:
        resent = turn.resent_prefix(digests)
        check_prompt_chars(ctx, tok, sum(len(content) for _, content in messages[resent:]), "messages")
        prompt = [t for role, content in messages[resent:] for t in tok.encode_message(role, content)]
        prompt.append(tok.role_ids["assistant"])
        check_prompt_size(ctx, len(prompt), "messages")
        run = TurnRun(ctx, turn, Plan(prompt, params, body.learn, close_turn=tok.end_id,
                                      admit_within_s=None if body.stream else ctx.settings.busy_timeout_s), started)
    except BaseException:
        await turn.release()
        raise
    new_digests = digests[resent:]
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())

    def finish_digests() -> list[bytes]:
        assert run.output is not None and run.output.generation is not None
        return [*new_digests, message_digest("assistant", run.output.generation.text)]

    if body.stream:
        events = _events(run, body, completion_id, created, model, resent, finish_digests)
        return EventStream(guarded_stream(ctx, [run], events, "chat"),
                           background=BackgroundTask(_cleanup, run, turn), keepalive_s=ctx.settings.sse_keepalive_s)

    try:
        await collect(request, run)
        info = await run.finish(finish_digests())
    except Stopped:  # the client disconnected: nothing was committed, and nobody reads this answer
        raise client_closed() from None
    finally:
        await turn.release()
    info.resent_messages = resent
    assert run.output is not None and run.output.generation is not None
    result = run.output.generation
    return JSONResponse(dump(ChatCompletion(
        id=completion_id, created=created, model=model, system_fingerprint=ctx.system_fingerprint,
        choices=[ChatChoice(
            message=AssistantMessage(content=result.text), finish_reason=result.finish_reason,
            logprobs=_token_logprobs(tok, result.token_ids, result.logprobs, result.top_logprobs)
            if body.logprobs else None)],
        usage=Usage(prompt_tokens=len(prompt), completion_tokens=len(result.token_ids),
                    total_tokens=len(prompt) + len(result.token_ids)),
        session=info)))


async def _cleanup(run: TurnRun, turn) -> None:
    await run.aclose()
    await turn.release()


async def _events(run: TurnRun, body: ChatRequest, completion_id: str, created: int, model: str,
                  resent: int, finish_digests) -> AsyncIterator[str]:
    tok = run.turn.manager.engine.tokenizer
    fingerprint = run.ctx.system_fingerprint
    opts = body.stream_options
    include_usage = bool(opts and opts.include_usage)
    include_surprise = bool(opts and opts.include_surprise)

    def chunk(delta: Delta, **extra) -> str:
        finish = extra.pop("finish_reason", None)
        logprobs = extra.pop("logprobs", None)
        c = ChatCompletionChunk(id=completion_id, created=created, model=model, system_fingerprint=fingerprint,
                                choices=[ChunkChoice(delta=delta, finish_reason=finish, logprobs=logprobs)],
                                **extra)
        return sse(dump(c))

    def logprobs_of(events: list[TokenEvent]) -> ChoiceLogprobs | None:
        if not body.logprobs or not events:
            return None
        return _token_logprobs(tok, [e.token_id for e in events], [e.logprob for e in events],
                               [e.top for e in events])

    pending: list[TokenEvent] = []  # tokens not yet sent in a chunk (for their surprise)
    # (for their log-probabilities, when asked for: with the chunk that completes their text)
    sent = SentTokens(tok) if body.logprobs else None
    completed: list[TokenEvent] = []
    async for item in run.events():
        if isinstance(item, PromptAbsorbed):
            surprise = surprise_of(tok, item.token_ids, item.logprobs) if include_surprise else None
            yield chunk(Delta(role="assistant", content=""), surprise=surprise)
            continue
        if item.token_id >= 0:
            pending.append(item)
        if sent is not None:
            completed += sent.push(item)
        if not item.text and not include_surprise:
            continue
        yield chunk(Delta(content=item.text), logprobs=logprobs_of(completed),
                    surprise=surprise_of(tok, [e.token_id for e in pending], [e.logprob for e in pending])
                    if include_surprise else None)
        pending, completed = [], []
    info = await run.finish(finish_digests())
    info.resent_messages = resent
    out = run.output
    assert out is not None and out.generation is not None
    # tokens that no chunk with text carried (a stop token, the leading bytes of a character a
    # stop string cut) and those whose text a stop string cut: their log-probabilities close the
    # stream, so that it lists every generated token, as the whole answer does
    yield chunk(Delta(), finish_reason=out.generation.finish_reason, session=info,
                logprobs=logprobs_of(completed + (sent.rest() if sent else [])))
    if include_usage:
        n_prompt, n_gen = len(run.plan.prompt), len(out.generation.token_ids)
        usage = ChatCompletionChunk(id=completion_id, created=created, model=model, system_fingerprint=fingerprint,
                                    choices=[],
                                    usage=Usage(prompt_tokens=n_prompt, completion_tokens=n_gen,
                                                total_tokens=n_prompt + n_gen))
        yield sse(dump(usage))
    yield sse("[DONE]")
