"""Probes and metrics: /healthz (alive: the engine can serve), /readyz (model loaded, engine up, store
reachable), /metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from hope_core.engine_process import EngineProcess
from server.auth import Ctx
from server.schemas import Health
from server.stores.base import StoreUnavailable

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz(ctx: Ctx):
    if isinstance(ctx.scheduler, EngineProcess) and ctx.scheduler.failed:
        # the engine process died and every restart failed: only a new server can serve again
        body = Health(status="unavailable", detail={"engine": "the engine process could not be restarted"})
        return JSONResponse(body.model_dump(), status_code=503)
    return Health(status="ok")


@router.get("/readyz", response_model=Health)
async def readyz(ctx: Ctx):
    problems = {}
    if ctx.engine is None:
        problems["model"] = "not loaded"
    if isinstance(ctx.scheduler, EngineProcess) and not ctx.scheduler.alive:
        problems["engine"] = ("the engine process could not be restarted" if ctx.scheduler.failed
                              else "the engine process is restarting")
    if ctx.store is None:
        problems["store"] = "not open"
    else:
        try:
            await ctx.store.ping()
        except StoreUnavailable as e:
            problems["store"] = str(e)
    if problems:
        body = Health(status="unavailable", detail=problems).model_dump()
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(ctx.settings.overload_retry_after_s)})
    return Health(status="ready")


@router.get("/metrics")
async def metrics(ctx: Ctx) -> Response:
    return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)
