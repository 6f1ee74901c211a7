"""Fixtures of the deploy tests: a tiny checkpoint, and one cluster shared by the tests that need
it: a Redis of its own (a free loopback port, append-only file in a temporary directory), two
`hope serve` replicas sharing it, and nginx running the repository's deploy/nginx/hope.conf
(rendered with loopback addresses) in front of them.

Tests that kill or stop a part of the cluster bring it back before they return, so the next
test finds it whole. Each test uses session ids of its own.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from tests.deploy.support import Cluster, HopeServer, Nginx, RedisServer, make_checkpoint, nginx_binary

torch.set_num_threads(1)  # two cores and a training job beside us

# the replicas' settings in these tests; everything else is the server's default
REPLICA_ENV = {
    "HOPE_LOCK_TTL_S": "2",  # a SIGKILLed replica's locks free themselves after 2 s
    "HOPE_BUSY_TIMEOUT_S": "30",
    "HOPE_SESSION_CACHE_SIZE": "64",
}


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("checkpoint"), seed=0)


@pytest.fixture(scope="session")
def foreign_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another checkpoint (other weights, so another fingerprint): its states are foreign."""
    return make_checkpoint(tmp_path_factory.mktemp("foreign-checkpoint"), seed=1)


def require_binaries(*names: str) -> None:
    for name in names:
        found = nginx_binary() if name == "nginx" else shutil.which(name)
        if not found:
            pytest.skip(f"{name} is not installed (Debian: apt-get install {name}; .ci/run installs it)")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Iterator[Cluster]:
    require_binaries("redis-server", "nginx")
    root = tmp_path_factory.mktemp("cluster")
    redis_server = RedisServer(root / "redis").start()
    prefix = f"hope-deploy-{uuid.uuid4().hex[:6]}"
    store = f"{redis_server.url}?prefix={prefix}"
    replicas = {name: HopeServer(checkpoint, store, root / f"{name}.log", **REPLICA_ENV).spawn()
                for name in ("hope-a", "hope-b")}  # the compose service names of deploy/nginx/hope.conf
    nginx = None
    try:
        for replica in replicas.values():
            replica.wait_ready()
        nginx = Nginx(root / "nginx", {name: r.port for name, r in replicas.items()}).start()
        model = httpx.get(f"{nginx.base_url}/v1/models", timeout=10).json()["data"][0]["id"]
    except BaseException:
        for p in [nginx, *replicas.values(), redis_server]:
            if p is not None:
                p.stop()
        raise
    c = Cluster(redis_server, replicas, nginx, model, prefix)
    yield c
    c.stop()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=httpx.Timeout(60, connect=5)) as c:
        yield c
