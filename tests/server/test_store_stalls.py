"""A store that does not answer a commit may still apply it (Redis stopped past the client's
5 s timeout runs the script it already received once it resumes). The server must then never
say "try again" (`store_unavailable`) for a commit that landed: a client that retries would have
its message absorbed twice."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from hope_core.engine import Engine
from server.errors import APIError
from server.settings import DEFAULT_TENANT
from tests.server.support import own_redis, running_app

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("resume_after_s", [5.5, None])
async def test_a_stalled_commit_is_answered_by_what_the_store_holds(engine: Engine, tmp_path,
                                                                     resume_after_s: float | None) -> None:
    with own_redis(tmp_path) as (url, redis_proc):
        async with running_app(engine, url) as api:
            await api.chat("before the stall", session="s")
            sessions = api.app.state.ctx.sessions
            turn = await sessions.begin(DEFAULT_TENANT, "s")
            os.kill(redis_proc.pid, signal.SIGSTOP)
            if resume_after_s is not None:  # it wakes while the server asks what became of the commit
                asyncio.get_running_loop().call_later(resume_after_s, os.kill, redis_proc.pid, signal.SIGCONT)
            try:
                await turn.commit()
                outcome = "stored"
            except APIError as e:
                outcome = e.code
                # a client must not retry blindly what may be stored; "not stored" may be retried
                assert (e.headers.get("x-should-retry") == "false") == (outcome == "store_outcome_unknown")
            finally:
                await turn.release()
            os.kill(redis_proc.pid, signal.SIGCONT)
            stored = (await api.session("s"))["version"]
            print(f"\nRedis resumed after {resume_after_s} s: the server said {outcome!r}, "
                  f"the store holds version {stored}")
            assert (outcome, stored) in {("stored", 2), ("store_unavailable", 1),
                                         ("store_outcome_unknown", 1), ("store_outcome_unknown", 2)}
            if resume_after_s is None:  # never asked back: the server cannot know
                assert outcome == "store_outcome_unknown"
            else:
                assert outcome != "store_outcome_unknown"


async def test_a_full_redis_answers_store_full(engine: Engine, tmp_path) -> None:
    """Redis at maxmemory (noeviction) refuses the commit whole: 503 `store_full` with Retry-After,
    not "unreachable", and the refused turn left nothing."""
    with own_redis(tmp_path, "--maxmemory", "3mb", "--maxmemory-policy", "noeviction") as (url, _):
        async with running_app(engine, url) as api:
            for i in range(300):
                r = await api.client.post("/v1/chat/completions", json={
                    "model": api.model, "messages": [{"role": "user", "content": "fill"}], "max_tokens": 2,
                    "session_id": f"s{i}"})
                if r.status_code != 200:
                    break
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "store_full" and int(r.headers["retry-after"]) >= 1
            assert (await api.client.get(f"/v1/sessions/s{i}")).status_code == 404
