"""What the routes share: settings, engine, store, sessions and metrics of one app."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

import torch

from hope_core.engine import Engine
from hope_core.engine_process import EngineProcess
from hope_core.scheduler import Scheduler
from server.metrics import Metrics
from server.sessions import SessionManager
from server.settings import Settings
from server.stores.base import StateStore


@dataclass
class Context:
    settings: Settings
    metrics: Metrics
    engine: Engine | None = None  # set once the lifespan has loaded the checkpoint
    store: StateStore | None = None
    sessions: SessionManager | None = None
    scheduler: Scheduler | EngineProcess | None = None  # runs every request's engine work, batched
    model_id: str = ""
    created: int = 0  # when the model was loaded (for /v1/models)

    @cached_property
    def system_fingerprint(self) -> str:
        """OpenAI's `system_fingerprint`: what, besides a request and its session, decides the
        numbers (the checkpoint, the device, torch). A client that sets `seed` compares it to
        know whether the same request may give another answer."""
        assert self.engine is not None
        backend = f"{self.engine.fingerprint}:{self.engine.device}:{torch.__version__}"
        return "fp_" + hashlib.sha256(backend.encode()).hexdigest()[:12]

    @property
    def model_ids(self) -> tuple[str, ...]:
        """Names a request may use: the checkpoint's id, and "hope" for the one model served."""
        return (self.model_id, "hope")
