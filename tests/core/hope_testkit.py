"""Shared helpers for the hope_core model/engine/state tests (imported by the test modules).

Everything here builds *tiny* seeded models so that the whole suite runs in seconds on two CPU
cores. The checkpoints are written with the real `save_checkpoint` and read back with
`load_checkpoint`, so the engine under test is built exactly as the server builds it.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import torch
from torch import Tensor

from hope_core.checkpoint import load_checkpoint, save_checkpoint
from hope_core.engine import Engine
from hope_core.model import HopeConfig, HopeLM, State
from hope_core.state import SessionState
from hope_core.tokenizer import HopeTokenizer

#: fp32 tolerance of HOPE.md section 4 (max abs error on logits / state tensors)
ATOL = 1e-4

#: a tiny config with the shipped tokenizer's vocabulary (Engine needs a matching tokenizer)
TINY = dict(vocab_size=4096, d_model=32, n_layers=2, n_heads=2, window=16, chunk=4, mid_period=8,
            mem_hidden=8, slow_hidden=64, mid_hidden=16, fast_hidden=8)

#: a second shape: chunk 2 is shorter than the convolution's tail (conv_width - 1 = 3), the mid
#: period is 3 chunks and the window only 4 chunks
TINY_ODD = TINY | dict(window=8, chunk=2, mid_period=6)

TITANS_KEYS = ("mem_a", "mem_b", "mom_a", "mom_b")
FAST_KEYS = ("fast_up", "fast_down")
MID_KEYS = ("mid_up", "mid_down", "mid_up_grad", "mid_down_grad")
MEMORY_KEYS = TITANS_KEYS + FAST_KEYS + MID_KEYS

_TOKENIZER: HopeTokenizer | None = None


def tokenizer() -> HopeTokenizer:
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = HopeTokenizer.default()
    return _TOKENIZER


def tiny_config(**overrides) -> HopeConfig:
    return HopeConfig(**(TINY | overrides))


def make_model(cfg: HopeConfig, seed: int = 0, trained_like: bool = True) -> HopeLM:
    """A seeded random model. With `trained_like`, the CMS levels' initial down projections
    (zero at init) get small random values, so that the session levels and their `up`
    weights influence the output from the first token, as they do after pre-training."""
    torch.manual_seed(seed)
    model = HopeLM(cfg)
    if trained_like:
        g = torch.Generator().manual_seed(seed + 1000)
        with torch.no_grad():
            for blk in model.blocks:
                for level in (blk.mid, blk.fast):
                    level.down0.copy_(torch.randn(level.down0.shape, generator=g) * 0.05)
    return model


def write_checkpoint(path: Path, cfg: HopeConfig, seed: int = 0) -> str:
    return save_checkpoint(path, make_model(cfg, seed), tokenizer())


def make_engine(path: Path, cfg: HopeConfig | None = None, seed: int = 0) -> Engine:
    """Write a tiny checkpoint at `path` (unless one is there) and load an Engine from it."""
    if not (Path(path) / "model.safetensors").is_file():
        write_checkpoint(path, cfg or tiny_config(), seed)
    return Engine(load_checkpoint(path))


def bare_session(engine: Engine) -> SessionState:
    """A session at stream position 0 (no BOS): chunk and mid phases are then easy to pick."""
    return SessionState(engine.model.init_state(1), engine.fingerprint)


def random_tokens(n: int, seed: int, vocab: int = 4096, low: int = 5) -> list[int]:
    """n ordinary (non-special) token ids."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab, (n,), generator=g).tolist()


def random_splits(n: int, pieces: int, seed: int, allow_empty: bool = True) -> list[tuple[int, int]]:
    """Split range(n) into `pieces` consecutive (start, end) pairs at random cut points.

    With `allow_empty`, one extra empty request is inserted (a request with no new tokens)."""
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, n), pieces - 1))
    bounds = [0, *cuts, n]
    out = list(itertools.pairwise(bounds))
    if allow_empty:
        i = rng.randrange(len(out))
        out.insert(i, (out[i][0], out[i][0]))
    return out


def state_diffs(a: State, b: State) -> dict[str, float]:
    """Max abs difference of every tensor of two states (same names and shapes required)."""
    ta, tb = a.tensors(), b.tensors()
    assert ta.keys() == tb.keys(), f"state tensor names differ: {ta.keys() ^ tb.keys()}"
    out = {}
    for name in ta:
        x, y = ta[name], tb[name]
        assert x.shape == y.shape, f"{name}: shape {tuple(x.shape)} vs {tuple(y.shape)}"
        assert x.dtype == y.dtype, f"{name}: dtype {x.dtype} vs {y.dtype}"
        out[name] = float((x.double() - y.double()).abs().max()) if x.numel() else 0.0
    return out


def assert_states_close(a: State, b: State, atol: float = ATOL, what: str = "") -> None:
    diffs = state_diffs(a, b)
    bad = {k: v for k, v in diffs.items() if not v <= atol}
    assert not bad, f"{what}: state tensors differ by more than {atol}: {bad}"


def assert_states_equal(a: State, b: State, names=None, what: str = "") -> None:
    """Bit-identical tensors (all of them, or those whose last name part is in `names`)."""
    ta, tb = a.tensors(), b.tensors()
    bad = [k for k in ta if (names is None or k.split(".")[-1] in names)
           and not torch.equal(ta[k], tb[k])]
    assert not bad, f"{what}: tensors changed / differ: {bad}"


def memory_tensors(state: State, names=MEMORY_KEYS) -> dict[str, Tensor]:
    return {k: v for k, v in state.tensors().items() if k.split(".")[-1] in names}


def max_abs(x: Tensor, y: Tensor) -> float:
    return float((x.double() - y.double()).abs().max())


def snapshot_slow(model: torch.nn.Module) -> dict[str, Tensor]:
    """Copies of every parameter and buffer."""
    out = {f"param:{k}": v.detach().clone() for k, v in model.named_parameters()}
    out |= {f"buffer:{k}": v.detach().clone() for k, v in model.named_buffers()}
    return out
