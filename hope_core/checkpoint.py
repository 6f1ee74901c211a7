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

import safetensors
import safetensors.torch
import torch

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
    """Replace `path` with `data` at once. The file gets the mode `open()` gives a new file
    (0o666 less the umask), so a checkpoint one user trained is readable by the others (the
    container's runtime user, say), not the 0o600 of a private temporary file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)  # a leftover of a crashed run would keep its own mode
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_checkpoint(path: str | Path, model: HopeLM, tokenizer: HopeTokenizer,
                    training: dict | None = None) -> str:
    """Write a checkpoint directory; returns its fingerprint. Files are replaced atomically."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    # serialized here rather than by `save_file`, which creates its file 0o600
    weights = safetensors.torch.save(tensors)
    _atomic_write(path / WEIGHTS, weights)
    meta = {"model": model.cfg.to_dict(), "training": training or {}}
    _atomic_write(path / CONFIG, json.dumps(meta, indent=2).encode())
    _atomic_write(path / TOKENIZER, tokenizer.to_str().encode())
    return fingerprint(weights, model.cfg)


def check_device(name: str) -> str:
    """A `--device` value checked before any work: `auto` (CUDA when present, else the CPU),
    `cpu`, `cuda` or `cuda:N`. Returns the device's name; a ValueError says what is wrong with
    one that this machine cannot use, instead of a torch error from deep inside the first op."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return name
    if dev.type != "cuda":
        raise ValueError(f"--device {name}: HOPE runs on cpu or cuda, not {dev.type}")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"--device {name}: this machine has {count} CUDA device{'s' * (count != 1)} "
                         f"(cuda:0 to cuda:{count - 1})")
    return name


class _NotACheckpoint(Exception):
    """Internal: why a file of the checkpoint is unusable (becomes the ValueError below)."""


def _short(text: object, limit: int = 160) -> str:
    """One line of at most `limit` characters (library errors can be long and multi-line)."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _names(keys: list[str], n: int = 2) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _read_config(path: Path) -> tuple[dict, HopeConfig]:
    try:
        meta = json.loads((path / CONFIG).read_bytes())
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise _NotACheckpoint(f"{CONFIG} is not valid JSON ({_short(e, 80)})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise _NotACheckpoint(f'{CONFIG} has no "model" object (the HopeConfig the weights were made with)')
    try:  # unknown fields, values of the wrong type or that do not fit
        return meta, HopeConfig.from_dict(meta["model"])
    except ValueError as e:
        raise _NotACheckpoint(f"{CONFIG}: {_short(e, 120)}") from e


def _read_weights(raw: bytes, model: HopeLM) -> dict[str, torch.Tensor]:
    """The tensors of `raw`, checked against the model's own: names and shapes."""
    try:
        tensors = safetensors.torch.load(raw)
    except (safetensors.SafetensorError, ValueError, RuntimeError, TypeError) as e:
        what = "is empty" if not raw else f"is not a safetensors file ({_short(e, 100)})"
        raise _NotACheckpoint(f"{WEIGHTS} {what}") from e
    wanted = model.state_dict()
    missing = [k for k in wanted if k not in tensors]
    unexpected = [k for k in tensors if k not in wanted]
    if missing or unexpected:
        parts = ([f"{len(missing)} missing ({_names(missing)})"] if missing else []) + \
                ([f"{len(unexpected)} unexpected ({_names(unexpected)})"] if unexpected else [])
        raise _NotACheckpoint(f"the weights do not match {CONFIG}: tensors " + "; ".join(parts))
    mismatched = [k for k in wanted if tensors[k].shape != wanted[k].shape]
    if mismatched:
        k = mismatched[0]
        more = f" ({len(mismatched) - 1} more tensors differ)" if len(mismatched) > 1 else ""
        raise _NotACheckpoint(f"the weights do not match {CONFIG}: {k} is {tuple(tensors[k].shape)}, "
                              f"the config makes it {tuple(wanted[k].shape)}{more}")
    return tensors


def _read_tokenizer(path: Path) -> HopeTokenizer:
    try:
        return HopeTokenizer.from_str((path / TOKENIZER).read_bytes().decode("utf-8"))
    except OSError:
        raise
    except Exception as e:  # the tokenizers library raises a bare Exception on bad JSON
        raise _NotACheckpoint(f"{TOKENIZER} is not a HOPE tokenizer ({_short(e, 100)})") from e


def load_checkpoint(path: str | Path | None = None, device: str | torch.device = "cpu",
                    overrides: dict | None = None) -> Checkpoint:
    """Load a checkpoint directory (the bundled one by default).

    `overrides` changes serving-time fields of the config (inner learning rates, say); the
    fingerprint then covers them too, since states made under other rates are not the same
    model's states.

    A directory without the files raises FileNotFoundError; files that are there but unusable
    (truncated or foreign weights, weights of another config, a config or tokenizer that does not
    parse) raise a one-line ValueError `<path>: not a HOPE checkpoint: <why>`.
    """
    path = Path(path) if path else DEFAULT_CHECKPOINT
    if not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (expected {WEIGHTS}, {CONFIG}, {TOKENIZER})")
    for name in (CONFIG, TOKENIZER):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path}: not a complete checkpoint: {name} is missing")
    try:
        meta, cfg = _read_config(path)
        raw = (path / WEIGHTS).read_bytes()
        model = HopeLM(cfg)
        tensors = _read_weights(raw, model)
        model.load_state_dict(tensors, strict=True)
        tokenizer = _read_tokenizer(path)
        if tokenizer.vocab_size > cfg.vocab_size:
            raise _NotACheckpoint(f"{TOKENIZER} has {tokenizer.vocab_size} tokens, the model {cfg.vocab_size}")
    except _NotACheckpoint as e:
        raise ValueError(f"{path}: not a HOPE checkpoint: {e}") from e.__cause__
    if overrides:  # the caller's, not the checkpoint's: their errors are said as such
        cfg = HopeConfig.from_dict(cfg.to_dict() | overrides)
        model = HopeLM(cfg)
        try:
            model.load_state_dict(tensors, strict=True)
        except RuntimeError:
            raise ValueError(f"config overrides {sorted(overrides)} change the shape of the model; only "
                             "serving-time fields (learning rates, decays, ...) can be overridden") from None
    model.to(device).eval().requires_grad_(False)
    return Checkpoint(model, tokenizer, fingerprint(raw, cfg), path, meta)
