"""Dependencies: the app's context, and the tenant an API key belongs to.

With `HOPE_API_KEYS` set, every /v1 route needs `Authorization: Bearer <key>`, and the key
decides the tenant whose sessions the request sees. Without keys there is one tenant.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from server.context import Context
from server.errors import APIError
from server.sessions import SessionManager
from server.settings import DEFAULT_TENANT


def get_ctx(request: Request) -> Context:
    return request.app.state.ctx


Ctx = Annotated[Context, Depends(get_ctx)]


def get_sessions(ctx: Ctx) -> SessionManager:
    if ctx.sessions is None:  # only before start-up finished
        raise APIError(503, "the server is starting", code="starting", headers={"Retry-After": "1"})
    return ctx.sessions


def get_tenant(request: Request, ctx: Ctx) -> str:
    keys = ctx.settings.keys
    if not keys:
        return DEFAULT_TENANT
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    given = given.strip()
    if scheme.lower() != "bearer" or not given:
        raise APIError(401, "an API key is required: send 'Authorization: Bearer <key>'",
                       code="missing_api_key", headers={"WWW-Authenticate": "Bearer"})
    tenant = None
    for key, owner in keys.items():  # compare with every key: the time taken says nothing
        if hmac.compare_digest(key.encode(), given.encode()):
            tenant = owner
    if tenant is None:
        raise APIError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return tenant


# Annotated dependencies for route signatures
Sessions = Annotated[SessionManager, Depends(get_sessions)]
Tenant = Annotated[str, Depends(get_tenant)]
