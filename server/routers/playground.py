"""GET /: the playground, a web page to talk to a session and watch its memory learn.

Plain HTML, CSS and JavaScript modules from server/static/ (no CDN, no build step), served by
the server itself. The page is a client of the public /v1 API like any other: it sends the API
key it is given, and sees only that key's sessions. `HOPE_PLAYGROUND=false` turns it off.
"""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from server.errors import not_found

router = APIRouter(tags=["playground"], include_in_schema=False)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
# a flat folder: no paths, no dot files, and names short enough that no OS refuses them
_ASSET = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}\.(js|css|svg)")
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
# the page loads nothing from elsewhere and talks only to this server
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_HEADERS = {"Cache-Control": "no-cache", "Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer"}


def _file(name: str) -> FileResponse:
    path = STATIC_DIR / name
    if not path.is_file():
        raise not_found(f"no playground file {name!r}")
    return FileResponse(path, media_type=_TYPES[path.suffix], headers=_HEADERS)


@router.get("/")
async def playground() -> FileResponse:
    return _file("index.html")


@router.get("/playground/{name}")
async def playground_asset(name: str) -> FileResponse:
    if not _ASSET.fullmatch(name):
        raise not_found(f"no playground file {name!r}")
    return _file(name)
