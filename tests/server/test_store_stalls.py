"""A store that does not answer a commit may still apply it (Redis stopped past the client's
5 s timeout runs the script it already received once it resumes). The server must then never
say "try again" (`store_unavailable`) for a commit that landed: a client that retries would have
its message absorbed twice."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import redis

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


async def test_a_caller_that_leaves_during_a_lock_attempt_orphans_no_lock(engine: Engine, tmp_path) -> None:
    """The client left while the store was granting the session's lock: the grant arrives after
    the caller is gone, and must be given back, not hold the session busy for a whole lease."""
    with own_redis(tmp_path) as (url, redis_proc):
        async with running_app(engine, url, busy_policy="reject") as api:
            await api.chat("before", session="s")
            sessions = api.app.state.ctx.sessions
            os.kill(redis_proc.pid, signal.SIGSTOP)
            try:
                attempt = asyncio.create_task(sessions.begin(DEFAULT_TENANT, "s"))
                await asyncio.sleep(0.3)  # its lock script is sent, Redis has not answered
                attempt.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await attempt
            finally:
                os.kill(redis_proc.pid, signal.SIGCONT)
            lock = redis.Redis.from_url(url)
            for _ in range(100):  # the late grant is given back as soon as it arrives
                if not lock.exists(api.app.state.ctx.store.key(DEFAULT_TENANT, "s", "lock")):
                    break
                await asyncio.sleep(0.02)
            lock.close()
            out = await api.chat("after", session="s")  # busy_policy reject: a held lock is a 409
            assert out["session"]["version"] == 2


async def test_a_request_cut_by_shutdown_during_its_commit_answers_what_was_stored(engine: Engine, tmp_path) -> None:
    """uvicorn cancels the requests still running past its graceful period, and asyncio's cancel
    passes anyio's shield. A commit already sent may still land: the answer must then not be
    "nothing was stored, send it again", which makes clients absorb the request twice. The
    request waits for its commit and, stored, answers as if nothing had happened."""
    with own_redis(tmp_path) as (url, _):
        async with running_app(engine, url) as api:
            await api.chat("before", session="s")
            store = redis.Redis.from_url(url)
            lock = api.app.state.ctx.store.key(DEFAULT_TENANT, "s", "lock")
            request = asyncio.create_task(api.client.post("/v1/chat/completions", json={
                "model": api.model, "session_id": "s", "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "user", "content": "cut by shutdown"}]}))
            while not store.exists(lock):  # the turn holds its lock: what is left to write is the commit
                await asyncio.sleep(0.005)
            store.execute_command("CLIENT", "PAUSE", "1500", "WRITE")  # the commit waits in Redis
            sessions = api.app.state.ctx.sessions
            while not any(t.work is not None and t.work.version > 1 for t in sessions.open_turns.values()):
                await asyncio.sleep(0.005)  # the commit is under way (its version is set)
            request.cancel()  # as uvicorn does
            r = await request
            version = (await api.session("s"))["version"]
            store.close()
    assert r.status_code == 200 and r.json()["session"]["version"] == version == 2, r.text
