"""Fixtures for the server tests: a tiny checkpoint, apps in-process, servers as real processes.

Everything runs on the real thing: a real engine (a tiny random model), real SQLite files, the
Redis at 127.0.0.1:6379 (db 15, keys under a per-test prefix, deleted afterwards), and uvicorn
processes on free loopback ports. Helpers live in support.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from hope_core.checkpoint import load_checkpoint
from hope_core.engine import Engine
from server.app import load_engine
from server.settings import Settings
from tests.server.support import REDIS_URL, ServerProcess, delete_prefix, make_checkpoint, redis_available


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint"))


@pytest.fixture(scope="session")
def engine(tiny_checkpoint: Path) -> Engine:
    torch.set_num_threads(1)  # two cores, and a training job beside us
    return load_engine(Settings(checkpoint=str(tiny_checkpoint), device="cpu"))


@pytest.fixture(scope="session")
def other_engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """A second checkpoint (other weights, so another fingerprint): its states are foreign."""
    return Engine(load_checkpoint(make_checkpoint(tmp_path_factory.mktemp("other-checkpoint"), seed=1)))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def redis_store_url() -> Iterator[str]:
    """A redis:// store URL on db 15 with a prefix of its own; its keys are deleted afterwards."""
    if not redis_available():
        pytest.skip("no Redis at 127.0.0.1:6379")
    prefix = f"hopetest-{uuid.uuid4().hex[:8]}"
    yield f"{REDIS_URL}?prefix={prefix}"
    delete_prefix(REDIS_URL, prefix)


@pytest.fixture
def start_server(tiny_checkpoint: Path, tmp_path: Path) -> Iterator:
    """`start_server(store, **env)` starts a server process; all are stopped after the test."""
    started: list[ServerProcess] = []

    def start(store: str, **env: str) -> ServerProcess:
        server = ServerProcess(tiny_checkpoint, store, tmp_path / f"server-{len(started)}.log", **env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
