"""`SessionState`: everything one session's token stream changed, kept apart from the slow weights.

It holds exactly HOPE.md section 3: per layer the Titans memories (weights and momentum) with
the open chunk's inputs, the fast and mid CMS levels with the mid level's open gradient, the
attention window (committed keys/values plus the open chunk's) and the convolution's recent
inputs; and the counters (tokens absorbed, updates per level), a version and the fingerprint of
the checkpoint that produced it.

Bytes are safetensors: the tensors plus string metadata. Loading validates everything (format,
fingerprint, names, shapes, dtypes, finiteness, counter ranges) before a tensor is used, and
never unpickles.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from hope_core.model import LEVELS, HopeLM, State

FORMAT = "hope-session-state/1"
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class StateError(ValueError):
    """A state that this checkpoint cannot accept (foreign, corrupted or malformed)."""


@dataclass
class SessionState:
    """One session (a `State` with a batch of one) with its identity and version."""

    state: State
    fingerprint: str
    version: int = 0

    def copy(self) -> SessionState:
        """A working copy for a transaction (tensors are never modified in place, so shallow)."""
        return SessionState(self.state, self.fingerprint, self.version)

    # ---- what the server reports ----------------------------------------------------------

    @property
    def tokens_absorbed(self) -> int:
        return int(self.state.n_committed[0] + self.state.n_open[0])

    @property
    def updates(self) -> dict[str, int]:
        return {lvl: int(n) for lvl, n in zip(LEVELS, self.state.updates[0].tolist())}

    def nbytes(self, dtype: str = "float32") -> int:
        """Size of the tensors as stored with `dtype` floats (the blob adds a small header)."""
        width = torch.empty((), dtype=STORAGE_DTYPES[dtype]).element_size()
        return sum(t.numel() * (width if t.is_floating_point() else t.element_size())
                   for t in self.state.tensors().values())

    # ---- bytes ----------------------------------------------------------------------------

    def stored_as(self, dtype: str = "float32") -> SessionState:
        """What a load of `to_bytes(dtype)` holds (floats rounded through `dtype`, back at their
        own precision), without the bytes: a copy kept beside the stored blob must give the
        same answers as the blob."""
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage dtype must be one of {sorted(STORAGE_DTYPES)}")
        storage = STORAGE_DTYPES[dtype]
        rounded = self.state.map(lambda t: t.to(storage).to(t.dtype) if t.is_floating_point() and t.dtype != storage
                                 else t)
        return SessionState(rounded, self.fingerprint, self.version)

    def to_bytes(self, dtype: str = "float32") -> bytes:
        """safetensors bytes; floats stored as `dtype` (bf16 halves the size, not bit-exact)."""
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage dtype must be one of {sorted(STORAGE_DTYPES)}")
        tensors = {}
        for name, t in self.state.tensors().items():
            t = t[0].detach()
            if t.is_floating_point():
                t = t.to(STORAGE_DTYPES[dtype])
            tensors[name] = t.cpu().contiguous()
            # what from_bytes would refuse is never written: a session whose memories overflowed
            # (an imported state of huge but finite values, say) keeps its last loadable version
            if t.is_floating_point() and not torch.isfinite(tensors[name]).all():
                raise StateError(f"{name}: not finite")
        meta = {"format": FORMAT, "fingerprint": self.fingerprint, "version": str(self.version),
                "dtype": dtype}
        return st_save(tensors, metadata=meta)

    @classmethod
    def from_bytes(cls, blob: bytes, model: HopeLM, fingerprint: str,
                   device: torch.device | str = "cpu") -> SessionState:
        """Parse and validate a state for `model` (whose checkpoint has `fingerprint`)."""
        try:
            tensors = st_load(blob)  # safetensors' own parser checks the header first
            meta = _read_metadata(blob)
        except (SafetensorError, ValueError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise StateError(f"not a session state: {e}") from None
        if meta.get("format") != FORMAT:
            raise StateError(f"unknown state format {meta.get('format')!r}, expected {FORMAT!r}")
        if meta.get("fingerprint") != fingerprint:
            raise StateError("state was made by another checkpoint "
                             f"({meta.get('fingerprint')!r}, this is {fingerprint!r})")
        dtype = meta.get("dtype")
        if dtype not in STORAGE_DTYPES:
            raise StateError(f"unknown storage dtype {dtype!r}")
        try:
            version = int(meta.get("version", ""))
        except ValueError:
            raise StateError("state version is not an integer") from None
        expected = _layout(model)
        missing, extra = expected.keys() - tensors.keys(), tensors.keys() - expected.keys()
        if missing or extra:
            raise StateError(f"state tensors do not match this model: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(extra)[:5]}")
        out = {}
        for name, (shape, ref_dtype) in expected.items():
            t = tensors[name]
            if t.shape != shape:
                raise StateError(f"{name}: shape {tuple(t.shape)}, expected {tuple(shape)}")
            want = STORAGE_DTYPES[dtype] if ref_dtype.is_floating_point else ref_dtype
            if t.dtype != want:
                raise StateError(f"{name}: dtype {t.dtype}, expected {want}")
            if t.is_floating_point():
                t = t.float()
                if not torch.isfinite(t).all():
                    raise StateError(f"{name}: not finite")
            out[name] = t.unsqueeze(0)
        state = State.from_tensors(to_device(out, torch.device(device)), model.cfg.n_layers)
        _check_counters(state, model)
        return cls(state, fingerprint, version)


def to_device(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Move a state's tensors to `device`. On CUDA the copies run on a side stream from pinned
    memory, so a session loading (on an I/O thread) overlaps the scheduler's steps on the
    default stream; the call returns once the copies are done."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in tensors.items()}
    default = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    # allocated in the default stream's order; the side stream first waits for the work already
    # queued there, which may still read memory these blocks reuse
    out = {k: torch.empty(v.shape, dtype=v.dtype, device=device) for k, v in tensors.items()}
    side.wait_stream(default)
    with torch.cuda.stream(side):
        for k, v in tensors.items():
            out[k].copy_(v.pin_memory(), non_blocking=True)
    side.synchronize()
    return out


_LAYOUTS: weakref.WeakKeyDictionary[HopeLM, dict[str, tuple[torch.Size, torch.dtype]]] = (
    weakref.WeakKeyDictionary())


def _layout(model: HopeLM) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Each state tensor's shape (without the batch) and dtype for `model`, made once: a load
    should not build a whole fresh state to learn them."""
    if model not in _LAYOUTS:
        _LAYOUTS[model] = {k: (v.shape[1:], v.dtype) for k, v in model.init_state(1).tensors().items()}
    return _LAYOUTS[model]


def _read_metadata(blob: bytes) -> dict[str, str]:
    if len(blob) < 8:
        raise ValueError("too short")
    n = int.from_bytes(blob[:8], "little")
    if n > len(blob) - 8 or n > 100_000_000:
        raise ValueError("header length out of range")
    header = json.loads(blob[8:8 + n])
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else {}
    return meta if isinstance(meta, dict) else {}


# Counters beyond this are refused: no stream gets there (nine years at a million tokens a
# second), and below it they neither overflow int64 as they grow nor lose exactness as the
# float64 positions of the rotary embedding.
COUNTER_LIMIT = 2**48


def _check_counters(state: State, model: HopeLM) -> None:
    cfg = model.cfg
    n_committed, n_open = int(state.n_committed[0]), int(state.n_open[0])
    if n_committed < 0 or n_committed % cfg.chunk or n_committed > COUNTER_LIMIT:
        raise StateError(f"n_committed {n_committed} is not a multiple of {cfg.chunk} in [0, 2**48]")
    if not 0 <= n_open < cfg.chunk:
        raise StateError(f"n_open {n_open} out of range [0, {cfg.chunk})")
    tok = state.open_tokens
    if bool((tok < 0).any() or (tok >= cfg.vocab_size).any()):
        raise StateError("open_tokens out of the vocabulary")
    if bool((state.updates < 0).any() or (state.updates > COUNTER_LIMIT).any()):
        raise StateError("update counters out of range [0, 2**48]")
