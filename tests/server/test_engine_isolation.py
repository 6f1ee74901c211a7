"""The server with its scheduler in an engine process (HOPE_ENGINE_PROCESS): turns give what
they give in process, and an engine process killed mid-request fails that request with a 503,
commits nothing, and is replaced, after which the session continues from its last commit."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal

import pytest
import torch

from hope_core.engine_process import EngineProcess
from server.app import load_engine
from server.settings import Settings
from tests.server.support import running_app

pytestmark = pytest.mark.anyio

TURNS = ["Hello there, keeper of the light.", "What did the sea bring in tonight?"]


async def two_turns(engine, engine_process: bool) -> tuple[list[str], dict, bytes]:
    async with running_app(engine, engine_process=engine_process, threads=1) as api:
        assert isinstance(api.app.state.ctx.scheduler, EngineProcess) == engine_process
        replies = []
        for text in TURNS:
            out = await api.chat(text, session="s", max_tokens=20, temperature=0.8, seed=4)
            replies.append(out["choices"][0]["message"]["content"])
        meta = await api.session("s")
        blob = (await api.client.get("/v1/sessions/s/state")).content
        return replies, meta, blob


async def test_turns_in_the_engine_process_equal_turns_in_process(engine):
    remote, remote_meta, remote_blob = await two_turns(engine, True)
    local, local_meta, local_blob = await two_turns(engine, False)
    assert remote == local
    for key in ("version", "tokens_absorbed", "updates"):
        assert remote_meta[key] == local_meta[key], key
    a, b = engine.load_session(remote_blob).state.tensors(), engine.load_session(local_blob).state.tensors()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0, msg=name)


async def test_a_killed_engine_process_fails_the_request_and_commits_nothing(engine):
    async with running_app(engine, engine_process=True, threads=1) as api:
        proc = api.app.state.ctx.scheduler
        await api.chat("A first turn that is committed.", session="k")
        before = await api.session("k")

        async def kill_once_running() -> None:
            while proc.busy == 0:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)  # tokens are streaming
            os.kill(proc.pid, signal.SIGKILL)

        killer = asyncio.create_task(kill_once_running())
        r = await api.client.post("/v1/chat/completions", json={
            "model": api.model, "messages": [{"role": "user", "content": "Go on for a long while."}],
            "session_id": "k", "max_tokens": 4000, "ignore_eos": True, "stream": True})
        await killer
        assert r.status_code == 200  # the stream had begun: the error comes as its last event
        assert '"code": "engine_unavailable"' in r.text and r.text.rstrip().endswith("data: [DONE]")
        assert await api.session("k") == before  # nothing of the failed request was stored

        for _ in range(600):  # the replacement loads the checkpoint
            if (await api.client.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.1)
        assert proc.alive and proc.restarts == 1
        await api.chat("And a turn after the restart.", session="k")
        after = await api.session("k")
        assert after["version"] == before["version"] + 1
        assert after["tokens_absorbed"] > before["tokens_absorbed"]
        failures = await api.metrics()
        assert 'hope_request_failure_total{reason="engine_unavailable"} 1.0' in failures
        assert "hope_engine_process_exits_total 1.0" in failures


async def test_an_engine_process_that_cannot_restart_fails_the_liveness_probe(tiny_checkpoint, tmp_path):
    """Every restart fails (its checkpoint is gone): /healthz answers 503, so that the
    orchestrator replaces the server, which cannot serve again by itself."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    engine = load_engine(Settings(checkpoint=str(ckpt), device="cpu"))
    async with running_app(engine, engine_process=True, threads=1) as api:
        proc = api.app.state.ctx.scheduler
        proc.restart_delays_s = (0.05,)
        assert (await api.client.get("/healthz")).status_code == 200
        shutil.rmtree(ckpt)
        os.kill(proc.pid, signal.SIGKILL)
        for _ in range(600):
            if proc.failed:
                break
            await asyncio.sleep(0.1)
        r = await api.client.get("/healthz")
        assert r.status_code == 503 and r.json()["detail"] == {"engine": "the engine process could not be restarted"}
        assert (await api.client.get("/readyz")).status_code == 503
        await api.chat("Anyone there?", session="x", expect=503)
