"""Settings from the environment: API key specs that would fail open are refused, and no error
or log line repeats a secret."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import redis
from pydantic import ValidationError

from server.settings import Settings, parse_api_keys
from server.stores.base import redact_url
from tests.server.support import ROOT, ServerProcess, own_redis


def test_key_pairs() -> None:
    assert parse_api_keys(" acme:k1 , globex:k:2,acme:k3 ") == {"k1": "acme", "k:2": "globex", "k3": "acme"}
    assert parse_api_keys("") == {}


@pytest.mark.parametrize("spec", [",", " , ", ",,"])
def test_a_spec_without_pairs_is_not_no_keys(spec: str) -> None:
    """A template whose variables were empty ("${A},${B}") would otherwise turn auth off."""
    with pytest.raises(ValueError, match="no 'tenant:key' pair"):
        parse_api_keys(spec)


@pytest.mark.parametrize("spec", ["acme:k1,globex: k2", "acme:clé", "acme:a\tb"])
def test_keys_a_header_cannot_carry_are_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="printable ASCII"):
        parse_api_keys(spec)


def test_errors_do_not_repeat_the_keys() -> None:
    with pytest.raises(ValidationError) as err:
        Settings(api_keys="acme:S3CRET-acme,globex:S3CRET-globex,bad")
    assert "S3CRET" not in str(err.value)


def test_hope_serve_refuses_bad_keys_without_printing_them() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOPE_API_KEYS": "acme:S3CRET-acme,acme2:S3CRET-acme"}
    done = subprocess.run([sys.executable, "-m", "hope.cli", "serve"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0
    assert "two tenants" in done.stderr and "S3CRET" not in done.stderr + done.stdout


def test_store_urls_are_redacted() -> None:
    assert redact_url("redis://:pw1@h:6379/0?prefix=x") == "redis://:***@h:6379/0?prefix=x"
    assert redact_url("redis://user:pw1@h/0") == "redis://user:***@h/0"
    assert redact_url("redis://h/0?prefix=x&password=pw1") == "redis://h/0?prefix=x&password=***"
    assert redact_url("sqlite:///a/b.db") == "sqlite:///a/b.db"


def test_the_redis_password_stays_out_of_the_log(tiny_checkpoint, tmp_path) -> None:
    with own_redis(tmp_path) as (url, _):
        redis.Redis.from_url(url).config_set("requirepass", "S3cretRedisPw")
        server = ServerProcess(tiny_checkpoint, f"{url}?prefix=t&password=S3cretRedisPw",
                               tmp_path / "server.log", HOPE_LOG_LEVEL="info")
        server.stop()
    log = (tmp_path / "server.log").read_text()
    assert '"ready"' in log
    assert "password=***" in log and "S3cretRedisPw" not in log
