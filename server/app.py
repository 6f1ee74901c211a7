"""`create_app(settings)`: the FastAPI application. The lifespan loads the checkpoint (unless
given an engine, as `hope serve` does) and opens the store; the routes live in server.routers."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hope_core.checkpoint import load_checkpoint
from hope_core.engine import Engine
from hope_core.engine_process import EngineProcess
from hope_core.scheduler import Scheduler, StepStats
from server.auth import get_tenant
from server.context import Context
from server.errors import NO_RETRY, TURN_SCOPE_KEY, APIError, install_error_handlers
from server.metrics import Metrics
from server.routers import chat, completions, health, models, playground, sessions, tokenize
from server.sessions import SessionManager, Turn
from server.settings import Settings
from server.stores.base import StoreUnavailable, open_store, redact_url

log = logging.getLogger("hope.server")


def load_engine(settings: Settings, device: str | None = None) -> Engine:
    # only the scheduler's thread runs multi-threaded torch work (see hope_core.scheduler)
    torch.set_num_threads(1)
    device = device or settings.resolved_device()
    checkpoint = load_checkpoint(settings.checkpoint, device=device)
    engine = Engine(checkpoint, device=device)
    # the first absorb of a process pays one-off costs (allocator, kernels): pay them now, not
    # in the first user's time to first token
    engine.absorb(engine.new_session(), [engine.tokenizer.bos_id] * engine.cfg.chunk)
    return engine


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """The app; `engine` may be given (tests share one; `hope serve` loads it before starting
    uvicorn, so that a checkpoint it cannot use is a one-line error), else the lifespan loads the
    checkpoint."""
    settings = settings or Settings()
    ctx = Context(settings=settings, metrics=Metrics())
    threads = settings.threads or torch.get_num_threads()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # one torch thread on the event loop's thread, set before the scheduler's thread sets the
        # process's count to the cores: only the scheduler may run a multi-threaded OpenMP team
        # (see hope_core.scheduler). Without this, under HTTP load on 2 cores: 49-59 / 188-263 /
        # 273-341 tokens/s at 1 / 16 / 64 concurrent requests, against 78-84 / 336-338 / 337-388
        # with it (alternated server runs; docs/architecture.md).
        torch.set_num_threads(1)
        device = settings.resolved_device()
        separate = settings.engine_process  # the scheduler in a child process
        # with the engine in a child process, this one keeps a CPU copy of the model: the
        # tokenizer, fresh sessions, and decoding stored states (checked against the model)
        eng = engine or await asyncio.to_thread(load_engine, settings, "cpu" if separate else device)
        ctx.engine, ctx.model_id, ctx.created = eng, eng.checkpoint.name, int(time.time())
        ctx.metrics.model_info.info({
            "name": eng.checkpoint.name, "fingerprint": eng.fingerprint, "path": str(eng.checkpoint.path),
            "device": device, "engine_process": str(separate).lower(), "threads": str(threads),
            "d_model": str(eng.cfg.d_model),
            "n_layers": str(eng.cfg.n_layers),
            "window": str(eng.cfg.window), "state_dtype": settings.state_dtype})
        ctx.store = open_store(settings.store, ttl_s=settings.session_ttl_s)
        try:
            await ctx.store.ping()
        except StoreUnavailable as e:  # serve anyway: /readyz says so, requests get 503 until it is back
            log.warning("session store unreachable at start-up",
                        extra={"store": redact_url(settings.store), "error": str(e)})
        ctx.sessions = SessionManager(eng, ctx.store, settings, ctx.metrics)
        on_step = functools.partial(_count_step, ctx.metrics)
        if separate:
            ctx.scheduler = await asyncio.to_thread(
                EngineProcess(eng.checkpoint.path, eng.new_session().state, device,
                              slots=settings.max_concurrent_requests, max_batch=settings.max_batch_size,
                              prefill_tokens=settings.prefill_chunk_tokens, threads=threads,
                              vocab_size=eng.cfg.vocab_size, on_step=on_step,
                              on_exit=lambda _code: ctx.metrics.engine_exits.inc()).start)
        else:
            ctx.scheduler = Scheduler(eng, max_batch=settings.max_batch_size,
                                      prefill_tokens=settings.prefill_chunk_tokens, threads=threads,
                                      on_step=on_step).start()
        admission, scheduler = ctx.sessions.admission, ctx.scheduler
        ctx.metrics.read_requests_from(lambda: admission.running, lambda: admission.waiting,
                                       lambda: scheduler.queued)
        if not settings.auth_enabled and not settings.loopback_only:
            log.warning("no HOPE_API_KEYS set and listening beyond loopback: anyone who can reach "
                        f"{settings.host}:{settings.port} can read and change every session")
        state_bytes = eng.new_session().nbytes(settings.state_dtype)
        log.info("ready", extra={"model": ctx.model_id, "device": device, "engine_process": separate,
                                 "store": redact_url(settings.store), "state_bytes": state_bytes,
                                 "auth": settings.auth_enabled})
        try:
            yield
        finally:
            await ctx.sessions.close()
            await asyncio.to_thread(ctx.scheduler.stop)
            await ctx.store.close()

    app = FastAPI(title="HOPE memory server", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible chat and completions on sessions that keep learning.")
    app.state.ctx = ctx

    def count_failure(request: Request, reason: str) -> None:
        if request.url.path.startswith("/v1/") and not request.scope.get("hope.body_refused"):
            ctx.metrics.request_failure.labels(reason).inc()

    def authenticate(request: Request) -> None:
        if request.url.path.startswith("/v1/") or request.url.path in tokenize.TOKENIZER_PATHS:
            get_tenant(request, ctx)

    unexpected = install_error_handlers(app, count_failure, settings.overload_retry_after_s, authenticate)
    for module in (chat, completions, models, sessions, tokenize, health):
        app.include_router(module.router)
    if settings.playground:
        app.include_router(playground.router)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, state_limit=settings.max_state_bytes,
                       on_refuse=lambda: ctx.metrics.request_failure.labels("too_large").inc())
    app.add_middleware(LastAnswer, retry_after=settings.overload_retry_after_s, unexpected=unexpected,
                       on_shutdown=lambda: ctx.metrics.request_failure.labels("shutdown").inc())
    return app


def _count_step(metrics: Metrics, stats: StepStats) -> None:
    metrics.scheduler_steps.inc()
    metrics.step_seconds.observe(stats.seconds)
    metrics.prompt_tokens.inc(stats.prefill_tokens)  # as absorbed: a long prompt cut short counts too
    if stats.decoded:  # the sessions that took a token (not those waiting to commit)
        metrics.batch_size.observe(stats.decoded)


class LastAnswer:
    """The answer to a request that ended without one, given in OpenAI's format on a connection
    that stays usable, if nothing was sent yet.

    * An unexpected exception: the 500 of `unexpected` (server.errors). Starlette's own handler
      raises again after answering, uvicorn then drops the connection unannounced, and a
      keep-alive client (nginx's upstream pool) sends its next request into a reset socket, which
      nginx answers 502 for a POST it cannot retry.
    * A request still running when the server stops past its graceful period, which uvicorn
      cancels (and would answer with a plain-text 500): 503 `shutting_down`. Usually it committed
      nothing (its turn gave back its locks as it was cancelled): then Retry-After, since another
      replica can serve it. One cut during its commit waited for it (Turn.commit): if the commit
      was stored, or may have been, a retry would absorb the request twice, so the answer says so
      and asks for no retry (`x-should-retry: false`).
    """

    def __init__(self, app: ASGIApp, retry_after: int, unexpected, on_shutdown) -> None:
        self.app, self.retry_after, self.unexpected, self.on_shutdown = app, retry_after, unexpected, on_shutdown

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except (asyncio.CancelledError, Exception) as exc:
            if started:  # a response under way cannot become another: the connection must go
                raise
            if isinstance(exc, asyncio.CancelledError):
                # the cancellation has done its work (the request unwound); answering is all that is left
                self.on_shutdown()
                response = self.answer(scope.get(TURN_SCOPE_KEY)).response()
            else:
                response = await self.unexpected(Request(scope), exc)
            await response(scope, receive, send)

    def answer(self, turn: Turn | None) -> APIError:
        outcome = turn.interrupted_commit if turn is not None else None
        if outcome == "stored":
            return APIError(503, "the server shut down after this request was stored (the session absorbed it) "
                            "and before it could answer; do not send it again: the session's version shows it",
                            code="shutting_down", headers=NO_RETRY)
        if outcome == "unknown":
            return APIError(503, "the server shut down while storing this request, so whether it was stored is "
                            "unknown; read the session's version before sending it again",
                            code="store_outcome_unknown", headers=NO_RETRY)
        return APIError(503, "the server is shutting down; nothing was stored, send the request again",
                        code="shutting_down", headers={"Retry-After": str(self.retry_after)})


class BodyLimit:
    """413 for request bodies over the limit (state imports have their own, larger one), checked
    on Content-Length up front and counted while reading for chunked bodies."""

    def __init__(self, app: ASGIApp, limit: int, state_limit: int, on_refuse) -> None:
        self.app, self.limit, self.state_limit, self.on_refuse = app, limit, state_limit, on_refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        is_state = scope["method"] == "PUT" and scope["path"].endswith("/state")
        limit = self.state_limit if is_state else self.limit
        error = APIError(413, f"the request body exceeds {limit} bytes", code="body_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            self.on_refuse()
            return await error.response()(scope, receive, send)
        seen, refused = 0, False

        async def limited() -> Message:
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    refused = True
                    scope["hope.body_refused"] = True  # the app's own error answer is not counted
                    raise error  # stops the app reading; whatever it answers is dropped below
            return message

        async def guarded_send(message: Message) -> None:
            if not refused:
                await send(message)

        try:
            await self.app(scope, limited, guarded_send)
        except APIError:
            if not refused:
                raise
        if refused:
            self.on_refuse()
            await error.response()(scope, receive, send)
