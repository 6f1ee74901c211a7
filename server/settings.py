"""Server settings, read from the environment (`HOPE_*`) and overridden by `hope serve` flags."""

from __future__ import annotations

import ipaddress
import os
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.stores.base import valid_tenant

DEFAULT_TENANT = "default"


def default_store_url() -> str:
    """The embedded store: one SQLite file in the user's data directory (XDG), so sessions
    survive restarts and do not depend on the directory the server was started from."""
    data = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return f"sqlite:///{data / 'hope' / 'sessions.db'}"


class Settings(BaseSettings):
    # errors never echo the values: HOPE_API_KEYS and HOPE_STORE hold secrets
    model_config = SettingsConfigDict(env_prefix="HOPE_", extra="ignore", hide_input_in_errors=True)

    host: str = "127.0.0.1"
    port: int = 8000
    checkpoint: str | None = None  # a checkpoint directory; None: the bundled one
    store: str = Field(default_factory=default_store_url)  # memory:// | sqlite:///path | redis://...
    device: str = "auto"  # auto: CUDA when present, else CPU
    api_keys: str = ""  # "tenant:key,tenant:key"; empty: no auth, one tenant
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    playground: bool = True  # the web page at / (static files; it uses the API like any client)

    # limits: each over-limit request is refused before it changes anything
    max_concurrent_requests: int = Field(64, ge=1)  # requests in the engine at once (429 beyond the queue)
    max_waiting_requests: int = Field(32, ge=0)  # queued for a slot or a session (429 beyond)
    max_prompt_tokens: int = Field(8192, ge=1)  # new tokens one request absorbs (400 beyond)
    max_tokens_limit: int = Field(4096, ge=1)  # largest max_tokens a request may ask for (400 beyond)
    default_max_tokens: int = Field(256, ge=1)  # when a request gives none (capped by the limit)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)  # JSON bodies (413 beyond)
    max_state_bytes: int = Field(64 * 1024 * 1024, ge=1024)  # imported/stored state blobs (413 beyond)
    overload_retry_after_s: int = Field(1, ge=1)  # Retry-After of 429 and 503 answers
    # an SSE comment after this long without an event (a long prompt, a slow step), so that a
    # proxy's read timeout tells a quiet stream from a frozen server; 0: never
    sse_keepalive_s: float = Field(10.0, ge=0)

    # sessions
    session_ttl_s: float = Field(30 * 86400, ge=0)  # idle time before a session expires; 0: never
    busy_policy: Literal["wait", "reject"] = "wait"  # second request on a busy session: queue or 409
    busy_timeout_s: float = Field(60.0, gt=0)  # how long a queued request waits (a busy session: 409; a slot: 429)
    lock_ttl_s: float = Field(30.0, gt=0)  # lease of a session lock; renewed while the request runs
    state_dtype: Literal["float32", "bfloat16"] = "float32"  # floats in stored states
    # the session cache: decoded states kept in memory (on the engine's device), least recently
    # used evicted first, each used only if the store still holds its exact version
    session_cache_bytes: int = Field(512 * 1024 * 1024, ge=0)  # bound on their in-memory bytes; 0: no cache
    session_cache_size: int = Field(4096, ge=0)  # and on their number; 0: no cache
    history_max_messages: int = Field(4096, ge=1)  # message digests kept per session for dedup

    # the scheduler: sessions advance together, one batched step at a time
    threads: int = Field(0, ge=0)  # torch CPU threads of the engine's scheduler; 0: one per core
    # the scheduler in a child process (hope_core.engine_process): an engine that crashes fails
    # only the requests in flight and is restarted; on 2 CPU cores it is slower than a thread
    engine_process: bool = False
    max_batch_size: int = Field(64, ge=1)  # sessions decoded together in one batched step
    # prompt tokens absorbed per scheduler step, all sessions together, so a long prompt is prefilled in
    # chunks between decoding steps instead of stalling the sessions that are decoding
    prefill_chunk_tokens: int = Field(256, ge=16)

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, v: str) -> str:
        parse_api_keys(v)  # raise at start-up, not at the first request
        return v

    @cached_property
    def keys(self) -> dict[str, str]:
        """API key -> tenant."""
        return parse_api_keys(self.api_keys)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.keys)

    @property
    def loopback_only(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch  # only here: settings are read before the model is

        return "cuda" if torch.cuda.is_available() else "cpu"


def parse_api_keys(spec: str) -> dict[str, str]:
    """`acme:k1,globex:k2` -> {"k1": "acme", "k2": "globex"}; a tenant may have several keys.

    A spec that names no key at all (`","`, a template whose variables were empty) is refused
    rather than read as "no keys", which would serve every session to anyone. Keys are printable
    ASCII without spaces, as an `Authorization` header carries them."""
    keys: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        tenant, sep, key = item.partition(":")
        if not sep or not key or not valid_tenant(tenant):
            raise ValueError("HOPE_API_KEYS must be 'tenant:key' pairs separated by commas, "
                             "tenants made of letters, digits, '.', '_' or '-'")
        if not all("!" <= c <= "~" for c in key):
            raise ValueError(f"the API key of tenant {tenant!r} has spaces or characters that are not "
                             "printable ASCII; an Authorization header could not carry it")
        if key in keys and keys[key] != tenant:
            raise ValueError("one API key is given to two tenants")
        keys[key] = tenant
    if spec.strip() and not keys:
        raise ValueError("HOPE_API_KEYS names no 'tenant:key' pair; leave it unset to serve without keys")
    return keys
