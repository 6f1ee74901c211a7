"""/v1/sessions: list, inspect, delete, fork, export and import the caller's sessions.

Every route sees only the caller's tenant: another tenant's session with the same id is, to
it, a session that does not exist (404).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from server.auth import Sessions, Tenant
from server.schemas import ForkRequest, SessionDeleted, SessionId, SessionList, SessionObject
from server.stores.base import SessionMeta

router = APIRouter(tags=["sessions"])


def session_object(m: SessionMeta) -> SessionObject:
    return SessionObject(id=m.session_id, version=m.version, tokens_absorbed=m.tokens_absorbed, updates=m.updates,
                         state_bytes=m.state_bytes, created=int(m.created), updated=int(m.updated),
                         checkpoint=m.checkpoint, messages_logged=m.history_total,
                         last_update_norms=m.last_update_norms)


@router.get("/v1/sessions", response_model=SessionList)
async def list_sessions(tenant: Tenant, sessions: Sessions, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                        after: SessionId | None = None):
    page = await sessions.list(tenant, after, limit)
    data = [session_object(m) for m in page.sessions]
    return SessionList(data=data, has_more=page.has_more, first_id=data[0].id if data else None,
                       last_id=data[-1].id if data else None)


@router.get("/v1/sessions/{session_id}", response_model=SessionObject)
async def get_session(session_id: SessionId, tenant: Tenant,
                      sessions: Sessions):
    return session_object(await sessions.get(tenant, session_id))


@router.delete("/v1/sessions/{session_id}", response_model=SessionDeleted)
async def delete_session(session_id: SessionId, tenant: Tenant,
                         sessions: Sessions):
    await sessions.delete(tenant, session_id)
    return SessionDeleted(id=session_id)


@router.post("/v1/sessions/{session_id}/fork", response_model=SessionObject, status_code=201)
async def fork_session(session_id: SessionId, body: ForkRequest, tenant: Tenant,
                       sessions: Sessions):
    return session_object(await sessions.fork(tenant, session_id, body.new_id))


@router.get("/v1/sessions/{session_id}/state", response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}}}})
async def export_state(session_id: SessionId, tenant: Tenant,
                       sessions: Sessions) -> Response:
    record = await sessions.export(tenant, session_id)
    return Response(record.state, media_type="application/octet-stream", headers={
        "Content-Disposition": f'attachment; filename="{session_id}.safetensors"',
        "X-Session-Version": str(record.meta.version),
        "X-Session-Checkpoint": record.meta.checkpoint})


@router.put("/v1/sessions/{session_id}/state", response_model=SessionObject)
async def import_state(session_id: SessionId, request: Request, tenant: Tenant,
                       sessions: Sessions):
    """The body is the safetensors bytes of an export; it is validated (checkpoint, shapes,
    dtypes, size) and never unpickled. The session's message history starts over."""
    blob = await request.body()
    return session_object(await sessions.import_state(tenant, session_id, blob))
