"""GET /v1/models: the one checkpoint this server serves."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from server.auth import Ctx, get_tenant
from server.errors import not_found
from server.schemas import ModelCard, ModelList

router = APIRouter(tags=["models"], dependencies=[Depends(get_tenant)])


@router.get("/v1/models", response_model=ModelList)
async def list_models(ctx: Ctx) -> ModelList:
    return ModelList(data=[ModelCard(id=ctx.model_id, created=ctx.created)])


@router.get("/v1/models/{model}", response_model=ModelCard)
async def get_model(model: str, ctx: Ctx) -> ModelCard:
    if model not in ctx.model_ids:
        raise not_found(f"model {model!r} is not served here", param="model", code="model_not_found")
    return ModelCard(id=ctx.model_id, created=ctx.created)
