"""Helpers of the server tests: apps in-process, servers as processes, Redis housekeeping."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from hope_core.engine import Engine
from server.app import create_app
from server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = "redis://127.0.0.1:6379/15"
TINY = dict(d_model=64, n_layers=2, n_heads=2, window=32, chunk=16, mid_period=32, mem_hidden=8,
            slow_hidden=128, mid_hidden=16, fast_hidden=8)


def make_checkpoint(path: Path, seed: int = 0, **overrides: Any) -> Path:
    """A tiny random checkpoint (its weights, and so its fingerprint, depend on `seed`)."""
    import torch

    from hope_core.checkpoint import save_checkpoint
    from hope_core.model import HopeConfig, HopeLM
    from hope_core.tokenizer import HopeTokenizer

    torch.manual_seed(seed)
    save_checkpoint(path, HopeLM(HopeConfig(**(TINY | overrides))), HopeTokenizer.default())
    return path


# ---- Redis ---------------------------------------------------------------------------------------

def redis_available() -> bool:
    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def delete_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


# ---- apps in-process -------------------------------------------------------------------------------

@dataclass
class Api:
    """An app with its lifespan running, and an httpx client talking to it in-process."""

    app: Any
    client: httpx.AsyncClient
    model: str

    async def chat(self, messages: list[dict] | str, session: str | None = None, expect: int = 200,
                   headers: dict[str, str] | None = None, **body: Any) -> dict:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        payload = {"model": self.model, "messages": messages, "max_tokens": 8, "temperature": 0, **body}
        if session is not None:
            payload["session_id"] = session
        r = await self.client.post("/v1/chat/completions", json=payload, headers=headers)
        assert r.status_code == expect, r.text
        return r.json()

    async def session(self, session_id: str, expect: int = 200, headers: dict[str, str] | None = None) -> dict:
        r = await self.client.get(f"/v1/sessions/{session_id}", headers=headers)
        assert r.status_code == expect, r.text
        return r.json()

    async def metrics(self) -> str:
        return (await self.client.get("/metrics")).text


@asynccontextmanager
async def running_app(engine: Engine, store: str = "memory://", headers: dict[str, str] | None = None,
                      **settings: Any) -> AsyncIterator[Api]:
    app = create_app(Settings(store=store, **settings), engine=engine)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://hope.test", headers=headers,
                                     timeout=60) as client:
            yield Api(app, client, app.state.ctx.model_id)


# ---- servers as processes ----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def own_redis(tmp_path: Path, *args: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """A redis-server of this test's own on a free loopback port (for tests that stop, fill
    or kill it), with extra command-line `args`; yields its URL and process, stops it after."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)
        client.close()
        yield f"redis://127.0.0.1:{port}/0", proc
    finally:
        proc.send_signal(signal.SIGCONT)  # a test may leave it stopped
        proc.terminate()
        proc.wait(timeout=10)


class ServerProcess:
    """`hope serve` in a process of its own, on a free loopback port."""

    def __init__(self, checkpoint: Path, store: str, log_path: Path, **env: str) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        environ = {**os.environ, "PYTHONPATH": str(ROOT), "HOPE_LOG_LEVEL": "warning", "OMP_NUM_THREADS": "1",
                   **env}
        cmd = [sys.executable, "-m", "hope.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--checkpoint", str(checkpoint), "--store", store, "--device", "cpu"]
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=environ, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log_path.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, only what was committed survives."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


