"""What a token costs in arithmetic: HOPE with learning on and off against the frozen KV loop, and
how fast this machine multiplies matrices.

FLOPs are those of matrix products and attention, forward and backward (the convention of model
FLOP utilisation: element-wise work is not counted), counted by `MatmulFlops`, a dispatch mode
that sees every aten op the code runs, the backward's included. HOPE is counted on its serving
path (the scheduler's steps, eager: a replayed CUDA graph runs no ops that could be seen), one
session decoding after a 16-token prompt, over whole chunks, so a sixteenth of a commit (the
chunk's re-forward and backward, HOPE.md) falls on each token; the KV loop over its decode calls
after the same prompt. A token's FLOPs do not depend on the batch.

Set beside the tokens/s of the baselines table, the counts say what a ratio there can be at
best: HOPE at the KV loop's tokens/s needs the KV loop's arithmetic rate times the ratio of their
FLOPs per token, which `matmul_rates` puts against what this machine reaches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from bench.baselines import GPTConfig, KVDecoder, build_model, matching_config, random_prompt
from bench.timing import now

if TYPE_CHECKING:
    from hope_core.engine import Engine

aten = torch.ops.aten


def _attention_flops(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """q [B, H, L, E] against k [B, H, S, E] and v [B, H, S, Ev]: q k^T and then p v."""
    *lead, L, E = q.shape
    S, Ev = k.shape[-2], v.shape[-1]
    return 2 * math.prod(lead) * L * S * (E + Ev)


def _cpu_attention(q, k, v, *args, **kwargs) -> int:
    return _attention_flops(q, k, v)


def _cpu_attention_backward(grad_out, q, k, v, *args, **kwargs) -> int:
    return 2 * _attention_flops(q, k, v)  # the backward's four products


FORMULAS = {**flop_registry,
            # torch's table has the GPU attention kernels only
            aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
            aten.baddbmm_: flop_registry[aten.baddbmm]}  # in place: the same product


class MatmulFlops(TorchDispatchMode):
    """Counts the FLOPs of matrix products and attention run under it (`total`), backward
    included. Unlike `torch.utils.flop_counter.FlopCounterMode` it keeps no per-module account,
    whose hooks `torch.autograd.grad` on leaf tensors (HOPE's commit) does not allow."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        formula = FORMULAS.get(func._overloadpacket)
        if formula is None:
            # under inference mode composite ops (linear, attention) arrive whole: count what
            # they are made of
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


def hope_flops(engine: Engine, learn: bool, prompt_len: int = 16, chunks: int = 4) -> float:
    """FLOPs per generated token of one session through the scheduler (counted on this thread,
    steps run one by one), over `chunks` whole chunks of decode steps after the prompt."""
    from bench.engine_speed import prompt_tokens
    from hope_core.sampling import SamplingParams
    from hope_core.scheduler import Job, Scheduler

    C = engine.cfg.chunk
    sched = Scheduler(engine, max_batch=1, graphs=False)
    # the first step absorbs the prompt and makes the first token; then chunks x C decode steps
    job = Job(engine.new_session(), prompt_tokens(engine, prompt_len),
              SamplingParams(max_tokens=1 + chunks * C, seed=0, stop_token_ids=[]), learn=learn)
    future = sched.submit(job)
    total = tokens = 0
    while not future.done():
        counter = MatmulFlops()
        with counter:
            stats = sched.step()
        if stats.prefill_tokens == 0:
            total, tokens = total + counter.total, tokens + stats.batch_size
    future.result()
    return total / tokens


def kv_loop_flops(cfg: GPTConfig, prompt_len: int = 16, new_tokens: int = 64) -> float:
    """FLOPs per token of the KV loop decoding a model of this shape."""
    dec = KVDecoder(build_model(cfg, "cpu"), random_prompt(cfg, 1, prompt_len), new_tokens)
    dec.prefill()
    counter = MatmulFlops()
    with counter:
        dec.decode(new_tokens)
    return counter.total / new_tokens


@dataclass
class MatmulRate:
    shape: str  # "[m, k] x [k, n]"
    flops_per_s: float


def _time_products(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, reps: int) -> float:
    t0 = now(a.device)
    for _ in range(reps):
        torch.mm(a, b, out=out)
    return now(a.device) - t0


def matmul_rates(device: torch.device | str, dtype: torch.dtype, shapes: list[tuple[int, int, int]],
                 seconds: float = 0.5) -> list[MatmulRate]:
    """`torch.mm` FLOPs/s at each (m, k, n): runs of enough products to take a tenth of `seconds`
    each (one clock read per run, which on a GPU waits for the device), the best of them."""
    out = []
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        c = torch.mm(a, b)
        reps = 1
        while (dt := _time_products(a, b, c, reps)) < seconds / 10:
            reps *= 2
        best, spent = dt, dt
        while spent < seconds:
            dt = _time_products(a, b, c, reps)
            best, spent = min(best, dt), spent + dt
        out.append(MatmulRate(f"[{m}, {k}] x [{k}, {n}]", 2 * m * k * n * reps / best))
    return out


@dataclass
class ArithmeticResults:
    hope_on: float  # FLOPs per token, learning on
    hope_off: float  # ... learning off: the decode step alone
    kv_loop: float
    device: str
    dtype: str
    rates: list[MatmulRate] = field(default_factory=list)

    @property
    def learning_share(self) -> float:
        """FLOPs per token that learning adds, over the decode step's."""
        return self.hope_on / self.hope_off - 1.0

    @property
    def best_rate(self) -> float:
        return max((r.flops_per_s for r in self.rates), default=0.0)


def run(engine: Engine, log=print, publish=None) -> ArithmeticResults:
    """HOPE against the KV loop of the baselines' shape (HOPE's parameter count, `bench.baselines.run`)."""
    cfg = engine.cfg
    dtype = next(engine.model.parameters()).dtype
    gpt = matching_config(sum(p.numel() for p in engine.model.parameters()), cfg.vocab_size, cfg.d_model, cfg.n_heads)
    res = ArithmeticResults(hope_flops(engine, learn=True), hope_flops(engine, learn=False), kv_loop_flops(gpt),
                            str(engine.device), str(dtype).replace("torch.", ""))
    if publish:
        publish(res)
    log(f"arithmetic per token: HOPE learning on {res.hope_on / 1e6:.1f} MFLOP, off {res.hope_off / 1e6:.1f}, "
        f"KV loop {res.kv_loop / 1e6:.1f}")
    # the model's widest product at one row per session (a 16-session decode step) and at a chunk
    # per session (a 16-session commit), and a large square one: what the machine can do at all
    wide = max(cfg.slow_hidden, 4 * cfg.d_model)
    res.rates += matmul_rates(engine.device, dtype, [(16, cfg.d_model, wide), (16 * cfg.chunk, cfg.d_model, wide),
                                                     (2048, 2048, 2048)])
    for r in res.rates:
        log(f"arithmetic: matmul {r.shape} {r.flops_per_s / 1e9:.1f} GFLOP/s")
    return res
