"""The HOPE language model: sliding-window attention, self-modifying Titans memory and the
Continuum Memory System, in one file.

Everything a session changes lives in a `State` (a batch of sessions, each row one session);
the `nn.Module` holds only the slow weights and the meta-learned initial values of the session's
memories. The model is written as pure functions of (slow weights, state, tokens) so that the
same code serves one session, a batch of sessions in one decode step, and pre-training.

Choices made where HOPE.md leaves room (see docs/architecture.md for the longer story):

* Chunk-synchronous learning. Every per-session memory (Titans and the fast CMS level) changes
  only at boundaries of `chunk` absorbed tokens, counted from the start of the stream; the mid
  level changes every `mid_period` tokens. Inside a chunk every read uses the chunk-start
  weights, so decoding one token at a time and computing a whole chunk at once are the same
  function of the same inputs (invariant 2).
* The attention cache is the last `window` committed tokens' keys and values plus the open chunk's
  (`chunk` slots). A commit appends the open chunk and drops the oldest. A query at position p sees the keys
  at positions (p - window, p].
* Titans: reads use the chunk-start memory. The write takes all gradients at the chunk-start
  weights (the dual form), and applies momentum and the retention gate per token in closed form,
  which is exactly the token-by-token recurrence S_t = beta S_{t-1} - eta_t g_t,
  M_t = alpha_t M_{t-1} + S_t. Gradients are written by hand (checked against autograd in the
  tests) with differentiable ops, so pre-training backpropagates through the inner loop.
* Self-modifying variant: k, v, and the inputs of eta and alpha are produced by adaptive memories
  of the same form as the main memory. All memories of a head read the same key k_t; the main
  memory's target is v_t and memory m's target is its own prediction M_m(v_t) with gradient
  stopped. The query stays a static projection. All memories of a head share eta_t and alpha_t.
* CMS levels: slow (shared MLP) -> mid -> fast, each `h = h + MLP(RMSNorm(h))`. At a chunk's
  end the session levels take the gradient of the next-token loss summed over the chunk's
  predictions whose targets lie inside the chunk (chunk - 1 of them; the first token of the
  next chunk is not known yet). The fast level steps every chunk; the mid level accumulates and
  steps every `mid_period` tokens. Both are pulled back towards their initial weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def check_types(config: object, where: str) -> None:
    """Each field of a config dataclass holds what its default is (an int where a float is
    expected is taken as that float): a TOML `"false"` or `32.0` is refused, not read as true or
    used as a size."""
    for f in fields(config):  # type: ignore[arg-type]
        value = getattr(config, f.name)
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        kind = type(default)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            setattr(config, f.name, float(value))
        elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"{where} {f.name} must be {kind.__name__}, not {value!r}")


@dataclass
class HopeConfig:
    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    window: int = 256  # attention sees this many most recent tokens, itself included
    chunk: int = 16  # Titans chunk and fast CMS period
    mid_period: int = 256  # mid CMS period, a multiple of `chunk`
    mem_hidden: int = 32  # hidden width of each Titans memory MLP, per head
    self_modifying: bool = True  # k/v/eta/alpha from adaptive memories (else static projections)
    slow_hidden: int = 1024
    mid_hidden: int = 64
    fast_hidden: int = 32
    conv_width: int = 4
    key_shift: bool = True  # keys see tokens up to t-1 (associative recall of the next token)
    rope_base: float = 10000.0
    eta_max: float = 0.03  # scale of the Titans inner learning rate
    mem_max_norm: float = 4.0  # Frobenius cap of each memory matrix, per head
    lr_fast: float = 0.03
    lr_mid: float = 0.01
    decay_fast: float = 0.02  # pull towards the initial weights, per update
    decay_mid: float = 0.01
    cms_grad_clip: float = 5.0  # max norm of one session level's gradient (all layers)
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        check_types(self, "[model]")  # a config file's or a checkpoint's: `"false"`, `32.0`
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError("d_model / n_heads must be a whole, even number (rotary embeddings turn pairs)")
        if self.chunk < 2:  # the CMS loss of a chunk predicts its tokens from each other: none in 1
            raise ValueError("chunk must be at least 2")
        if self.window < self.chunk or self.mid_period < self.chunk:
            raise ValueError("window and mid_period must be at least one chunk")
        if self.window % self.chunk or self.mid_period % self.chunk:
            raise ValueError("window and mid_period must be multiples of chunk")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_memories(self) -> int:
        """Memories per head: the main one, plus k, v, eta and alpha when self-modifying."""
        return 5 if self.self_modifying else 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> HopeConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class Learning:
    """Which session levels learn. `Learning.off()` reads the state and changes nothing."""

    titans: bool = True
    fast: bool = True
    mid: bool = True

    @classmethod
    def off(cls) -> Learning:
        return cls(False, False, False)

    @property
    def any(self) -> bool:
        return self.titans or self.fast or self.mid


LEVELS = ("titans", "fast", "mid")
# up to this many sessions, a commit writes all layers' Titans memories as one stacked write
# (measured on 2 CPU cores: 1.7 ms saved of a 28 ms commit of one session, 3 ms lost of 125 ms
# for sixteen)
STACK_TITANS_ROWS = 4
# up to this many tokens in a forward, the Titans convolution is one product over all windows
# of inputs and a sum (fewest ops: a decode step, one session's commit); beyond, tap by tap
# (a 16-session commit's product was 4 MB per layer)
UNFOLD_CONV_TOKENS = 32
CMS_WEIGHTS = ("fast_up", "fast_down", "mid_up", "mid_down")  # the session CMS tensors


# --------------------------------------------------------------------------------------------
# State: a batch of sessions. Per layer a dict of tensors, each with the batch first.
# --------------------------------------------------------------------------------------------

@dataclass
class State:
    layers: list[dict[str, Tensor]]
    n_committed: Tensor  # [B] long: tokens in closed chunks; also the open chunk's first position
    n_open: Tensor  # [B] long: tokens absorbed into the open chunk (0..chunk-1 between calls)
    open_tokens: Tensor  # [B, chunk] long: the open chunk's tokens, for the learning re-forward
    last_hidden: Tensor  # [B, d] final residual of the last absorbed token (next-token logits)
    updates: Tensor  # [B, 3] long: updates so far per level (titans, fast, mid)

    @property
    def batch_size(self) -> int:
        return self.n_committed.shape[0]

    def tensors(self) -> dict[str, Tensor]:
        """Flat name -> tensor view, the layout used for serialisation and stacking."""
        out = {
            "n_committed": self.n_committed,
            "n_open": self.n_open,
            "open_tokens": self.open_tokens,
            "last_hidden": self.last_hidden,
            "updates": self.updates,
        }
        for i, layer in enumerate(self.layers):
            for k, v in layer.items():
                out[f"layers.{i}.{k}"] = v
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor], n_layers: int) -> State:
        layers: list[dict[str, Tensor]] = [{} for _ in range(n_layers)]
        for name, v in t.items():
            if name.startswith("layers."):
                _, i, k = name.split(".", 2)
                layers[int(i)][k] = v
        return cls(layers, t["n_committed"], t["n_open"], t["open_tokens"], t["last_hidden"],
                   t["updates"])

    def map(self, fn) -> State:
        return State.from_tensors({k: fn(v) for k, v in self.tensors().items()}, len(self.layers))

    def select(self, rows: Tensor) -> State:
        return self.map(lambda v: v[rows])

    def detach(self) -> State:
        return self.map(lambda v: v.detach())

    def clone(self) -> State:
        return self.map(lambda v: v.clone())

    def rows(self) -> list[State]:
        """Each row as a batch of one, viewing this state's tensors (no copy)."""
        return [self.map(lambda v, i=i: v[i:i + 1]) for i in range(self.batch_size)]

    @staticmethod
    def cat(states: list[State]) -> State:
        """The states stacked. Consecutive rows of one state (`rows`) are stacked as views of it,
        with no copy; only other states' tensors are copied."""
        flat = [s.tensors() for s in states]
        out = {}
        for k in flat[0]:
            parts = [f[k] for f in flat]
            joined = adjacent_join(parts, 0) if len(parts) > 1 else parts[0]
            out[k] = torch.cat(parts) if joined is None else joined
        return State.from_tensors(out, len(states[0].layers))

    def compact(self) -> State:
        """The state with its own memory: a tensor that views a larger one (a row of a batch) is
        copied, so a session kept for long does not keep a whole batch alive."""
        return self.map(lambda v: v.clone() if v.untyped_storage().nbytes() > v.nbytes else v)

    def scatter(self, rows: Tensor, sub: State) -> State:
        """A copy of self whose `rows` are replaced by `sub`."""
        mine, theirs = self.tensors(), sub.tensors()
        out = {}
        for k, v in mine.items():
            v = v.clone()
            v[rows] = theirs[k].to(v.dtype)
            out[k] = v
        return State.from_tensors(out, len(self.layers))


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


def rope_tables(pos: Tensor, dh: int, base: float) -> tuple[Tensor, Tensor]:
    """cos and sin [B, T, 1, 1, dh/2] of the rotary angles at absolute positions pos [B, T].

    Angles are computed in float64: a session is an endless stream, and positions in the
    millions would lose the relative phase in float32. One table serves every layer's q and k.
    """
    inv = base ** (-torch.arange(0, dh, 2, device=pos.device, dtype=torch.float64) / dh)
    ang = (pos.to(torch.float64)[..., None] * inv)[:, :, None, None, :]
    return torch.cos(ang).float(), torch.sin(ang).float()


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of x [B, T, ..., dh], with tables from `rope_tables`."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def append_open(committed: Tensor, open_buf: Tensor, pos: Positions, new: Tensor,
                inplace: bool = False) -> tuple[Tensor, Tensor]:
    """Write new [B, T, ...] into the open chunk's buffer at the slots `pos.slots` [B, T].

    Returns (new open buffer, committed history followed by it). A whole chunk (prefill,
    commit, training) needs no scatter: it is the open buffer. With `inplace` (the decode batch's
    own slot buffers) the open buffer is written where it lies, and when it directly follows the
    committed history in memory, the two are joined as a view instead of a copy.
    """
    T = new.shape[1]
    if T == open_buf.shape[1]:
        open_buf = new.to(open_buf.dtype)
    elif inplace and pos.open_slot is not None:  # every row writes the same slots: a plain copy
        open_buf[:, pos.open_slot:pos.open_slot + T] = new
    else:
        idx = pos.slots.view(*pos.slots.shape, *([1] * (new.dim() - 2))).expand_as(new)
        if inplace:
            open_buf.scatter_(1, idx, new.to(open_buf.dtype))
        else:
            open_buf = open_buf.scatter(1, idx, new.to(open_buf.dtype))
    if inplace:
        joined = adjacent_join((committed, open_buf), 1)
        if joined is not None:
            return open_buf, joined
    return open_buf, torch.cat([committed, open_buf], dim=1)


def adjacent_join(parts: Sequence[Tensor], dim: int) -> Tensor | None:
    """The parts joined along `dim` as one view, when each starts where the one before it ends
    in the same storage (row views of one tensor, a buffer split in two); otherwise None."""
    first = parts[0]
    ptr, step = first.untyped_storage().data_ptr(), first.stride(dim)
    offset = first.storage_offset()
    for part in parts:
        if (part.dtype != first.dtype or part.stride() != first.stride()
                or part.shape[:dim] != first.shape[:dim] or part.shape[dim + 1:] != first.shape[dim + 1:]
                or part.untyped_storage().data_ptr() != ptr or part.storage_offset() != offset):
            return None
        offset += part.shape[dim] * step
    size = (*first.shape[:dim], sum(p.shape[dim] for p in parts), *first.shape[dim + 1:])
    return first.as_strided(size, first.stride(), first.storage_offset())


def token_nll(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-token loss [B, T] of logits [B, T, V]. The rows are flattened so that the softmax runs
    along contiguous vocabulary rows: over the transposed [B, V, T] layout, forward and backward
    took three times as long on the CPU (9.5 against 3 ms for a 16-session commit)."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


def silu_grad(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def memory_apply(u: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Residual memory MLP M(u) = u + silu(u A) B, per head.

    u [B, T, H, dh] (or [B, H, N, T, dh] with a memory axis), a [B, H, N, dh, m], b [B, H, N, m, dh].
    With a memory axis N in the weights and none in u, u is read by every memory: [B, H, N, T, dh].
    """
    if u.dim() == 4:
        u = u.transpose(1, 2).unsqueeze(2)  # [B, H, 1, T, dh]
    return u + F.silu(u @ a) @ b


@dataclass
class Positions:
    """Where the tokens of one forward sit, shared by every layer: computed once per forward."""

    slots: Tensor  # [B, T] slot of each token inside the open chunk
    cos: Tensor  # rotary tables at the tokens' absolute positions, [B, T, 1, 1, dh/2]
    sin: Tensor
    mask: Tensor  # [B, 1, T, used + chunk] which keys each query sees
    used: int  # the newest `used` slots of the committed window are attended (the rest are empty)
    open_slot: int | None = None  # the first token's open slot when it is every row's (rows in phase)

    @classmethod
    def of(cls, cfg: HopeConfig, n_committed: Tensor, slots: Tensor, used: int | None = None,
           open_slot: int | None = None) -> Positions:
        used = cfg.window if used is None else used
        q_pos = n_committed[:, None] + slots  # [B, T] absolute positions
        cos, sin = rope_tables(q_pos, cfg.head_dim, cfg.rope_base)
        # keys: the newest `used` committed window slots (positions n_committed - used ...),
        # then the open chunk
        k_pos = n_committed[:, None] - used + torch.arange(used + cfg.chunk, device=slots.device)
        rel = q_pos[:, :, None] - k_pos[:, None, :]  # [B, T, S]
        # slots after a query's own hold later (or stale) tokens: rel < 0 masks them
        mask = (rel >= 0) & (rel < cfg.window) & (k_pos[:, None, :] >= 0)
        return cls(slots, cos, sin, mask[:, None], used, open_slot)


class SlidingWindowAttention(nn.Module):
    def __init__(self, cfg: HopeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)

    def forward(self, x: Tensor, layer: dict[str, Tensor], pos: Positions,
                inplace: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        """x [B, T, d]. Returns (output [B, T, d], the new open k/v buffers)."""
        cfg = self.cfg
        B, T, _ = x.shape
        H, dh = cfg.n_heads, cfg.head_dim
        qkv = self.qkv(x).view(B, T, 3, H, dh)
        q, k = rope(qkv[:, :, :2], pos.cos, pos.sin).unbind(2)
        first = cfg.window - pos.used
        open_k, kbuf = append_open(layer["attn_k"][:, first:], layer["open_k"], pos, k, inplace)
        open_v, vbuf = append_open(layer["attn_v"][:, first:], layer["open_v"], pos, qkv[:, :, 2],
                                   inplace)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), kbuf.to(q.dtype).transpose(1, 2), vbuf.to(q.dtype).transpose(1, 2),
            attn_mask=pos.mask,
        )
        return out.transpose(1, 2).reshape(B, T, -1), {"open_k": open_k, "open_v": open_v}


class TitansMemory(nn.Module):
    """Per-head associative memory, read before write (HOPE.md 2.1)."""

    def __init__(self, cfg: HopeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, H, dh, m, N = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.mem_hidden, cfg.n_memories
        # q, k, v projections go through the causal depthwise convolution
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        # Causal depthwise convolutions of width cw. With `key_shift` the keys' window ends one
        # token earlier than the queries' and values' (t-cw..t-1 instead of t-cw+1..t), so the
        # memory learns "what came before" -> "what came next": a later read with the same
        # context retrieves the token that followed it (the associative recall re-reading needs).
        span = cfg.conv_width + cfg.key_shift
        self.conv = nn.Parameter(torch.zeros(3 * d, span))
        mask = torch.ones(3, d, span)
        if cfg.key_shift:
            mask[[0, 2], :, 0] = 0  # q, v: taps t-cw+1..t
            mask[1, :, -1] = 0  # k: taps t-cw..t-1
        self.register_buffer("conv_mask", mask.view(3 * d, span), persistent=False)
        with torch.no_grad():
            self.conv.normal_(0, 0.02)
            self.conv.view(3, d, span)[[0, 2], :, -1] = 1.0  # start as identity
            self.conv.view(3, d, span)[1, :, -1 - cfg.key_shift] = 1.0  # k: the newest token it sees
        if cfg.self_modifying:
            self.eta_alpha_in = nn.Linear(d, 2 * d, bias=False)  # inputs of the eta/alpha memories
            self.eta_read = nn.Parameter(torch.randn(H, dh) * 0.02)
            self.alpha_read = nn.Parameter(torch.randn(H, dh) * 0.02)
        else:
            self.eta_alpha_in = nn.Linear(d, 2 * H, bias=False)
        self.eta_bias = nn.Parameter(torch.full((H,), -2.0))
        self.alpha_bias = nn.Parameter(torch.full((H,), 5.0))  # retain ~99.3% per token at start
        self.beta_logit = nn.Parameter(torch.tensor(1.5))  # momentum ~0.8 at start
        # meta-learned initial memories (the session's copies start from these)
        self.a0 = nn.Parameter(torch.randn(H, N, dh, m) * 0.5 / math.sqrt(dh))
        self.read_norm = RMSNorm(dh)  # a memory's read is bounded whatever its weights hold
        self.b0 = nn.Parameter(torch.randn(H, N, m, dh) * 0.02)

    def init_layer_state(self, batch: int) -> dict[str, Tensor]:
        d, cw, C = self.cfg.d_model, self.cfg.conv_width, self.cfg.chunk
        a0, b0 = self.a0, self.b0
        return {
            "mem_a": a0.expand(batch, *a0.shape).clone(),
            "mem_b": b0.expand(batch, *b0.shape).clone(),
            "mom_a": torch.zeros(batch, *a0.shape, device=a0.device),
            "mom_b": torch.zeros(batch, *b0.shape, device=a0.device),
            # pre-convolution q/k/v projections: the last cw committed ones, and the open chunk's
            "conv_tail": torch.zeros(batch, cw - 1 + self.cfg.key_shift, 3 * d, device=a0.device),
            "open_conv": torch.zeros(batch, C, 3 * d, device=a0.device),
        }

    def forward(self, x: Tensor, layer: dict[str, Tensor], pos: Positions, want_update: bool,
                inplace: bool = False):
        """Read the chunk-start memory. Returns (read [B, T, d], new open buffers, update inputs)."""
        cfg = self.cfg
        B, T, d = x.shape
        H, dh = cfg.n_heads, cfg.head_dim
        cw = cfg.conv_width - 1 + cfg.key_shift  # inputs before the first token that a conv reads
        proj = self.qkv(x)
        open_conv, seq = append_open(layer["conv_tail"], layer["open_conv"], pos, proj, inplace)
        if T != seq.shape[1] - cw:  # the tokens' rows and the cw before the first
            if pos.open_slot is not None:
                seq = seq[:, pos.open_slot:pos.open_slot + T + cw]
            else:
                rows = pos.slots[:, :1] + torch.arange(T + cw, device=x.device)
                seq = torch.gather(seq, 1, rows[..., None].expand(B, T + cw, 3 * d))
        # the depthwise causal convolution as a weighted sum of shifted inputs: a few fused
        # element-wise ops, where a library convolution costs more in setup than in arithmetic
        kernel = (self.conv * self.conv_mask).to(seq.dtype)  # [3d, span]
        if B * T <= UNFOLD_CONV_TOKENS:  # two ops over all windows of inputs
            mixed = (seq.unfold(1, cw + 1, 1) * kernel).sum(-1)  # [B, T, 3d]
        else:  # tap by tap: more ops, but no [B, T, 3d, span] product in memory
            mixed = seq[:, :T] * kernel[:, 0]
            for tap in range(1, cw + 1):
                mixed = torch.addcmul(mixed, seq[:, tap:tap + T], kernel[:, tap])
        q, k, v = mixed.view(B, T, 3, H, dh).unbind(2)
        q = F.normalize(q, dim=-1)
        a, b = layer["mem_a"], layer["mem_b"]
        read = memory_apply(q, a[:, :, :1], b[:, :, :1])[:, :, 0]  # [B, H, T, dh]
        read = self.read_norm(read).transpose(1, 2).reshape(B, T, d)
        upd = None
        if want_update:
            # a serving commit needs only their values (its gradient is the CMS levels'); the
            # outer loss of pre-training backpropagates through them
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.training):
                upd = self._update_inputs(x, k, v, a, b)
        return read, {"open_conv": open_conv}, upd

    def _update_inputs(self, x: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor):
        """Keys, values, targets, eta and alpha of each token, from the chunk-start memories."""
        cfg = self.cfg
        B, T, _ = x.shape
        H, dh = cfg.n_heads, cfg.head_dim
        ea = self.eta_alpha_in(x)
        if cfg.self_modifying:
            e_in, a_in = ea.view(B, T, 2, H, dh).unbind(2)
            # memories 1-4 read keys, values, eta and alpha inputs in one batched call; one
            # contiguous copy of their weights serves it and the targets below
            rest_a, rest_b = a[:, :, 1:].contiguous(), b[:, :, 1:].contiguous()  # [B, H, 4, ., .]
            inputs = torch.stack([k, v, e_in, a_in], dim=3).permute(0, 2, 3, 1, 4)  # [B, H, 4, T, dh]
            k, v, e_out, a_out = memory_apply(inputs, rest_a, rest_b).unbind(2)  # each [B, H, T, dh]
            eta_logit = (e_out * self.eta_read[None, :, None]).sum(-1)  # [B, H, T]
            alpha_logit = (a_out * self.alpha_read[None, :, None]).sum(-1)
            # each memory's own target: what it predicts for the value, gradient stopped
            v = v[:, :, None]  # [B, H, 1, T, dh]
            targets = torch.cat([v, memory_apply(v, rest_a, rest_b).detach()], dim=2)
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            eta_logit, alpha_logit = ea.view(B, T, 2, H).permute(2, 0, 3, 1)
            targets = v[:, :, None]
        # unit keys and values keep every memory's error, and so its writes, bounded
        k, targets = F.normalize(k, dim=-1), F.normalize(targets, dim=-1)
        eta = F.softplus(eta_logit + self.eta_bias[None, :, None]) * cfg.eta_max
        alpha = torch.sigmoid(alpha_logit + self.alpha_bias[None, :, None])
        return k, targets, eta, alpha

    def write(self, layer: dict[str, Tensor], upd) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """One chunk's write. Returns (new memory tensors, surprise [B], relative update [B])."""
        B = upd[0].shape[0]
        return titans_write(layer, upd, torch.sigmoid(self.beta_logit).expand(B), self.cfg.mem_max_norm)


def titans_write(layer: dict[str, Tensor], upd, beta: Tensor, cap: float
                 ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """One chunk's Titans write of B rows, each with its momentum beta [B] (rows may be sessions,
    or the same sessions' layers stacked). Returns (new memory tensors, surprise [B], relative
    update [B]).

    The write runs in the memories' precision (float32) also under autocast: a chunk's update is
    small against the memory it changes and would round away in bfloat16."""
    dtype = layer["mem_a"].dtype
    with torch.autocast(layer["mem_a"].device.type, enabled=False):
        return _titans_write(layer, tuple(t.to(dtype) for t in upd), beta.to(dtype), cap)


def _titans_write(layer: dict[str, Tensor], upd, beta: Tensor, cap: float
                  ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    k, targets, eta, alpha = upd  # [B,H,T,dh], [B,H,N,T,dh], [B,H,T], [B,H,T]
    a, b, sa, sb = layer["mem_a"], layer["mem_b"], layer["mom_a"], layer["mom_b"]
    T = k.shape[2]
    beta = beta.view(-1, 1, 1)  # [B, 1, 1]
    # per-token gradients of l_t = ||M(k_t) - target_t||^2 at the chunk-start weights
    ku = k[:, :, None]  # [B, H, 1, T, dh]
    z = ku @ a  # [B, H, N, T, m]
    h = F.silu(z)
    err = ku + h @ b - targets
    sq = (err ** 2).sum(-1, keepdim=True)
    surprise = sq[:, :, 0, :, 0]  # main memory's loss per token [B, H, T]
    # Huber-like: beyond an error of norm 1 the gradient stops growing, so one wild token
    # (or a long session) cannot blow a memory up
    d_out = 2 * err / sq.sqrt().clamp_min(1.0)
    d_z = (d_out @ b.transpose(-1, -2)) * silu_grad(z)
    # closed form of S_t = beta S_{t-1} - eta_t g_t ; M_t = alpha_t M_{t-1} + S_t over the chunk
    log_alpha = torch.log(alpha.clamp_min(1e-12))
    suffix = log_alpha.sum(-1, keepdim=True) - torch.cumsum(log_alpha, -1)  # sum_{s>t}
    q_t = torch.exp(suffix)  # [B, H, T]: prod_{s>t} alpha_s
    t_idx = torch.arange(T, device=k.device)
    gap = (t_idx[:, None] - t_idx[None, :]).clamp_min(0)  # [t, j]
    beta_pow = torch.where(t_idx[:, None] >= t_idx[None, :], beta ** gap, 0.0)  # [B, t, j]
    c_mem = eta * (q_t[:, :, None] @ beta_pow[:, None])[:, :, 0]  # [B, H, T]: weight of g_j in M_T
    c_mom = eta * beta ** (T - 1 - t_idx)  # weight of g_j in S_T
    keep = torch.exp(log_alpha.sum(-1))[..., None, None, None]  # prod alpha, [B, H, 1, 1, 1]
    mom_into_mem = (q_t * beta ** (t_idx + 1)).sum(-1)[..., None, None, None]

    # base - sum_j c_j u_j^T d_j, the chunk's weighted gradient taken off in the matmul
    # itself, in place: the state's memories are the largest tensors a commit touches, and every
    # pass saved over them is a pass over memory. `base` is always a fresh tensor made here, and
    # no backward needs its value, so autograd allows the in-place add
    def minus_weighted(base: Tensor, c: Tensor, u: Tensor, d: Tensor) -> Tensor:
        lead = base.shape[:-2]
        u = u.expand(*lead, *u.shape[-2:]).flatten(0, -3)  # [BHN, T, x]
        d = (d * c[:, :, None, :, None]).flatten(0, -3)  # [BHN, T, y]
        return base.flatten(0, -3).baddbmm_(u.transpose(-1, -2), d, alpha=-1).view(base.shape)

    def capped(m: Tensor) -> Tensor:
        norm = m.norm(dim=(-2, -1), keepdim=True)
        # serving on the CPU knows for free whether any memory is over the cap (on CUDA it would
        # wait on the device); when none is, the scale is exactly 1 and its pass is skipped.
        # Serving's commit runs in grad mode (for the CMS gradient), so what tells a serving write
        # from pre-training's is whether its memories carry a graph
        if not m.requires_grad and not m.is_cuda and bool((norm <= cap).all()):
            return m
        return m * (cap / norm.clamp_min(cap))

    new_a = minus_weighted(torch.addcmul(keep * a, mom_into_mem, sa), c_mem, ku, d_z)
    new_b = minus_weighted(torch.addcmul(keep * b, mom_into_mem, sb), c_mem, h, d_out)
    beta_T = (beta ** T)[..., None, None]  # [B, 1, 1, 1, 1]
    new_sa = minus_weighted(sa * beta_T, c_mom, ku, d_z)
    new_sb = minus_weighted(sb * beta_T, c_mom, h, d_out)
    new_a, new_b = capped(new_a), capped(new_b)
    delta = (((new_a[:, :, 0] - a[:, :, 0]) ** 2).sum((1, 2, 3))
             + ((new_b[:, :, 0] - b[:, :, 0]) ** 2).sum((1, 2, 3)))
    norm = (a[:, :, 0] ** 2).sum((1, 2, 3)) + (b[:, :, 0] ** 2).sum((1, 2, 3))
    rel = (delta / norm.clamp_min(1e-12)).sqrt()
    new = {"mem_a": new_a, "mem_b": new_b, "mom_a": new_sa, "mom_b": new_sb}
    return new, surprise.mean((1, 2)), rel


class SessionMLP(nn.Module):
    """A CMS level whose weights belong to the session: h + silu(norm(h) U) D, batched per row."""

    def __init__(self, d: int, hidden: int, name: str) -> None:
        super().__init__()
        self.name = name
        self.norm = RMSNorm(d)
        self.up0 = nn.Parameter(torch.randn(d, hidden) / math.sqrt(d))
        self.down0 = nn.Parameter(torch.zeros(hidden, d))

    def init_layer_state(self, batch: int) -> dict[str, Tensor]:
        up, down = self.up0, self.down0
        return {
            f"{self.name}_up": up.expand(batch, *up.shape).clone(),
            f"{self.name}_down": down.expand(batch, *down.shape).clone(),
        }

    def forward(self, h: Tensor, up: Tensor, down: Tensor) -> Tensor:
        return h + F.silu(self.norm(h) @ up) @ down


class HopeBlock(nn.Module):
    def __init__(self, cfg: HopeConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.norm = RMSNorm(d)
        self.attn = SlidingWindowAttention(cfg)
        self.titans = TitansMemory(cfg)
        self.gate = nn.Linear(d, d)
        self.out = nn.Linear(d, d, bias=False)
        self.slow_norm = RMSNorm(d)
        self.slow_up = nn.Linear(d, cfg.slow_hidden, bias=False)
        self.slow_down = nn.Linear(cfg.slow_hidden, d, bias=False)
        self.mid = SessionMLP(d, cfg.mid_hidden, "mid")
        self.fast = SessionMLP(d, cfg.fast_hidden, "fast")

    def init_layer_state(self, batch: int) -> dict[str, Tensor]:
        cfg = self.cfg
        dev = self.out.weight.device
        s = {
            "attn_k": torch.zeros(batch, cfg.window, cfg.n_heads, cfg.head_dim, device=dev),
            "attn_v": torch.zeros(batch, cfg.window, cfg.n_heads, cfg.head_dim, device=dev),
            "open_k": torch.zeros(batch, cfg.chunk, cfg.n_heads, cfg.head_dim, device=dev),
            "open_v": torch.zeros(batch, cfg.chunk, cfg.n_heads, cfg.head_dim, device=dev),
        }
        mid = self.mid.init_layer_state(batch)
        s |= self.titans.init_layer_state(batch) | mid | self.fast.init_layer_state(batch)
        s |= {f"{k}_grad": torch.zeros_like(v) for k, v in mid.items()}  # open mid gradient
        return s

    def forward(self, x: Tensor, layer: dict[str, Tensor], pos: Positions, want_update: bool,
                inplace: bool = False):
        xn = self.norm(x)
        a, open_kv = self.attn(xn, layer, pos, inplace)
        m, open_conv, upd = self.titans(xn, layer, pos, want_update, inplace)
        g = torch.sigmoid(self.gate(xn))
        x = x + self.out(g * a + (1 - g) * m)
        x = x + self.slow_down(F.silu(self.slow_up(self.slow_norm(x))))
        x = self.mid(x, layer["mid_up"], layer["mid_down"])
        x = self.fast(x, layer["fast_up"], layer["fast_down"])
        return x, open_kv | open_conv, upd


# --------------------------------------------------------------------------------------------
# The language model
# --------------------------------------------------------------------------------------------

@dataclass
class ChunkMetrics:
    """Per-row metrics of one chunk commit (each [B]); rows that did not learn hold NaN."""

    surprise: dict[str, Tensor]
    update_norm: dict[str, Tensor]


class HopeLM(nn.Module):
    def __init__(self, cfg: HopeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = nn.ModuleList(HopeBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model)
        if not cfg.tie_embeddings:
            self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        for name, p in self.named_parameters():
            if name.endswith(("out.weight", "slow_down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))

    # ---- state ---------------------------------------------------------------------------

    def init_state(self, batch: int = 1, training: bool = False) -> State:
        """Fresh sessions: every memory at its meta-learned initial value, nothing absorbed.

        With `training` the memories stay connected to their initial values' parameters, so
        pre-training meta-learns them; otherwise the state is plain data.
        """
        dev = self.embed.weight.device
        zeros = torch.zeros(batch, dtype=torch.long, device=dev)
        state = State(
            layers=[blk.init_layer_state(batch) for blk in self.blocks],
            n_committed=zeros.clone(),
            n_open=zeros.clone(),
            open_tokens=torch.zeros(batch, self.cfg.chunk, dtype=torch.long, device=dev),
            last_hidden=torch.zeros(batch, self.cfg.d_model, device=dev),
            updates=torch.zeros(batch, len(LEVELS), dtype=torch.long, device=dev),
        )
        if training:
            return state
        # session memories are at least float32 even when the slow weights are bfloat16: their
        # updates are small relative to the weights and would round away
        dtype = torch.promote_types(self.embed.weight.dtype, torch.float32)
        return state.map(lambda v: v.detach().to(dtype) if v.is_floating_point() else v.detach())

    def logits(self, hidden: Tensor) -> Tensor:
        h = self.norm(hidden)
        w = self.embed.weight if self.cfg.tie_embeddings else self.head.weight
        return h @ w.to(h.dtype).t()

    # ---- forward inside one chunk --------------------------------------------------------

    def forward_open(self, tokens: Tensor, state: State, want_update: bool = False,
                     inplace: bool = False, window_used: int | None = None):
        """Absorb tokens [B, T] into the open chunk, with no memory change.

        Requires n_open + T <= chunk for every row. Returns (hidden [B, T, d], new state,
        per-layer Titans update inputs or None). The new state has the tokens' keys, values and
        conv inputs written into the open slots and n_open advanced; nothing is committed.
        With `inplace` the open buffers of `state` itself are written (the decode batch's slots).

        `window_used`: how many of the newest committed window slots can hold keys, at least
        min(window, n_committed) of every row; attention reads only those (a young session's
        window is mostly empty). By default it is read off `n_committed` on the CPU and is the
        whole window on CUDA, where reading it would wait on the device and where captured
        graphs need fixed shapes.
        """
        T = tokens.shape[1]
        offs = torch.arange(T, device=tokens.device)
        slots_open = state.n_open[:, None] + offs  # [B, T] slot inside the open chunk
        open_slot = None
        if not tokens.is_cuda:  # reading the counters on CUDA would wait on the device
            if window_used is None:
                window_used = min(self.cfg.window, int(state.n_committed.max()))
            lo, hi = state.n_open.aminmax()
            open_slot = int(lo) if int(lo) == int(hi) else None
        pos = Positions.of(self.cfg, state.n_committed, slots_open, window_used, open_slot)
        x = self.embed(tokens)
        new_layers, upds = [], []
        for blk, layer in zip(self.blocks, state.layers):
            x, written, upd = blk(x, layer, pos, want_update, inplace)
            new_layers.append(layer | written)
            upds.append(upd)
        open_tokens = state.open_tokens.scatter(1, slots_open, tokens)
        new = State(new_layers, state.n_committed, state.n_open + T, open_tokens, x[:, -1],
                    state.updates)
        return x, new, (upds if want_update else None)

    # ---- chunk commit ----------------------------------------------------------------------

    def roll(self, state: State) -> State:
        """Close the open chunk: its slots become committed history; memories unchanged."""
        C = self.cfg.chunk
        layers = []
        for layer in state.layers:
            new = dict(layer)
            for key, open_key in (("attn_k", "open_k"), ("attn_v", "open_v"),
                                  ("conv_tail", "open_conv")):
                kept = layer[key].shape[1]  # the newest `kept` of history and open chunk
                if kept > C:
                    new[key] = torch.cat([layer[key][:, C:], layer[open_key]], dim=1)
                else:
                    new[key] = layer[open_key][:, C - kept:].clone()
                new[open_key] = torch.zeros_like(layer[open_key]).detach()
            layers.append(new)
        return State(layers, state.n_committed + C, torch.zeros_like(state.n_open),
                     torch.zeros_like(state.open_tokens), state.last_hidden, state.updates)

    def learn_chunk(self, tokens: Tensor, start: State, learning: Learning,
                    training: bool = False, roll: bool = True) -> tuple[Tensor, State, ChunkMetrics]:
        """Compute one whole chunk from its chunk-start state and commit it, learning.

        tokens [B, chunk]; `start` has n_open == 0. Returns (hidden [B, chunk, d], the state after
        the commit, metrics). This one function serves chunked prefill, the commit after
        token-by-token decoding (a re-forward of the chunk) and pre-training. With `training`,
        the graph is kept so the outer loss backpropagates through the Titans writes (CMS writes
        are stop-gradient); otherwise the result is detached. With `roll=False` the chunk stays
        open in the result (learned, its keys in the open buffers, n_open == chunk), for a caller
        that rolls its own buffers in place (the decode batch).
        """
        B = tokens.shape[0]
        nan = torch.full((B,), float("nan"), device=tokens.device)
        metrics = ChunkMetrics({lvl: nan for lvl in LEVELS}, {lvl: nan for lvl in LEVELS})
        with torch.enable_grad():
            if (learning.fast or learning.mid) and not start.layers[0]["fast_up"].requires_grad:
                start = self._track_cms(start)
            hidden, after, upds = self.forward_open(tokens, start, want_update=learning.titans)
            layers = [dict(layer) for layer in after.layers]
            updates = after.updates.clone()
            if learning.fast or learning.mid:
                self._write_cms(tokens, hidden, start, layers, updates, learning, metrics, training)
            if learning.titans:
                surprise, rel = self._write_titans(layers, upds)
                metrics.surprise["titans"] = surprise.detach()
                metrics.update_norm["titans"] = rel.detach()
                updates[:, 0] += 1
        after = State(layers, after.n_committed, after.n_open, after.open_tokens,
                      after.last_hidden, updates)
        if not training:
            hidden, after = hidden.detach(), after.detach()
        return hidden, (self.roll(after) if roll else after), metrics

    def _write_titans(self, layers: list[dict[str, Tensor]], upds: list) -> tuple[Tensor, Tensor]:
        """Every layer's Titans write. Returns the surprise and the relative update per session,
        averaged over the layers. A write is a hundred small ops: for a few sessions the layers
        are stacked as rows of one write, paying them once, not per layer; with many sessions,
        stacking their memories would cost more than the ops it saves (STACK_TITANS_ROWS)."""
        L, B = len(layers), upds[0][0].shape[0]
        if B > STACK_TITANS_ROWS:
            writes = [blk.titans.write(layer, upd) for blk, layer, upd in zip(self.blocks, layers, upds)]
            for layer, (new, _, _) in zip(layers, writes):
                layer.update(new)
            return torch.stack([w[1] for w in writes]).mean(0), torch.stack([w[2] for w in writes]).mean(0)
        keys = ("mem_a", "mem_b", "mom_a", "mom_b")
        mem = {k: torch.cat([layer[k] for layer in layers]) for k in keys}
        upd = tuple(torch.cat([u[i] for u in upds]) for i in range(len(upds[0])))
        beta = torch.cat([torch.sigmoid(blk.titans.beta_logit).expand(B) for blk in self.blocks])
        new, surprise, rel = titans_write(mem, upd, beta, self.cfg.mem_max_norm)
        for k, v in new.items():
            for layer, part in zip(layers, v.split(B)):
                layer[k] = part
        return surprise.view(L, B).mean(0), rel.view(L, B).mean(0)

    def close_chunk(self, state: State, learning: Learning, roll: bool = True
                    ) -> tuple[State, ChunkMetrics | None]:
        """Commit the full open chunk of every row (n_open == chunk) after token-by-token
        decoding: re-forward it from its chunk-start state and learn, or with learning off only
        roll it. The decode step's `last_hidden` is kept, so a commit never changes what the next
        token is sampled from. Returns the metrics (None when nothing learned). `roll`: as in
        `learn_chunk`."""
        if not learning.any:
            return (self.roll(state) if roll else state), None
        start = replace(state, n_open=torch.zeros_like(state.n_open))
        _, done, metrics = self.learn_chunk(state.open_tokens, start, learning, roll=roll)
        return replace(done, last_hidden=state.last_hidden), metrics

    def _track_cms(self, state: State) -> State:
        """A shallow copy whose session CMS weights are autograd leaves (serving, evaluation)."""
        layers = []
        for layer in state.layers:
            layer = dict(layer)
            for key in CMS_WEIGHTS:
                layer[key] = layer[key].detach().requires_grad_(True)
            layers.append(layer)
        return State(layers, state.n_committed, state.n_open, state.open_tokens,
                     state.last_hidden, state.updates)

    def _write_cms(self, tokens: Tensor, hidden: Tensor, start: State,
                   layers: list[dict[str, Tensor]], updates: Tensor, learning: Learning,
                   metrics: ChunkMetrics, training: bool) -> None:
        """Step the fast level (every chunk) and the mid level (every mid_period tokens)."""
        cfg = self.cfg
        B = tokens.shape[0]
        nll = token_nll(self.logits(hidden[:, :-1]).float(), tokens[:, 1:])  # [B, C-1]
        params = [layer[key] for layer in start.layers for key in CMS_WEIGHTS]
        grads = torch.autograd.grad(nll.sum(), params, retain_graph=training)
        grads = {(i, key): g.detach()
                 for (i, key), g in zip(((i, k) for i in range(len(layers)) for k in CMS_WEIGHTS),
                                        grads)}
        closes_mid = (start.n_committed + cfg.chunk) % cfg.mid_period == 0  # [B]
        for lvl, lr, decay in (("fast", cfg.lr_fast, cfg.decay_fast),
                               ("mid", cfg.lr_mid, cfg.decay_mid)):
            if not getattr(learning, lvl):
                continue
            keys = [f"{lvl}_up", f"{lvl}_down"]
            level_grads = [grads[(i, k)] for i in range(len(layers)) for k in keys]
            # the session levels are a large share of what a commit moves through memory: each
            # norm is one pass, and each step is written in as few passes as it can be
            sq = sum(torch.linalg.vector_norm(g, dim=(1, 2)) ** 2 for g in level_grads)
            clip = (cfg.cms_grad_clip / (sq.sqrt() + 1e-6)).clamp(max=1.0).view(B, 1, 1)
            shut = closes_mid.to(clip.dtype).view(B, 1, 1)  # 1 where the mid period closes
            # on the CPU, knowing that no row closes its mid period costs nothing (on CUDA it
            # would wait on the device): then the mid level only adds to its open gradient
            stepping = lvl == "fast" or closes_mid.is_cuda or bool(closes_mid.any())
            step_sq = torch.zeros(B, device=tokens.device)
            weight_sq = torch.zeros(B, device=tokens.device)
            for i, (blk, layer) in enumerate(zip(self.blocks, layers)):
                level = getattr(blk, lvl)
                for key, init in zip(keys, (level.up0, level.down0)):
                    cur, g = start.layers[i][key], grads[(i, key)]
                    if lvl == "mid":  # accumulate; step only when the mid period closes
                        acc = torch.addcmul(start.layers[i][f"{key}_grad"], g, clip)
                        if not stepping:
                            layer[f"{key}_grad"] = acc
                            # a new autograd node, as a step would make: the next chunk's
                            # gradient is taken at this chunk's end, not through this chunk
                            layer[key] = cur.view_as(cur)
                            continue
                        layer[f"{key}_grad"] = acc * (1 - shut)
                        step = torch.sub(cur, init).mul_(decay).add_(acc, alpha=lr).mul_(shut)
                    else:
                        step = torch.addcmul(torch.sub(cur, init).mul_(decay), g, clip * lr)
                    layer[key] = cur - step
                    step_sq = step_sq + torch.linalg.vector_norm(step.detach(), dim=(1, 2)) ** 2
                    weight_sq = weight_sq + torch.linalg.vector_norm(cur.detach(), dim=(1, 2)) ** 2
            rel = (step_sq / weight_sq.clamp_min(1e-12)).sqrt()
            metrics.surprise[lvl] = nll.detach().mean(-1)
            if lvl == "mid":
                metrics.update_norm[lvl] = torch.where(closes_mid, rel, torch.full_like(rel, float("nan")))
                updates[:, 2] += closes_mid.long()
            else:
                metrics.update_norm[lvl] = rel
                updates[:, 1] += 1

    # ---- pre-training ------------------------------------------------------------------------

    def forward(self, inputs: Tensor, targets: Tensor, learning: Learning = Learning()) -> Tensor:
        """Per-token loss [B, T] of whole sequences from fresh sessions, learning as in serving.

        T must be a multiple of `chunk`. The inner updates run inside the sequence (HOPE.md
        2.3): gradients flow through the Titans writes into the slow weights and the memories'
        initial values; the CMS writes are stop-gradient steps.
        """
        C = self.cfg.chunk
        if inputs.shape[1] % C:
            raise ValueError(f"sequence length {inputs.shape[1]} is not a multiple of chunk {C}")
        state = self.init_state(inputs.shape[0], training=True)
        losses = []
        for c in range(0, inputs.shape[1], C):
            hidden, state, _ = self.learn_chunk(inputs[:, c:c + C], state, learning, training=True)
            losses.append(token_nll(self.logits(hidden).float(), targets[:, c:c + C]))
        return torch.cat(losses, dim=1)
