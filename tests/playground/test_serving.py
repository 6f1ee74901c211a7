"""The playground as files and the server changes it needs, without a browser: the page and its
assets come from the server itself (nothing from elsewhere, small), and a session's info carries
the last update norm of each memory level."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from pathlib import Path

import httpx
import pytest

from server.app import create_app
from server.settings import Settings
from server.stores.base import SessionMeta, SessionRecord
from server.stores.sqlite import SQLiteStore
from tests.server.support import ServerProcess

STATIC = Path(__file__).resolve().parents[2] / "server" / "static"


def test_page_and_assets_come_from_the_server(server: ServerProcess) -> None:
    page = httpx.get(f"{server.base_url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "default-src 'none'" in csp
    refs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert refs and all(ref.startswith("/playground/") or ref.startswith("data:") for ref in refs), refs

    # every module the page loads, and every module they import, is served from here
    total, todo, seen = len(page.content), [r for r in refs if r.startswith("/playground/")], set()
    while todo:
        ref = todo.pop()
        if ref in seen:
            continue
        seen.add(ref)
        r = httpx.get(f"{server.base_url}{ref}")
        assert r.status_code == 200, ref
        assert r.headers["content-type"].startswith("text/javascript" if ref.endswith(".js") else "text/css")
        assert "http://" not in r.text and "https://" not in r.text, f"{ref} refers to another host"
        total += len(r.content)
        todo += [f"/playground/{name}" for name in re.findall(r'from "\./([a-z0-9_-]+\.js)"', r.text)]
    assert {"/playground/app.js", "/playground/api.js", "/playground/sse.js", "/playground/tokens.js",
            "/playground/plot.js", "/playground/style.css"} <= seen
    assert total < 80_000, f"the page weighs {total} bytes"
    assert {p.name for p in STATIC.iterdir()} == {Path(ref).name for ref in seen} | {"index.html"}


@pytest.mark.parametrize("path", ["/playground/index.html", "/playground/nope.js", "/playground/..%2Fapp.py",
                                  "/playground/.hidden.js", "/playground/app.py",
                                  f"/playground/{'a' * 300}.js"])  # beyond what a file name may be
def test_only_the_playground_files_are_served(server: ServerProcess, path: str) -> None:
    r = httpx.get(f"{server.base_url}{path}")
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "not_found_error"


def test_the_playground_can_be_turned_off() -> None:
    async def get(playground: bool) -> int:
        app = create_app(Settings(store="memory://", playground=playground))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hope.test") as client:
            return (await client.get("/")).status_code

    assert asyncio.run(get(True)) == 200
    assert asyncio.run(get(False)) == 404


def test_session_info_has_the_last_update_norms(server: ServerProcess) -> None:
    base, sid = server.base_url, f"norms-{time.monotonic_ns()}"
    body = {"model": "hope", "session_id": sid, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 3}]}
    assert httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60).status_code == 200
    info = httpx.get(f"{base}/v1/sessions/{sid}").json()
    norms = info["last_update_norms"]
    assert {"titans", "fast", "mid"} <= set(norms), info  # 40+ tokens: every level was updated
    assert all(0 < n < 100 for n in norms.values())
    assert info["updates"]["fast"] >= 2

    # a learn=false turn changes nothing; a fork keeps the norms; an imported state starts over
    assert httpx.post(f"{base}/v1/chat/completions", json={**body, "learn": False}, timeout=60).status_code == 200
    assert httpx.get(f"{base}/v1/sessions/{sid}").json()["last_update_norms"] == norms
    fork = httpx.post(f"{base}/v1/sessions/{sid}/fork", json={"new_id": f"{sid}-fork"}).json()
    assert fork["last_update_norms"] == norms
    blob = httpx.get(f"{base}/v1/sessions/{sid}/state").content
    imported = httpx.put(f"{base}/v1/sessions/{sid}-imported/state", content=blob).json()
    assert imported["last_update_norms"] == {} and imported["tokens_absorbed"] == info["tokens_absorbed"]
    for s in (sid, f"{sid}-fork", f"{sid}-imported"):
        assert httpx.delete(f"{base}/v1/sessions/{s}").status_code == 200


def test_a_sqlite_file_from_before_the_norms_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE sessions (
            tenant TEXT NOT NULL, session_id TEXT NOT NULL, uid TEXT NOT NULL, version INTEGER NOT NULL,
            created REAL NOT NULL, updated REAL NOT NULL, tokens_absorbed INTEGER NOT NULL,
            updates TEXT NOT NULL, state_bytes INTEGER NOT NULL, checkpoint TEXT NOT NULL,
            dtype TEXT NOT NULL, history_total INTEGER NOT NULL, expires REAL NOT NULL,
            PRIMARY KEY (tenant, session_id));
        CREATE TABLE blobs (tenant TEXT NOT NULL, session_id TEXT NOT NULL, state BLOB NOT NULL,
            history BLOB NOT NULL, PRIMARY KEY (tenant, session_id));
        INSERT INTO sessions VALUES ('default', 'old', 'u1', 3, 1.0, 2.0, 99, '{"fast": 6}', 10, 'fp', 'float32',
                                     4, 0);
        INSERT INTO blobs VALUES ('default', 'old', x'00', x'');
    """)
    db.close()

    async def check() -> None:
        store = SQLiteStore(f"sqlite:///{path}")
        try:
            old = await store.get_meta("default", "old")
            assert old is not None and old.version == 3 and old.last_update_norms == {}
            meta = SessionMeta(tenant="default", session_id="old", uid="u1", version=4, created=1.0, updated=3.0,
                               tokens_absorbed=120, updates={"fast": 7}, state_bytes=1, checkpoint="fp",
                               dtype="float32", history_total=6, last_update_norms={"fast": 0.25})
            assert await store.commit(SessionRecord(meta, b"", b"\x01"), 3, None)
            again = await store.get_meta("default", "old")
            assert again is not None and again.last_update_norms == {"fast": 0.25}
        finally:
            await store.close()

    asyncio.run(check())
