"""The frozen models a user would otherwise serve: a GPT-2-style transformer with random weights and
as many parameters as the HOPE checkpoint, decoded two ways.

* `KVDecoder`: the plain PyTorch loop a careful engineer writes by hand. Static K/V cache tensors
  allocated once for prompt + new tokens, the model called once per step on the new token only,
  inference mode, the next token chosen on the device (no host read per step).
* `hf_generate_speed`: Hugging Face `transformers` `generate` on a `GPT2LMHeadModel` of the same
  shape (an optional dependency: without it the row says "not installed").

Weights are random: decode speed does not depend on what the weights say, and a trained GPT-2 of
this size would have to be trained first. On CUDA both run in bf16, as a frozen model would be
served; on CPU in fp32 (CPU bf16 matmuls are slower, not faster).

The KV loop also runs at batch 1 with every width divided by `NARROW` (`narrow_config`): the same
ops on about 1/26 of the arithmetic (the vocabulary is not narrowed), so its time is what the
loop's eager ops cost before any arithmetic (HOPE's engine is measured the same way,
`bench.engine_speed.narrow_engine`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.timing import now


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 4
    n_positions: int = 1024  # GPT-2's learned position table; it counts towards the parameters
    mlp_ratio: int = 4

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def n_params(self) -> int:
        """Parameters of `GPT(self)` (and of GPT2LMHeadModel: the head is tied to the embedding)."""
        d, h = self.d_model, self.mlp_ratio * self.d_model
        per_layer = (2 * 2 * d  # two LayerNorms, weight and bias
                     + d * 3 * d + 3 * d + d * d + d  # qkv and output projections
                     + d * h + h + h * d + d)  # MLP
        return (self.vocab_size + self.n_positions) * d + self.n_layers * per_layer + 2 * d


def matching_config(target_params: int, vocab_size: int = 4096, d_model: int = 256, n_heads: int = 4,
                    n_positions: int = 1024) -> GPTConfig:
    """The GPT-2 shape with this vocabulary and width whose parameter count is closest to the target."""
    base = GPTConfig(vocab_size, d_model, 1, n_heads, n_positions)
    return min((replace(base, n_layers=n) for n in range(1, 97)),
               key=lambda c: abs(c.n_params() - target_params))


NARROW = 8  # the widths' divisor of the narrow models that measure per-op overhead


def narrow_d_model(d_model: int, n_heads: int, factor: int = NARROW) -> int:
    """d_model / factor, rounded down to whole heads of an even width (rotary embeddings pair
    their dimensions), and at least one such head each."""
    step = 2 * n_heads
    return max(step, d_model // factor // step * step)


def narrow_config(cfg: GPTConfig, factor: int = NARROW) -> GPTConfig:
    """The same layers, heads and vocabulary with d_model divided by `factor`."""
    return replace(cfg, d_model=narrow_d_model(cfg.d_model, cfg.n_heads, factor))


# --------------------------------------------------------------------------------------------
# The model: GPT-2 (pre-LayerNorm, learned positions, tanh GELU, tied head), with an optional
# static KV cache.
# --------------------------------------------------------------------------------------------

@dataclass
class KVCache:
    k: Tensor  # [L, B, H, T_max, dh]
    v: Tensor

    @classmethod
    def allocate(cls, cfg: GPTConfig, batch: int, max_len: int, device: torch.device | str,
                 dtype: torch.dtype) -> KVCache:
        shape = (cfg.n_layers, batch, cfg.n_heads, max_len, cfg.head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: Tensor, k_cache: Tensor | None = None, v_cache: Tensor | None = None,
                pos: int = 0) -> Tensor:
        B, T, d = x.shape
        H, dh = self.cfg.n_heads, self.cfg.head_dim
        q, k, v = self.c_attn(x).view(B, T, 3, H, dh).permute(2, 0, 3, 1, 4)  # each [B, H, T, dh]
        if k_cache is not None and v_cache is not None:
            # SDPA's causal mask is aligned top-left, so it is right only for a prompt written at
            # position 0; a single new token sees every cached position and needs no mask
            assert T == 1 or pos == 0, "multi-token writes are only supported for the prompt"
            k_cache[:, :, pos:pos + T] = k  # in place: the cache is never reallocated
            v_cache[:, :, pos:pos + T] = v
            k, v = k_cache[:, :, :pos + T], v_cache[:, :, :pos + T]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, d))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.ln_1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(d)
        self.c_fc = nn.Linear(d, cfg.mlp_ratio * d)
        self.c_proj = nn.Linear(cfg.mlp_ratio * d, d)

    def forward(self, x: Tensor, k_cache: Tensor | None = None, v_cache: Tensor | None = None,
                pos: int = 0) -> Tensor:
        x = x + self.attn(self.ln_1(x), k_cache, v_cache, pos)
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.d_model)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        # GPT-2's initialisation, residual projections scaled by depth
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layers) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, idx: Tensor, cache: KVCache | None = None, pos: int = 0, last_only: bool = False) -> Tensor:
        """Logits [B, T, V] of tokens idx [B, T] at positions pos.. (only the last with `last_only`).

        Without a cache the whole sequence is computed from scratch (the reference the cached
        loop is checked against); with one, the new tokens' keys and values are written into it."""
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe.weight[pos:pos + T]
        for i, blk in enumerate(self.h):
            x = blk(x, cache.k[i], cache.v[i], pos) if cache is not None else blk(x)
        if last_only:
            x = x[:, -1:]
        return F.linear(self.ln_f(x), self.wte.weight)  # the head is tied to the embedding


def next_token(logits: Tensor, greedy: bool, generator: torch.Generator | None = None) -> Tensor:
    """[B, V] -> [B]; stays on the device (sampling draws through the logits' own device)."""
    if greedy:
        return logits.argmax(-1)
    return torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=generator)[:, 0]


class KVDecoder:
    """Prefill once, then one model call per new token, feeding each token back (the last one too,
    as HOPE absorbs every token it generates: N tokens cost N calls on both sides)."""

    def __init__(self, model: GPT, prompt: Tensor, max_new_tokens: int) -> None:
        self.model = model
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        B, P = prompt.shape
        if P + max_new_tokens > model.cfg.n_positions:
            raise ValueError("prompt + new tokens exceed the position table")
        self.cache = KVCache.allocate(model.cfg, B, P + max_new_tokens, self.device, self.dtype)
        self.out = torch.empty(B, max_new_tokens, dtype=torch.long, device=self.device)
        self.prompt = prompt.to(self.device)
        self.pos = 0
        self.logits: Tensor | None = None

    @torch.inference_mode()
    def prefill(self) -> None:
        self.logits = self.model(self.prompt, self.cache, 0, last_only=True)[:, -1]
        self.pos = self.prompt.shape[1]

    @torch.inference_mode()
    def decode(self, n: int, greedy: bool = True) -> Tensor:
        """n new tokens [B, n] (on the device)."""
        assert self.logits is not None, "prefill first"
        P = self.prompt.shape[1]
        for _ in range(n):
            tok = next_token(self.logits, greedy)
            self.out[:, self.pos - P] = tok
            self.logits = self.model(tok[:, None], self.cache, self.pos)[:, -1]
            self.pos += 1
        return self.out[:, self.pos - P - n:self.pos - P]


def kv_generate(model: GPT, prompt: Tensor, n: int, greedy: bool = True) -> Tensor:
    dec = KVDecoder(model, prompt, n)
    dec.prefill()
    return dec.decode(n, greedy)


@torch.inference_mode()
def full_generate(model: GPT, prompt: Tensor, n: int) -> Tensor:
    """Greedy decoding that recomputes the whole sequence each step: slow, but obviously right."""
    seq = prompt.to(next(model.parameters()).device)
    for _ in range(n):
        tok = model(seq, last_only=True)[:, -1].argmax(-1)
        seq = torch.cat([seq, tok[:, None]], dim=1)
    return seq[:, prompt.shape[1]:]


def build_model(cfg: GPTConfig, device: torch.device | str, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(cfg).eval().requires_grad_(False)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return model.to(device=device, dtype=dtype)


def random_prompt(cfg: GPTConfig, batch: int, length: int, seed: int = 0) -> Tensor:
    return torch.randint(cfg.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def kv_loop_speed(model: GPT, batch: int, prompt_len: int, new_tokens: int, greedy: bool = True,
                  reps: int = 1) -> float:
    """Aggregate decode tokens/s (batch x new tokens over the decode time; the prefill is not timed,
    as `hope_core.evaluate.decode_speed` absorbs its prompt before the clock starts). Best of `reps`."""
    prompt = random_prompt(model.cfg, batch, prompt_len)
    # warm-up over the full length: every attention shape is met once before the clock (cuDNN
    # builds a plan per key length on first sight), as it would have been in a warm server
    kv_generate(model, prompt, new_tokens, greedy)
    best = 0.0
    for _ in range(reps):
        dec = KVDecoder(model, prompt, new_tokens)
        dec.prefill()
        t0 = now(dec.device)
        dec.decode(new_tokens, greedy)
        best = max(best, batch * new_tokens / (now(dec.device) - t0))
    return best


# --------------------------------------------------------------------------------------------
# Hugging Face transformers (optional)
# --------------------------------------------------------------------------------------------

def hf_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def build_hf_model(cfg: GPTConfig, device: torch.device | str, seed: int = 0):
    """GPT2LMHeadModel of the same shape, random init; None when transformers is not installed."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging as hf_logging
    except ImportError:
        return None
    hf_logging.set_verbosity_error()
    conf = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.d_model,
                      n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.mlp_ratio * cfg.d_model,
                      activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(conf).eval().requires_grad_(False)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return model.to(device=device, dtype=dtype)


@torch.inference_mode()
def hf_generate_speed(model, batch: int, prompt_len: int, new_tokens: int, reps: int = 1) -> float:
    """Aggregate tokens/s of a `generate` call: exactly `new_tokens` per row (min = max, so the
    end-of-text token cannot stop it), greedy, with the KV cache. `generate` gives no hook between
    prefill and decode, so its time includes the (short) prefill. Best of `reps`."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    ids = torch.randint(vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    kwargs = dict(attention_mask=mask, do_sample=False, use_cache=True, pad_token_id=0)
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)  # warm-up, full length
    best = 0.0
    for _ in range(reps):
        t0 = now(device)
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        dt = now(device) - t0
        best = max(best, batch * (out.shape[1] - prompt_len) / dt)
    return best


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------

@dataclass
class BaselineRow:
    method: str  # "kv_loop", "hf_generate" or "kv_loop_narrow" (narrow_config)
    batch: int
    tokens_per_s: float | None  # None: not run (see note)
    note: str = ""


@dataclass
class BaselineResults:
    config: GPTConfig
    n_params: int
    target_params: int
    prompt_tokens: int
    new_tokens: int
    device: str
    dtype: str
    rows: list[BaselineRow] = field(default_factory=list)

    def speed(self, method: str, batch: int) -> float | None:
        for r in self.rows:
            if r.method == method and r.batch == batch:
                return r.tokens_per_s
        return None


def run(target_params: int, batches: list[int], prompt_tokens: int = 16, new_tokens: int = 64,
        device: str = "cpu", vocab_size: int = 4096, d_model: int = 256, n_heads: int = 4,
        hf: bool = True, reps: int = 1, log=print, publish=None) -> BaselineResults:
    """Both baselines at each batch size, best of `reps` runs each (on a shared machine the best
    run is the least disturbed one; HOPE's single-session figure is taken the same way)."""
    cfg = matching_config(target_params, vocab_size, d_model, n_heads)
    model = build_model(cfg, device)
    res = BaselineResults(cfg, sum(p.numel() for p in model.parameters()), target_params, prompt_tokens,
                          new_tokens, device, str(next(model.parameters()).dtype).replace("torch.", ""))
    if publish:  # rows then fill in place: an interrupted run keeps the ones it made
        publish(res)
    log(f"baseline GPT-2: {cfg.n_layers} layers x d {cfg.d_model}, {res.n_params:,} parameters "
        f"(HOPE {target_params:,}), {res.dtype} on {device}")
    for b in batches:
        tps = kv_loop_speed(model, b, prompt_tokens, new_tokens, reps=reps)
        res.rows.append(BaselineRow("kv_loop", b, tps))
        log(f"baseline kv_loop     batch {b:>3}: {tps:10.1f} tok/s")
    narrow = narrow_config(cfg)
    tps = kv_loop_speed(build_model(narrow, device), 1, prompt_tokens, new_tokens, reps=reps)
    res.rows.append(BaselineRow("kv_loop_narrow", 1, tps, f"d_model {narrow.d_model}"))
    log(f"baseline kv_loop, widths / {NARROW}, batch 1: {tps:10.1f} tok/s")
    hf_model = build_hf_model(cfg, device) if hf else None
    for b in batches:
        if hf_model is None:
            note = "not installed" if hf else "skipped"
            res.rows.append(BaselineRow("hf_generate", b, None, note))
            continue
        tps = hf_generate_speed(hf_model, b, prompt_tokens, new_tokens, reps)
        res.rows.append(BaselineRow("hf_generate", b, tps))
        log(f"baseline hf_generate batch {b:>3}: {tps:10.1f} tok/s")
    if hf and hf_model is None:
        log("baseline hf_generate: transformers is not installed (pip install -e '.[bench]')")
    return res
