"""Checkpoints: a directory with the slow weights (safetensors), the config and the tokenizer.

    model.safetensors   slow weights and the memories' meta-learned initial values
    config.json         {"model": HopeConfig, "training": {...}}: what produced the weights
    tokenizer.json      the tokenizer the model was trained with

Nothing is ever unpickled. The fingerprint (a hash of the weights and the model config) names
the checkpoint: a session state records it and is refused by any other checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hope_core.model import HopeConfig, HopeLM
from hope_core.tokenizer import HopeTokenizer

DEFAULT_CHECKPOINT = Path(__file__).parent / "assets" / "checkpoint"
WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"


@dataclass
class Checkpoint:
    model: HopeLM
    tokenizer: HopeTokenizer
    fingerprint: str
    path: Path
    meta: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        """Human-readable model id: the directory name plus the fingerprint's head."""
        return f"hope-{self.path.name}-{self.fingerprint[:8]}"


def fingerprint(weights_bytes: bytes, cfg: HopeConfig) -> str:
    h = hashlib.sha256(weights_bytes)
    h.update(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    return h.hexdigest()[:32]


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_checkpoint(path: str | Path, model: HopeLM, tokenizer: HopeTokenizer,
                    training: dict | None = None) -> str:
    """Write a checkpoint directory; returns its fingerprint. Files are replaced atomically."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path / f".{WEIGHTS}.tmp{os.getpid()}"
    save_file(tensors, str(tmp))
    os.replace(tmp, path / WEIGHTS)
    meta = {"model": model.cfg.to_dict(), "training": training or {}}
    _atomic_write(path / CONFIG, json.dumps(meta, indent=2).encode())
    _atomic_write(path / TOKENIZER, tokenizer.to_str().encode())
    return fingerprint((path / WEIGHTS).read_bytes(), model.cfg)


def load_checkpoint(path: str | Path | None = None, device: str | torch.device = "cpu",
                    overrides: dict | None = None) -> Checkpoint:
    """Load a checkpoint directory (the bundled one by default).

    `overrides` changes serving-time fields of the config (inner learning rates, say); the
    fingerprint then covers them too, since states made under other rates are not the same
    model's states.
    """
    path = Path(path) if path else DEFAULT_CHECKPOINT
    if not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (expected {WEIGHTS}, {CONFIG}, {TOKENIZER})")
    meta = json.loads((path / CONFIG).read_text())
    cfg_dict = dict(meta["model"]) | (overrides or {})
    cfg = HopeConfig.from_dict(cfg_dict)
    raw = (path / WEIGHTS).read_bytes()
    model = HopeLM(cfg)
    model.load_state_dict(load_file(str(path / WEIGHTS)), strict=True)
    model.to(device).eval().requires_grad_(False)
    tokenizer = HopeTokenizer.from_file(path / TOKENIZER)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, model {cfg.vocab_size}")
    return Checkpoint(model, tokenizer, fingerprint(raw, cfg), path, meta)
