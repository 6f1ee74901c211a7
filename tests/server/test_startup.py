"""`hope serve` that cannot start: a checkpoint it cannot load or a device this machine lacks is
one line and a non-zero exit, found before uvicorn starts, not a traceback inside a log line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.server.support import ROOT, ServerProcess, free_port


def serve(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOPE_LOG_LEVEL": "info", "OMP_NUM_THREADS": "1"}
    env.pop("HOPE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "hope.cli", "serve", "--host", "127.0.0.1",
                           "--port", str(free_port()), "--store", "memory://", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def spoiled(tiny_checkpoint: Path, tmp_path: Path, name: str, content: bytes) -> Path:
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in tiny_checkpoint.iterdir():
        (bad / f.name).write_bytes(content if f.name == name else f.read_bytes())
    return bad


@pytest.mark.parametrize("name, content, reason", [
    ("model.safetensors", b"", "model.safetensors is empty"),
    ("config.json", b"{not json", "config.json is not valid JSON"),
])
def test_a_checkpoint_that_cannot_be_loaded_is_one_line(name: str, content: bytes, reason: str,
                                                        tiny_checkpoint: Path, tmp_path: Path) -> None:
    bad = spoiled(tiny_checkpoint, tmp_path, name, content)
    r = serve("--checkpoint", str(bad), "--device", "cpu")
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert "Traceback" not in out
    (line,) = out.strip().splitlines()
    assert line.startswith(f"hope serve: error: {bad}: not a HOPE checkpoint: {reason}")


def test_a_device_this_machine_lacks_is_one_line(tiny_checkpoint: Path) -> None:
    r = serve("--checkpoint", str(tiny_checkpoint), "--device", "bogus")
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert out.strip().splitlines() == ["hope serve: error: --device bogus: not a device; use cpu, cuda or cuda:N"]


@pytest.mark.parametrize("env, threads", [({"OMP_NUM_THREADS": "2"}, "2"), ({"HOPE_THREADS": "3"}, "3")])
def test_the_scheduler_gets_the_threads_it_was_given(env: dict[str, str], threads: str,
                                                     tiny_checkpoint: Path, tmp_path: Path) -> None:
    """"One per core" is counted before loading the model leaves the main thread at one torch
    thread: a server that started after it ran its scheduler on one core."""
    server = ServerProcess(tiny_checkpoint, "memory://", tmp_path / "server.log", **env)
    try:
        info = next(line for line in httpx.get(f"{server.base_url}/metrics").text.splitlines()
                    if line.startswith("hope_model_info{"))
        assert f'threads="{threads}"' in info, info
    finally:
        server.stop()
