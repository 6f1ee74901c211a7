"""What chat and completions share: request checks, running a turn on the engine, SSE plumbing.

A turn's engine work is a job for the engine's scheduler (server.worker), batched with every
other request's: absorb the prompt, generate token by token (each token absorbed as it is
produced), and for chat close the assistant's turn. The
async side receives the prompt's log-probabilities and then each `TokenEvent` as it is made,
streams them, and commits the session only after the last one, if the client is still there.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from hope_core.engine import PromptAbsorbed, TokenEvent
from hope_core.engine_process import EngineDied
from hope_core.sampling import SamplingParams
from hope_core.scheduler import Job, JobResult, NotAdmitted
from server.context import Context
from server.errors import TURN_SCOPE_KEY, APIError, bad_request, engine_unavailable, not_found, overloaded
from server.schemas import SamplingFields, SessionInfo, Surprise
from server.sessions import SessionManager, Turn
from server.stores.base import valid_session_id
from server.worker import JobStream, Stopped

log = logging.getLogger("hope.server")


# ---- request checks --------------------------------------------------------------------------

def check_model(ctx: Context, model: str) -> str:
    if model not in ctx.model_ids:
        raise not_found(f"model {model!r} is not served here; GET /v1/models lists it", param="model",
                        code="model_not_found")
    return ctx.model_id


HASHED_USER = "user-"  # the prefix of sessions named by a hashed OpenAI `user`


def resolve_session_id(body_id: str | None, header_id: str | None, user: str | None) -> str | None:
    """The session is `session_id` (or the X-Session-Id header), else `user`, else ephemeral.

    OpenAI's `user` is any string an application picked for its end user ("John Smith",
    an e-mail with a space): one that is not a valid session id names the session
    `user-<first 32 hex digits of its SHA-256>`, so that the same user keeps one memory. So
    does one that starts with `user-` itself: an end user who picks "user-<that hash>" as a
    name must not reach John Smith's memory."""
    # an empty id is a client's bug (an unset variable), not a wish to forget: refused below,
    # where running it as an ephemeral session would drop its memory without a word
    user = user or None
    if body_id and header_id and body_id != header_id:
        raise bad_request("session_id and the X-Session-Id header name different sessions", param="session_id")
    if body_id is None and header_id is None and user is not None and (
            not valid_session_id(user) or user.startswith(HASHED_USER)):
        return HASHED_USER + hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    sid, param = ((body_id, "session_id") if body_id is not None else (header_id, "X-Session-Id")
                  if header_id is not None else (user, "user"))
    if sid is not None and not valid_session_id(sid):
        raise bad_request(f"{param} must be 1-128 characters of letters, digits and . _ - @ + "
                          "(not starting with '.')", param=param, code="invalid_session_id")
    return sid


def sampling_params(ctx: Context, req: SamplingFields, max_tokens: int | None, param: str,
                    stop_token_ids: Sequence[int], default: int | None = None,
                    top_logprobs: int = 0) -> SamplingParams:
    """`default`: the max_tokens of a request that gives none (HOPE_DEFAULT_MAX_TOKENS unless
    set), capped by the limit: a request is never refused for a number it did not send."""
    s = ctx.settings
    default = s.default_max_tokens if default is None else default
    n = min(default, s.max_tokens_limit) if max_tokens is None else max_tokens
    if n > s.max_tokens_limit:
        raise bad_request(f"{param} is {n}, the most this server generates is {s.max_tokens_limit}",
                          param=param, code="max_tokens_too_large")
    return SamplingParams(max_tokens=n, temperature=1.0 if req.temperature is None else req.temperature,
                          top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k, seed=req.seed,
                          stop=list(req.stop or []), stop_token_ids=[] if req.ignore_eos else list(stop_token_ids),
                          top_logprobs=top_logprobs)


def check_prompt_chars(ctx: Context, tokenizer, n_chars: int, param: str) -> None:
    """Refuse, before encoding it, a text too long to fit: encoding holds the GIL (2 s for the
    4 MB a body may carry), stalling every stream. Each token covers at most `max_token_bytes`
    bytes, and a character is at least one byte, so this text is more tokens than allowed."""
    if n_chars > ctx.settings.max_prompt_tokens * tokenizer.max_token_bytes:
        raise bad_request(f"the prompt has {n_chars} characters, more than the {ctx.settings.max_prompt_tokens} "
                          "tokens one request may absorb", param=param, code="context_length_exceeded")


def check_token_ids(tokenizer, ids: Sequence[int], param: str) -> None:
    """Token ids a client sent (a completions prompt, /detokenize) must be the tokenizer's."""
    if any(not 0 <= t < tokenizer.vocab_size for t in ids):
        raise bad_request(f"a token id is outside the vocabulary (0 to {tokenizer.vocab_size - 1})", param=param)


def check_prompt_size(ctx: Context, n_tokens: int, param: str) -> None:
    """A session has no context length (its history is in its weights), but one request absorbs
    at most `max_prompt_tokens` new tokens. Refused as OpenAI refuses a prompt beyond the context
    (400 `context_length_exceeded`), which clients catch to send less."""
    if n_tokens > ctx.settings.max_prompt_tokens:
        raise bad_request(f"the prompt has {n_tokens} new tokens, the most one request may absorb is "
                          f"{ctx.settings.max_prompt_tokens}", param=param, code="context_length_exceeded")


# ---- the engine side of a turn (runs in the scheduler, batched with other requests) ------------

@dataclass
class Plan:
    prompt: list[int]  # tokens to absorb before generating
    params: SamplingParams
    learn: bool
    close_turn: int | None = None  # chat: absorbed after a reply that did not end on a stop token
    prompt_alternatives: int = 0  # completions' echo: the most likely tokens at each prompt token
    # a reply that sends nothing until it ends (not a stream, which sends keep-alives) may wait
    # only this long for a row of the batch, as for an engine slot (Admission.acquire)
    admit_within_s: float | None = None


# ---- the async side --------------------------------------------------------------------------

class TurnRun:
    """Runs a plan on a turn's working copy; `events()` yields PromptAbsorbed then TokenEvents."""

    def __init__(self, ctx: Context, turn: Turn, plan: Plan, started: float) -> None:
        assert ctx.scheduler is not None and turn.work is not None
        self.ctx, self.turn, self.plan, self.started = ctx, turn, plan, started
        # a reply cut by max_tokens or a stop string is closed with <|end|>, so the stream reads
        # exactly as if the client re-sent the reply as an assistant message
        job = Job(turn.work, plan.prompt, plan.params, plan.learn, close_turn=plan.close_turn,
                  prompt_alternatives=plan.prompt_alternatives, admit_within_s=plan.admit_within_s)
        try:
            self.stream = JobStream(ctx.scheduler, job)
        except EngineDied:
            raise engine_unavailable(ctx.settings.overload_retry_after_s) from None
        self.output: JobResult | None = None  # set once the job has finished
        self._last_token: float | None = None

    async def events(self) -> AsyncIterator[PromptAbsorbed | TokenEvent]:
        m = self.ctx.metrics
        n_tokens = 0
        async for item in self._items():
            # the engine's work is counted as it is done, as TTFT and ITL are, also for a
            # request that then commits nothing (a client gone, a conflict, the engine lost);
            # prompt tokens by each scheduler step that absorbs them (server.app._count_step)
            if isinstance(item, TokenEvent):
                if n_tokens >= self.plan.params.max_tokens:
                    # the engine's final flush of held-back text repeats the last token's id:
                    # pass it on as text only (token_id -1), so no token is counted twice
                    yield TokenEvent(-1, item.text, 0.0)
                    continue
                n_tokens += 1
                m.generation_tokens.inc()
                now = time.perf_counter()
                if self._last_token is None:
                    m.ttft.observe(now - self.started)
                else:
                    m.itl.observe(now - self._last_token)
                self._last_token = now
            yield item
        if self.stream.stop_event.is_set():  # the client left after the last token: no commit
            raise Stopped
        self.output = self.stream.result

    async def _items(self) -> AsyncIterator[PromptAbsorbed | TokenEvent]:
        try:
            async for item in self.stream:
                yield item
        except EngineDied:  # the job failed as a whole: nothing was committed
            raise engine_unavailable(self.ctx.settings.overload_retry_after_s) from None
        except NotAdmitted as e:  # it never ran: nothing was absorbed
            raise overloaded(f"{e}; try again shortly", self.ctx.settings.overload_retry_after_s) from None

    def stop(self) -> None:
        self.stream.stop()

    async def finish(self, new_digests: Sequence[bytes] = ()) -> SessionInfo:
        """Commit (when the turn persists) and count the request as a success."""
        out, turn, m = self.output, self.turn, self.ctx.metrics
        assert out is not None and turn.work is not None
        # per level, the last update of this request (records come in the order they were made)
        meta = await turn.commit(new_digests, update_norms={u.level: u.update_norm for u in out.updates})
        m.observe_updates(out.updates)
        m.request_success.labels(self.finish_reason).inc()
        m.e2e.observe(time.perf_counter() - self.started)
        if meta is not None:
            return SessionInfo(id=meta.session_id, version=meta.version, tokens_absorbed=meta.tokens_absorbed,
                               learned=True)
        if turn.meta is not None:  # learn=false on a stored session: it stays as it was
            return SessionInfo(id=turn.session_id, version=turn.meta.version,
                               tokens_absorbed=turn.meta.tokens_absorbed, learned=False)
        return SessionInfo(id=turn.session_id, version=None, tokens_absorbed=turn.work.tokens_absorbed,
                           learned=self.plan.learn)

    @property
    def finish_reason(self) -> str:
        out = self.output
        return out.generation.finish_reason if out and out.generation else "length"

    async def aclose(self) -> None:
        await self.stream.aclose()


async def collect(request: Request, *runs: TurnRun) -> None:
    """Run non-streaming turns (of one request) to their end together, stopping them all if the
    client disconnects meanwhile, or if one fails."""
    watcher = asyncio.create_task(_wait_disconnect(request))
    watcher.add_done_callback(lambda t: t.cancelled() or [run.stop() for run in runs])
    drains = [asyncio.ensure_future(_drain(run)) for run in runs]
    try:
        await asyncio.gather(*drains)
    finally:
        watcher.cancel()
        for d in drains:
            d.cancel()
        for run in runs:
            await run.aclose()


async def _drain(run: TurnRun) -> None:
    async for _ in run.events():
        pass


async def begin_turn(request: Request, sessions: SessionManager, tenant: str, session_id: str | None,
                     learn: bool) -> Turn:
    """`sessions.begin`, given up as soon as the client goes away: a request queued for an engine
    slot or for a busy session must not keep its place in the queue (which turns live clients
    away with 429, and counts in the waiting gauge autoscaling reads) for a client that left."""
    begin = asyncio.ensure_future(sessions.begin(tenant, session_id, learn=learn))
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({begin, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this request is cancelled itself (shutdown)
        gone.cancel()
        await _abandon(begin)
        raise
    gone.cancel()
    if begin.done():
        turn = begin.result()
        request.scope[TURN_SCOPE_KEY] = turn  # for the answer to a request that fails after it began
        return turn
    await _abandon(begin)
    raise client_closed()


async def _abandon(begin: asyncio.Future[Turn]) -> None:
    """Cancel a `begin` (which then gives back what it took); a turn it got all the same is
    released."""
    begin.cancel()
    with anyio.CancelScope(shield=True):
        try:
            turn = await begin
        except BaseException:
            return
        await turn.release()


def client_closed() -> APIError:
    """Nobody reads this answer; it is counted (`disconnected`) and logged as one."""
    return APIError(499, "the client closed the request", code="client_closed", reason="disconnected")


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class SentTokens:
    """Which generated tokens a stream's text has caught up with. Text that may begin a stop
    string is held back, so a chunk's text can lag behind its tokens: a chunk carries the
    log-probabilities of the tokens whose text it completes, and tokens whose text a stop
    string cut go with the stream's last chunk (`rest`)."""

    def __init__(self, tokenizer) -> None:
        self.decoder = tokenizer.stream_decoder(skip_special=True)  # as the engine's TextStream
        self.decoded = self.sent = 0  # characters: of the tokens' text, of the text sent
        self.waiting: deque[tuple[TokenEvent, int]] = deque()  # (token, where its text ends)

    def push(self, event: TokenEvent) -> list[TokenEvent]:
        """Account for an event about to be sent; returns the tokens whose text it completes."""
        if event.token_id >= 0:
            self.decoded += len(self.decoder.push(event.token_id))
            self.waiting.append((event, self.decoded))
        self.sent += len(event.text)
        done = []
        while self.waiting and self.waiting[0][1] <= self.sent:
            done.append(self.waiting.popleft()[0])
        return done

    def rest(self) -> list[TokenEvent]:
        done = [event for event, _ in self.waiting]
        self.waiting.clear()
        return done


def surprise_of(tokenizer, token_ids: Sequence[int], logprobs: Sequence[float]) -> Surprise:
    return Surprise(tokens=[tokenizer.decode([t]) for t in token_ids], loss=[-lp for lp in logprobs])


def count_failure(ctx: Context, reason: str) -> None:
    ctx.metrics.request_failure.labels(reason).inc()


# ---- server-sent events ----------------------------------------------------------------------

async def guarded_stream(ctx: Context, runs: Sequence[TurnRun], events: AsyncIterator[str],
                         what: str) -> AsyncIterator[str]:
    """The failure rules every SSE stream shares, around the events a route produces from its
    turns (one, or one per prompt).

    Once a stream has begun its status is sent, so an error (a version conflict at commit, a bug)
    goes out as a `data: {"error": ...}` event before `[DONE]`; a client that left gets nothing
    and nothing is committed. The turns' workers and locks are always released.
    """
    try:
        async for event in events:
            yield event
    except Stopped:  # the client left after the last token: nothing was committed
        count_failure(ctx, "disconnected")
    except APIError as e:
        count_failure(ctx, e.reason)
        yield sse_error(e)
        yield sse("[DONE]")
    except Exception:
        log.exception("%s stream failed", what)
        count_failure(ctx, "internal")
        yield sse_error(APIError(500, "internal server error", code="internal_error"))
        yield sse("[DONE]")
    except BaseException:  # cancelled: the client disconnected mid-stream; nothing is committed
        count_failure(ctx, "disconnected")
        raise
    finally:
        for run in runs:
            await run.aclose()
            await run.turn.release()


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def sse_error(err: APIError) -> str:
    return sse(err.body())


KEEPALIVE = b": keep-alive\n\n"  # an SSE comment: clients skip it


class EventStream(StreamingResponse):
    """SSE whose body generator is cancelled the moment the client disconnects.

    Starlette listens for the disconnect only for ASGI spec < 2.4 servers and otherwise notices
    it at the next write; a generation must stop at once either way, so this response always
    listens, and always closes the body generator (running its cleanup) before returning.

    After `keepalive_s` without a write it sends a comment, from a task of its own beside the
    body generator's (which is never interrupted for it): a proxy that times out silent upstreams
    (nginx reads with one timeout) then cuts only a server that is frozen, not one absorbing a
    long prompt.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], keepalive_s: float = 0, **kwargs: Any) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **kwargs.pop("headers", {})}
        super().__init__(content, headers=headers, **kwargs)
        self.keepalive_s = keepalive_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        wire = _Wire(send)
        try:
            async with anyio.create_task_group() as tg:
                async def stream_then_stop() -> None:
                    try:
                        await self.stream_response(wire.send)
                    except OSError:  # the socket closed under us: same as a disconnect
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(stream_then_stop)
                if self.keepalive_s > 0:
                    tg.start_soon(wire.keep_alive, self.keepalive_s)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
                if self.background is not None:
                    await self.background()


class _Wire:
    """An ASGI `send` shared by the response and its keep-alive: one message at a time, and
    comments only between the headers and the last body message."""

    def __init__(self, send: Send) -> None:
        self._send, self._lock = send, anyio.Lock()
        self._last: float | None = None  # when the last message went out (None: no headers yet)
        self._ended = False

    async def send(self, message: Message) -> None:
        async with self._lock:
            await self._send(message)
            self._last = anyio.current_time()
            self._ended = message["type"] == "http.response.body" and not message.get("more_body", False)

    async def keep_alive(self, every: float) -> None:
        while True:
            due = (self._last or anyio.current_time()) + every
            await anyio.sleep(max(due - anyio.current_time(), 0))
            async with self._lock:
                if self._ended:
                    return
                if self._last is not None and anyio.current_time() - self._last >= every:
                    await self._send({"type": "http.response.body", "body": KEEPALIVE, "more_body": True})
                    self._last = anyio.current_time()
