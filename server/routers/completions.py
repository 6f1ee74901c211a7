"""POST /v1/completions: raw text appended to the session's stream, OpenAI's legacy API.

The prompt (text, or token ids of the served tokenizer) is absorbed as it is (no chat roles, no
history de-duplication): each request continues the stream. `max_tokens=0` with `echo` scores
the prompt without generating; with `logprobs` the answer carries every prompt token's
log-probability given everything the session absorbed before it, and the `logprobs` most likely
tokens at its place (OpenAI's legacy format, which lm-evaluation-harness reads). Generation stops
at <|endoftext|> unless `ignore_eos`.

A list of prompts (lm-evaluation-harness's `--batch_size`) runs each on a fresh ephemeral
session, all at once in the scheduler's batch: one choice per prompt, in order (streamed, the
choices' chunks interleave, each naming its `index`). With a session they are refused: a session
is one stream, and several continuations of it could not all be stored.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
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
from hope_core.tokenizer import sanitize
from server.auth import Ctx, Sessions, Tenant
from server.errors import APIError
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
    check_token_ids,
    client_closed,
    collect,
    guarded_stream,
    resolve_session_id,
    sampling_params,
    sse,
    surprise_of,
)
from server.schemas import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, Usage, dump
from server.worker import Stopped

router = APIRouter(tags=["completions"])
log = logging.getLogger("hope.server")


def legacy_logprobs(tokenizer, token_ids: Sequence[int], logprobs: Sequence[float],
                    tops: Sequence[Alternatives], offset: int | _Offsets = 0) -> CompletionLogprobs:
    """Per token: its text, log-probability, the most likely tokens at its place with the token
    itself, and where its text starts (after `offset` chars, or where a stream's `_Offsets` has
    got to)."""
    offsets = _Offsets(tokenizer, offset) if isinstance(offset, int) else offset
    tops = tops or [[] for _ in token_ids]
    return CompletionLogprobs(tokens=[tokenizer.decode([t]) for t in token_ids], token_logprobs=list(logprobs),
                              top_logprobs=[_top_map(tokenizer, t, lp, top)
                                            for t, lp, top in zip(token_ids, logprobs, tops, strict=True)],
                              text_offset=offsets.take(token_ids))


def _top_map(tokenizer, token: int, logprob: float, top: Alternatives) -> dict[str, float]:
    """OpenAI's map of text to log-probability: the alternatives, most likely first, then the
    token itself if it was not among them. Two tokens of one text (the pieces of a character cut
    in two both read U+FFFD) keep the more likely one's entry."""
    out: dict[str, float] = {}
    for t, lp in [*top, (token, logprob)]:
        out.setdefault(tokenizer.decode([t]), lp)
    return out


class _Offsets:
    """Where each token's text starts after `start` characters, token after token. Offsets
    follow the incremental UTF-8 decoding, so a token that only completes a character begun by
    the previous one starts where that character does; bytes held back that this token does not
    complete read as U+FFFD, which belongs to the tokens before it."""

    def __init__(self, tokenizer, start: int) -> None:
        self.tokenizer = tokenizer
        self.decoder, self.pos = tokenizer.stream_decoder(), start

    def take(self, token_ids: Sequence[int]) -> list[int]:
        out = []
        for t in token_ids:
            held = self.decoder.held_bytes
            if held and not _continues(held, self.tokenizer.token_bytes(t)):
                out.append(self.pos + len(held.decode("utf-8", errors="replace")))
            else:
                out.append(self.pos)
            self.pos += len(self.decoder.push(t))
        return out


def _continues(held: bytes, following: bytes) -> bool:
    """Whether `following` goes on with the character whose first bytes are `held` (finishing
    it or not) rather than breaking it."""
    size = 2 if held[0] < 0xE0 else 3 if held[0] < 0xF0 else 4  # from the lead byte
    try:
        codecs.getincrementaldecoder("utf-8")().decode(held + following[:size - len(held)], final=False)
    except UnicodeDecodeError:
        return False
    return True


def _merge(a: CompletionLogprobs | None, b: CompletionLogprobs) -> CompletionLogprobs:
    if a is None:
        return b
    return CompletionLogprobs(tokens=a.tokens + b.tokens, token_logprobs=a.token_logprobs + b.token_logprobs,
                              top_logprobs=(a.top_logprobs or []) + (b.top_logprobs or []),
                              text_offset=a.text_offset + b.text_offset)


@router.post("/v1/completions", response_model=Completion)
async def completions(body: CompletionRequest, request: Request, ctx: Ctx,
                      sessions: Sessions, tenant: Tenant,
                      x_session_id: Annotated[str | None, Header()] = None):
    started = time.perf_counter()
    model = check_model(ctx, body.model)
    session_id = resolve_session_id(body.session_id, x_session_id, body.user)
    tok = sessions.engine.tokenizer
    alternatives = body.logprobs or 0
    params = sampling_params(ctx, body, body.max_tokens, "max_tokens", [tok.eot_id], default=16,  # OpenAI's
                             top_logprobs=alternatives)
    if len(body.prompt) > 1:
        if session_id is not None:
            raise APIError(400, "several prompts in one request each run on a fresh ephemeral session; a "
                           "session is one stream: send one prompt per request to it", param="prompt",
                           code="invalid_value")
        if len(body.prompt) > ctx.settings.max_concurrent_requests:
            raise APIError(400, f"{len(body.prompt)} prompts, the most one request may send is "
                           f"{ctx.settings.max_concurrent_requests}", param="prompt", code="invalid_value")
    prompts = [_read_prompt(ctx, tok, p) for p in body.prompt]
    if params.max_tokens == 0 and any(not ids for _, ids in prompts):
        raise APIError(400, "nothing to do: an empty prompt and max_tokens=0", param="prompt", code="invalid_value")

    plans = [Plan(ids, params, body.learn, prompt_alternatives=alternatives if body.echo else 0,
                  admit_within_s=None if body.stream else ctx.settings.busy_timeout_s) for _, ids in prompts]
    runs = await _begin_runs(request, ctx, sessions, tenant, session_id, body.learn, plans, started)
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())

    if body.stream:
        events = _stream(runs, body, [text for text, _ in prompts], completion_id, created, model)
        return EventStream(guarded_stream(ctx, runs, events, "completion"),
                           background=BackgroundTask(_cleanup, runs), keepalive_s=ctx.settings.sse_keepalive_s)

    try:
        await collect(request, *runs)
        infos = [await run.finish() for run in runs]
    except Stopped:  # the client disconnected: nothing was committed, and nobody reads this answer
        raise client_closed() from None
    finally:
        for run in runs:
            await run.turn.release()
    choices = [_choice(tok, body, text, ids, run, i) for i, ((text, ids), run) in enumerate(zip(prompts, runs))]
    return JSONResponse(dump(Completion(id=completion_id, created=created, model=model,
                      system_fingerprint=ctx.system_fingerprint, choices=choices, usage=_usage(runs),
                      session=infos[0] if len(runs) == 1 else None)))


def _read_prompt(ctx, tok, prompt: str | list[int]) -> tuple[str, list[int]]:
    """A prompt's text and token ids, checked."""
    if isinstance(prompt, str):
        # lone surrogates (JSON's "\ud83d", a string cut inside an emoji) become U+FFFD, as the
        # tokenizer reads them: the echoed text must be encodable, and one character stays one
        check_prompt_chars(ctx, tok, len(prompt), "prompt")
        text = sanitize(prompt)
        ids = tok.encode(text)
    else:
        ids = list(prompt)
        check_token_ids(tok, ids, "prompt")
        text = tok.decode(ids)
    check_prompt_size(ctx, len(ids), "prompt")
    return text, ids


async def _begin_runs(request: Request, ctx, sessions, tenant: str, session_id: str | None, learn: bool,
                      plans: list[Plan], started: float) -> list[TurnRun]:
    """A turn and its run per plan. Several prompts take their engine slots as a group (see
    Admission.group), and a failure gives back whatever was taken."""
    runs: list[TurnRun] = []
    try:
        async with sessions.admission.group if len(plans) > 1 else contextlib.nullcontext():
            for plan in plans:
                turn = await begin_turn(request, sessions, tenant, session_id, learn)
                try:
                    runs.append(TurnRun(ctx, turn, plan, started))
                except BaseException:
                    await turn.release()
                    raise
    except BaseException:
        for run in runs:
            await run.aclose()
            await run.turn.release()
        raise
    return runs


def _usage(runs: list[TurnRun]) -> Usage:
    n_prompt = sum(len(run.plan.prompt) for run in runs)
    n_gen = sum(len(run.output.generation.token_ids) for run in runs if run.output and run.output.generation)
    return Usage(prompt_tokens=n_prompt, completion_tokens=n_gen, total_tokens=n_prompt + n_gen)


def _choice(tok, body: CompletionRequest, prompt_text: str, prompt: list[int], run: TurnRun,
            index: int) -> CompletionChoice:
    out = run.output
    assert out is not None
    gen_ids = out.generation.token_ids if out.generation else []
    gen_text = out.generation.text if out.generation else ""
    logprobs = None
    if body.logprobs is not None:
        if body.echo:
            logprobs = legacy_logprobs(tok, prompt, out.prompt_logprobs, out.prompt_top)
        gen = out.generation
        gen_part = legacy_logprobs(tok, gen_ids, gen.logprobs if gen else [], gen.top_logprobs if gen else [],
                                   offset=len(prompt_text) if body.echo else 0)
        logprobs = _merge(logprobs, gen_part)
    text = (prompt_text if body.echo else "") + gen_text
    return CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=run.finish_reason)


async def _cleanup(runs: list[TurnRun]) -> None:
    for run in runs:
        await run.aclose()
        await run.turn.release()


async def _stream(runs: list[TurnRun], body: CompletionRequest, prompt_texts: list[str], completion_id: str,
                  created: int, model: str) -> AsyncIterator[str]:
    """The choices' chunks as they come (several prompts: interleaved, each chunk naming its
    choice's index), then the usage of them all, then [DONE]."""
    choices = [_events(run, body, text, completion_id, created, model, i)
               for i, (run, text) in enumerate(zip(runs, prompt_texts))]
    async for event in (choices[0] if len(choices) == 1 else _interleave(choices)):
        yield event
    opts = body.stream_options
    if opts and opts.include_usage:
        yield sse(dump(Completion(id=completion_id, created=created, model=model,
                                  system_fingerprint=runs[0].ctx.system_fingerprint, choices=[],
                                  usage=_usage(runs))))
    yield sse("[DONE]")


async def _interleave(streams: list[AsyncIterator[str]]) -> AsyncIterator[str]:
    """Items of several async iterators as each comes. The first to fail ends it, raising that
    failure; the rest are cancelled."""
    queue: asyncio.Queue[tuple[str | None, BaseException | None]] = asyncio.Queue()

    async def pump(stream: AsyncIterator[str]) -> None:
        try:
            async for item in stream:
                await queue.put((item, None))
            await queue.put((None, None))
        except Exception as e:
            await queue.put((None, e))

    tasks = [asyncio.ensure_future(pump(s)) for s in streams]
    running = len(streams)
    try:
        while running:
            item, error = await queue.get()
            if error is not None:
                raise error
            if item is None:
                running -= 1
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _events(run: TurnRun, body: CompletionRequest, prompt_text: str, completion_id: str,
                  created: int, model: str, index: int) -> AsyncIterator[str]:
    """One choice's chunks, its finish chunk last."""
    tok = run.turn.manager.engine.tokenizer
    fingerprint = run.ctx.system_fingerprint
    opts = body.stream_options
    include_surprise = bool(opts and opts.include_surprise)

    def chunk(text: str, **extra) -> str:
        finish = extra.pop("finish_reason", None)
        logprobs = extra.pop("logprobs", None)
        c = Completion(id=completion_id, created=created, model=model, system_fingerprint=fingerprint,
                       choices=[CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish)],
                       **extra)
        return sse(dump(c))

    pending: list[TokenEvent] = []  # tokens not yet sent in a chunk (for their surprise)
    # (for their log-probabilities, when asked for: with the chunk that completes their text)
    sent = SentTokens(tok) if body.logprobs is not None else None
    completed: list[TokenEvent] = []
    # a token's text_offset is where its text starts in the choice's text, as in the whole
    # answer: counted over the tokens' decoded text, not over the text sent so far, which lags
    # behind while text that may begin a stop string is held back
    offsets = _Offsets(tok, len(prompt_text) if body.echo else 0)

    def logprobs_of(events: list[TokenEvent]) -> CompletionLogprobs | None:
        if body.logprobs is None or not events:
            return None
        return legacy_logprobs(tok, [e.token_id for e in events], [e.logprob for e in events],
                               [e.top for e in events], offsets)

    async for item in run.events():
        if isinstance(item, PromptAbsorbed):
            if body.echo or include_surprise:
                text = prompt_text if body.echo else ""
                logprobs = (legacy_logprobs(tok, item.token_ids, item.logprobs, item.top)
                            if body.echo and body.logprobs is not None else None)
                surprise = surprise_of(tok, item.token_ids, item.logprobs) if include_surprise else None
                yield chunk(text, logprobs=logprobs, surprise=surprise)
            continue
        if item.token_id >= 0:
            pending.append(item)
        if sent is not None:
            completed += sent.push(item)
        if not item.text and not include_surprise:
            continue
        yield chunk(item.text, logprobs=logprobs_of(completed),
                    surprise=surprise_of(tok, [e.token_id for e in pending], [e.logprob for e in pending])
                    if include_surprise else None)
        pending, completed = [], []
    info = await run.finish()
    # tokens that no chunk with text carried, and those whose text a stop string cut: their
    # log-probabilities close the stream (as in chat)
    yield chunk("", finish_reason=run.finish_reason, session=info,
                logprobs=logprobs_of(completed + (sent.rest() if sent else [])))
