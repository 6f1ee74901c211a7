"""Titans memory: the hand-written inner gradients and the closed-form chunk write.

`TitansMemory.write` takes every token's gradient at the chunk-start weights (the dual form) and
applies momentum and the retention gate in closed form. Here it is checked against an explicit
token-by-token recurrence

    g_t = grad of the (Huber-clipped) loss l_t at the chunk-start weights   (autograd)
    S_t = beta S_{t-1} - eta_t g_t
    M_t = alpha_t M_{t-1} + S_t

followed by the per-head Frobenius cap, for both variants (self-modifying and plain). The
clipped loss is ||e||^2 for ||e|| <= 1 and 2 ||e|| - 1 beyond (gradient 2 e / max(||e||, 1)).

Then: pre-training gradients flow through the inner loop into the memories' initial values and
the slow weights, and they are the true derivatives (finite differences in float64).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from hope_testkit import make_model
from torch.utils._python_dispatch import TorchDispatchMode

import hope_core.model as model_module
from hope_core.model import HopeConfig, Learning, TitansMemory

SMALL = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, window=8, chunk=4, mid_period=8,
             mem_hidden=8, slow_hidden=64, mid_hidden=16, fast_hidden=8)


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def clipped_sq(err: torch.Tensor) -> torch.Tensor:
    """Per-token loss whose gradient is 2 e / max(||e||, 1)."""
    n = err.norm(dim=-1)
    return torch.where(n <= 1, n ** 2, 2 * n - 1)


def reference_write(mem: TitansMemory, layer: dict, upd) -> dict:
    """The explicit recurrence, one token at a time, with autograd's per-token gradients."""
    k, targets, eta, alpha = (x.detach() for x in upd)
    a, b = layer["mem_a"].detach(), layer["mem_b"].detach()
    sa, sb = layer["mom_a"].detach(), layer["mom_b"].detach()
    B, H, N, dh, m = a.shape
    T = k.shape[2]
    beta = torch.sigmoid(mem.beta_logit.detach())
    # one copy of the chunk-start weights per token: the gradient of sum_t l_t w.r.t. copy t
    # is g_t, each taken at the chunk-start weights
    A = a[:, :, :, None].expand(B, H, N, T, dh, m).clone().requires_grad_(True)
    Bw = b[:, :, :, None].expand(B, H, N, T, m, dh).clone().requires_grad_(True)
    ku = k[:, :, None, :, None, :]  # [B, H, 1, T, 1, dh]
    pred = (ku + F.silu(ku @ A) @ Bw)[..., 0, :]  # [B, H, N, T, dh]
    err = pred - targets
    ga, gb = torch.autograd.grad(clipped_sq(err).sum(), (A, Bw))
    Ma, Mb, Sa, Sb = a.clone(), b.clone(), sa.clone(), sb.clone()
    for t in range(T):
        e_t = eta[:, :, t, None, None, None]
        al_t = alpha[:, :, t, None, None, None]
        Sa = beta * Sa - e_t * ga[:, :, :, t]
        Sb = beta * Sb - e_t * gb[:, :, :, t]
        Ma = al_t * Ma + Sa
        Mb = al_t * Mb + Sb
    cap = mem.cfg.mem_max_norm
    Ma = Ma * (cap / Ma.norm(dim=(-2, -1), keepdim=True).clamp_min(cap))
    Mb = Mb * (cap / Mb.norm(dim=(-2, -1), keepdim=True).clamp_min(cap))
    surprise = (err[:, :, 0].detach() ** 2).sum(-1).mean((1, 2))  # main memory, unclipped
    err_norms = err.detach().norm(dim=-1)
    return {"mem_a": Ma, "mem_b": Mb, "mom_a": Sa, "mom_b": Sb, "surprise": surprise,
            "err_norms": err_norms}


def random_inputs(cfg: HopeConfig, B: int = 2, T: int = 7, seed: int = 0):
    """A layer state with non-trivial memories and momentum, and update inputs where about half
    the tokens have a small error (||e|| < 1) and half a large one (the clipped regime)."""
    g = torch.Generator().manual_seed(seed)
    H, dh, m, N = cfg.n_heads, cfg.head_dim, cfg.mem_hidden, cfg.n_memories

    def rn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    layer = {"mem_a": rn(B, H, N, dh, m) / dh ** 0.5, "mem_b": rn(B, H, N, m, dh) * 0.1,
             "mom_a": rn(B, H, N, dh, m) * 0.05, "mom_b": rn(B, H, N, m, dh) * 0.05}
    k = F.normalize(rn(B, H, T, dh), dim=-1)
    near = F.normalize(k[:, :, None] + 0.25 * rn(B, H, N, T, dh), dim=-1)
    far = F.normalize(rn(B, H, N, T, dh), dim=-1)
    pick = (torch.arange(T) % 2 == 0).view(1, 1, 1, T, 1)
    targets = torch.where(pick, near, far)
    eta = torch.rand(B, H, T, generator=g, dtype=torch.float64) * 0.5
    alpha = 0.7 + 0.3 * torch.rand(B, H, T, generator=g, dtype=torch.float64)
    return layer, (k, targets, eta, alpha)


def titans_module(self_modifying: bool, **overrides) -> TitansMemory:
    torch.manual_seed(0)
    cfg = HopeConfig(**(SMALL | {"self_modifying": self_modifying} | overrides))
    return TitansMemory(cfg).double()


def check_write(mem: TitansMemory, layer: dict, upd, atol: float) -> dict:
    with torch.no_grad():
        new, surprise, rel = mem.write(layer, upd)
    ref = reference_write(mem, layer, upd)
    for key in ("mem_a", "mem_b", "mom_a", "mom_b"):
        assert new[key].shape == layer[key].shape
        diff = float((new[key].double() - ref[key].double()).abs().max())
        assert diff <= atol, f"{key}: closed form vs recurrence differ by {diff}"
    assert float((surprise.double() - ref["surprise"]).abs().max()) <= atol
    a, b = layer["mem_a"][:, :, 0], layer["mem_b"][:, :, 0]
    want_rel = (((new["mem_a"][:, :, 0] - a) ** 2).sum((1, 2, 3))
                + ((new["mem_b"][:, :, 0] - b) ** 2).sum((1, 2, 3))).sqrt() / (
                   (a ** 2).sum((1, 2, 3)) + (b ** 2).sum((1, 2, 3))).sqrt()
    assert float((rel.double() - want_rel.double()).abs().max()) <= atol
    return ref


@pytest.mark.parametrize("self_modifying", [True, False])
@pytest.mark.parametrize("beta_logit", [1.5, -0.7])
def test_write_equals_token_by_token_recurrence(self_modifying, beta_logit):
    mem = titans_module(self_modifying)
    with torch.no_grad():
        mem.beta_logit.fill_(beta_logit)
    layer, upd = random_inputs(mem.cfg, seed=int(self_modifying))
    ref = check_write(mem, layer, upd, atol=1e-10)
    norms = ref["err_norms"]
    assert bool((norms < 1).any()) and bool((norms > 1).any()), "both loss regimes must occur"
    assert all(float(layer[k].norm(dim=(-2, -1)).max()) < mem.cfg.mem_max_norm
               for k in ("mem_a", "mem_b"))


@pytest.mark.parametrize("self_modifying", [True, False])
def test_write_applies_the_norm_cap(self_modifying):
    """With a cap below the memories' norms, the write returns memories of exactly that norm,
    as the capped recurrence does."""
    mem = titans_module(self_modifying, mem_max_norm=0.5)
    layer, upd = random_inputs(mem.cfg, seed=3)
    assert float(layer["mem_a"].norm(dim=(-2, -1)).min()) > 0.5
    check_write(mem, layer, upd, atol=1e-10)
    with torch.no_grad():
        new, _, _ = mem.write(layer, upd)
    n = new["mem_a"].norm(dim=(-2, -1))
    assert float((n - 0.5).abs().max()) <= 1e-9


class MemoryShapedProducts(TorchDispatchMode):
    """Counts the element-wise products whose result has the shape of the memories."""

    def __init__(self, shape: torch.Size) -> None:
        super().__init__()
        self.shape, self.count = shape, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._overloadpacket is torch.ops.aten.mul and out.shape == self.shape:
            self.count += 1
        return out


def test_a_serving_write_under_the_cap_skips_the_caps_scale():
    """Serving commits in grad mode (the CMS levels' gradient): a write whose memories carry no
    graph and are all under the cap leaves out the scaling pass over them (a pass over every
    session's memories, 7% of a 16-session commit), and writes the same memories."""
    results = {}
    for cap in (1e3, 0.5):  # every memory under the cap, then every one over it
        mem = titans_module(True, mem_max_norm=cap).requires_grad_(False)  # as the engine holds it
        layer, upd = random_inputs(mem.cfg, seed=3)
        counter = MemoryShapedProducts(layer["mem_a"].shape)
        with torch.enable_grad(), counter:
            new, _, _ = mem.write(layer, upd)
        results[cap] = counter.count, new
    (under, new_under), (over, _) = results[1e3], results[0.5]
    assert over == under + 1  # mem_a's scale (mem_b's has its own shape)
    mem = titans_module(True, mem_max_norm=1e3)
    layer, upd = random_inputs(mem.cfg, seed=3)
    with torch.no_grad():
        capped = model_module._titans_write(layer, upd, torch.sigmoid(mem.beta_logit).expand(upd[0].shape[0]), 1e3)
    for key in new_under:
        assert torch.equal(new_under[key], capped[0][key])


@pytest.mark.parametrize("self_modifying", [True, False])
def test_single_token_write_is_one_recurrence_step(self_modifying):
    """T = 1: S = beta S0 - eta g, M = alpha M0 + S, with g = autograd gradient."""
    mem = titans_module(self_modifying)
    layer, upd = random_inputs(mem.cfg, T=1, seed=5)
    check_write(mem, layer, upd, atol=1e-10)


@pytest.mark.parametrize("self_modifying", [True, False])
def test_write_with_model_update_inputs(self_modifying):
    """The update inputs that the model derives from real tokens (keys, per-memory targets, eta,
    alpha), from a state that has learned: the write equals the recurrence in every layer, and
    `learn_chunk` commits exactly that write."""
    with default_dtype(torch.float64):
        cfg = HopeConfig(**(SMALL | {"self_modifying": self_modifying}))
        model = make_model(cfg, seed=1).eval().requires_grad_(False)
        state = model.init_state(1)
        g = torch.Generator().manual_seed(2)
        toks = torch.randint(0, cfg.vocab_size, (1, 4 * cfg.chunk), generator=g)
        C = cfg.chunk
        for c in range(0, 3 * C, C):  # three chunks learned: memories and momentum are non-trivial
            _, state, _ = model.learn_chunk(toks[:, c:c + C], state, Learning())
        chunk = toks[:, 3 * C:]
        with torch.no_grad():
            _, _, upds = model.forward_open(chunk, state, want_update=True)
        _, after, _ = model.learn_chunk(chunk, state, Learning(titans=True, fast=False, mid=False))
        for i, (blk, upd) in enumerate(zip(model.blocks, upds)):
            k, targets, eta, alpha = upd
            assert torch.allclose(k.norm(dim=-1), torch.ones(()).double())
            assert torch.allclose(targets.norm(dim=-1), torch.ones(()).double())
            assert targets.shape[2] == cfg.n_memories
            assert bool(((eta > 0) & (eta < cfg.eta_max)).all())
            assert bool(((alpha > 0) & (alpha < 1)).all())
            ref = check_write(blk.titans, state.layers[i], upd, atol=1e-10)
            for key in ("mem_a", "mem_b", "mom_a", "mom_b"):
                diff = float((after.layers[i][key] - ref[key]).abs().max())
                assert diff <= 1e-10, f"layer {i} {key}: learn_chunk vs recurrence {diff}"


@pytest.mark.parametrize("self_modifying", [True, False])
def test_write_float32_matches_float64_recurrence(self_modifying):
    """The write in float32 (as served) is within float32 rounding of the exact recurrence."""
    mem = titans_module(self_modifying)
    layer, upd = random_inputs(mem.cfg, seed=7)
    ref = reference_write(mem, layer, upd)
    mem32 = titans_module(self_modifying).float()
    with torch.no_grad():
        new, _, _ = mem32.write({k: v.float() for k, v in layer.items()}, tuple(x.float() for x in upd))
    for key in ("mem_a", "mem_b", "mom_a", "mom_b"):
        assert float((new[key].double() - ref[key]).abs().max()) <= 1e-5, key


# ---------------------------------------------------------------------------------------------
# Pre-training: gradients through the inner loop
# ---------------------------------------------------------------------------------------------

WRITE_ONLY = ("eta_bias", "alpha_bias", "beta_logit", "eta_alpha_in.weight")  # act via writes only


@pytest.mark.parametrize("self_modifying", [True, False])
def test_pretraining_gradients_reach_initial_memories_and_slow_weights(self_modifying):
    cfg = HopeConfig(**(SMALL | {"self_modifying": self_modifying}))
    model = make_model(cfg, seed=0)  # CMS down0 non-zero, so up0 gets a gradient too
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (2, 4 * cfg.chunk), generator=g)
    y = torch.randint(0, cfg.vocab_size, (2, 4 * cfg.chunk), generator=g)
    loss = model(x, y).mean()
    assert loss.requires_grad
    loss.backward()

    def nonzero(p):
        return p.grad is not None and bool(p.grad.abs().sum() > 0) and bool(torch.isfinite(p.grad).all())

    zero_grad = [n for n, p in model.named_parameters() if not nonzero(p)]
    assert not zero_grad, f"parameters without a gradient: {zero_grad}"
    for blk in model.blocks:
        if self_modifying:  # the k/v/eta/alpha memories are never read: only their writes matter
            for n in range(1, cfg.n_memories):
                assert bool(blk.titans.a0.grad[:, n].abs().sum() > 0), f"a0 memory {n}"
                assert bool(blk.titans.b0.grad[:, n].abs().sum() > 0), f"b0 memory {n}"


@pytest.mark.parametrize("self_modifying", [True, False])
def test_write_only_parameters_learn_only_through_the_inner_loop(self_modifying):
    """eta/alpha/beta parameters act on the output only through Titans writes: with the Titans
    level switched off in the pre-training forward their gradient is zero."""
    cfg = HopeConfig(**(SMALL | {"self_modifying": self_modifying}))
    model = make_model(cfg, seed=0)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (2, 3 * cfg.chunk), generator=g)
    y = torch.randint(0, cfg.vocab_size, (2, 3 * cfg.chunk), generator=g)
    for titans in (True, False):
        model.zero_grad(set_to_none=True)
        model(x, y, Learning(titans=titans, fast=True, mid=True)).mean().backward()
        for blk in model.blocks:
            for name in WRITE_ONLY:
                grad = blk.titans.get_parameter(name).grad
                got = grad is not None and bool(grad.abs().sum() > 0)
                assert got == titans, f"{name}: gradient {'missing' if titans else 'leaked'}"


@pytest.mark.parametrize("self_modifying, n_chunks", [(False, 4), (True, 2)])
def test_inner_loop_gradient_equals_finite_differences(self_modifying, n_chunks):
    """d(outer loss)/d(parameter) by autograd through the Titans writes equals a central finite
    difference (float64), for the initial memories and the write-only parameters.

    The self-modifying variant's adaptive memories train on their own predictions with the
    gradient stopped (by design), so its autograd gradient is exact only while those memories'
    writes cannot reach the loss: with two chunks, only the main memory's first write (whose
    target is not stopped) is read."""
    with default_dtype(torch.float64):
        cfg = HopeConfig(**(SMALL | {"self_modifying": self_modifying, "eta_max": 1.0}))
        model = make_model(cfg, seed=0)
        g = torch.Generator().manual_seed(0)
        T = n_chunks * cfg.chunk
        x = torch.randint(0, cfg.vocab_size, (2, T), generator=g)
        y = torch.randint(0, cfg.vocab_size, (2, T), generator=g)
        titans_only = Learning(titans=True, fast=False, mid=False)

        def outer_loss():
            state = model.init_state(2, training=True)
            out = []
            for c in range(0, T, cfg.chunk):
                h, state, _ = model.learn_chunk(x[:, c:c + cfg.chunk], state, titans_only,
                                                training=True)
                out.append(F.cross_entropy(model.logits(h).transpose(1, 2), y[:, c:c + cfg.chunk]))
            return torch.stack(out).mean()

        outer_loss().backward()
        eps = 1e-5
        for name in ("a0", "b0", *WRITE_ONLY):
            p = model.blocks[0].titans.get_parameter(name)
            d = torch.randn(p.shape, generator=g)
            analytic = float((p.grad * d).sum())
            with torch.no_grad():
                p += eps * d
                up = float(outer_loss())
                p -= 2 * eps * d
                down = float(outer_loss())
                p += eps * d
            numeric = (up - down) / (2 * eps)
            assert abs(analytic - numeric) <= 1e-6 + 1e-4 * abs(numeric), (name, analytic, numeric)
            assert abs(numeric) > 1e-7, f"{name}: no effect on the loss, the check is vacuous"



@pytest.mark.parametrize("self_modifying", [True, False])
def test_layers_stacked_in_one_write_equal_one_write_per_layer(self_modifying):
    """A commit of a few sessions writes all layers as one stacked write (`HopeLM._write_titans`,
    each layer with its own momentum): the same memories and metrics as writing layer by layer."""
    torch.manual_seed(1)
    model = make_model(HopeConfig(**(SMALL | {"self_modifying": self_modifying})), seed=2).double()
    with torch.no_grad():
        for i, blk in enumerate(model.blocks):
            blk.titans.beta_logit.fill_(0.9 - 1.3 * i)  # different momenta per layer
    cfg = model.cfg
    inputs = [random_inputs(cfg, B=3, T=cfg.chunk, seed=10 + i) for i in range(cfg.n_layers)]
    with torch.no_grad():
        separate = [blk.titans.write(layer, upd) for blk, (layer, upd) in zip(model.blocks, inputs)]
        layers = [dict(layer) for layer, _ in inputs]
        surprise, rel = model._write_titans(layers, [upd for _, upd in inputs])
    for layer, (new, _, _) in zip(layers, separate):
        for key, t in new.items():
            torch.testing.assert_close(layer[key], t, rtol=0, atol=1e-12)
    torch.testing.assert_close(surprise, torch.stack([s for _, s, _ in separate]).mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(rel, torch.stack([r for _, _, r in separate]).mean(0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("self_modifying", [True, False])
def test_the_convolution_tap_by_tap_equals_the_product_over_windows(self_modifying, monkeypatch):
    """Many tokens in one forward convolve tap by tap (UNFOLD_CONV_TOKENS): the same reads, update
    inputs and gradients as the product over all windows of inputs."""
    model = make_model(HopeConfig(**(SMALL | {"self_modifying": self_modifying})), seed=3)
    cfg = model.cfg
    tokens = torch.randint(5, cfg.vocab_size, (5, cfg.chunk), generator=torch.Generator().manual_seed(4))

    def run(limit: int):
        monkeypatch.setattr(model_module, "UNFOLD_CONV_TOKENS", limit)
        model.zero_grad()
        hidden, _, upds = model.forward_open(tokens, model.init_state(5, training=True), want_update=True)
        hidden.square().sum().backward()
        return hidden.detach(), [u.detach() for u in upds[0]], model.blocks[0].titans.conv.grad.clone()

    product, taps = run(tokens.numel()), run(0)
    for a, b in zip(product, taps):
        if isinstance(a, list):
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, rtol=0, atol=1e-5)
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
