"""Continuum Memory System: the session levels' updates (HOPE.md 2.2), checked from first
principles with autograd.

At a chunk's end the fast level steps on the gradient of the next-token loss summed over the
chunk's predictions whose targets lie inside the chunk (chunk - 1 of them), taken at the
chunk-start weights; the gradient is clipped to `cms_grad_clip` (norm over the level's tensors of
all layers); the level is pulled back towards its initial weights:

    theta <- theta - lr * clip(g) - decay * (theta - theta0)

The mid level adds each chunk's clipped gradient to its open gradient and steps (with its pull
back) only when a mid period closes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hope_testkit import make_model

from hope_core.model import CMS_WEIGHTS, HopeConfig, Learning

SMALL = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, window=8, chunk=4, mid_period=12,
             mem_hidden=8, slow_hidden=64, mid_hidden=16, fast_hidden=8)


def chunk_grads(model, tokens, start):
    """Autograd gradient of the chunk's in-chunk next-token loss w.r.t. the CMS tensors."""
    layers = []
    leaves = {}
    for i, layer in enumerate(start.layers):
        layer = dict(layer)
        for key in CMS_WEIGHTS:
            layer[key] = layer[key].detach().clone().requires_grad_(True)
            leaves[(i, key)] = layer[key]
        layers.append(layer)
    st = type(start)(layers, start.n_committed, start.n_open, start.open_tokens,
                     start.last_hidden, start.updates)
    with torch.enable_grad():
        hidden, _, _ = model.forward_open(tokens, st)
        logits = model.logits(hidden[:, :-1]).float()
        loss = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="sum")
        grads = torch.autograd.grad(loss, list(leaves.values()))
    return dict(zip(leaves, grads))


def clip_factor(grads, level, clip):
    sq = sum(float((g ** 2).sum()) for (i, key), g in grads.items() if key.startswith(level))
    return min(1.0, clip / (sq ** 0.5 + 1e-6))


@pytest.mark.parametrize("clip", [5.0, 1e-3])  # off, and binding
def test_fast_and_mid_steps_follow_the_formula(clip):
    cfg = HopeConfig(**(SMALL | {"cms_grad_clip": clip, "lr_fast": 0.2, "lr_mid": 0.1}))
    model = make_model(cfg, seed=4).eval().requires_grad_(False)
    C, M = cfg.chunk, cfg.mid_period
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, cfg.vocab_size, (1, 2 * M), generator=g)
    state = model.init_state(1)
    acc = {(i, k): torch.zeros_like(state.layers[i][k]) for i in range(cfg.n_layers)
           for k in ("mid_up", "mid_down")}
    clip_bound = []
    for c in range(0, 2 * M, C):
        chunk = toks[:, c:c + C]
        grads = chunk_grads(model, chunk, state)
        f_fast = clip_factor(grads, "fast", clip)
        f_mid = clip_factor(grads, "mid", clip)
        clip_bound.append(f_fast < 1)
        _, after, metrics = model.learn_chunk(chunk, state, Learning())
        closes = (c + C) % M == 0
        for i, blk in enumerate(model.blocks):
            for key, init in (("fast_up", blk.fast.up0), ("fast_down", blk.fast.down0)):
                cur = state.layers[i][key]
                want = cur - cfg.lr_fast * f_fast * grads[(i, key)] - cfg.decay_fast * (cur - init)
                diff = float((after.layers[i][key] - want).abs().max())
                assert diff <= 1e-6, f"chunk at {c}, layer {i} {key}: {diff}"
            for key, init in (("mid_up", blk.mid.up0), ("mid_down", blk.mid.down0)):
                cur = state.layers[i][key]
                acc[(i, key)] = acc[(i, key)] + f_mid * grads[(i, key)]
                if closes:
                    want = cur - cfg.lr_mid * acc[(i, key)] - cfg.decay_mid * (cur - init)
                    acc[(i, key)] = torch.zeros_like(acc[(i, key)])
                else:
                    want = cur
                diff = float((after.layers[i][key] - want).abs().max())
                assert diff <= 1e-6, f"chunk at {c}, layer {i} {key}: {diff}"
                diff = float((after.layers[i][f"{key}_grad"] - acc[(i, key)]).abs().max())
                assert diff <= 1e-6, f"chunk at {c}, layer {i} {key}_grad: {diff}"
        assert torch.isnan(metrics.update_norm["mid"]).all() != closes
        state = after
    assert state.updates[0].tolist() == [2 * M // C, 2 * M // C, 2]
    assert all(clip_bound) == (clip < 1), "the clip should bind exactly in the small-clip case"


def test_learned_fast_level_lowers_the_chunks_own_loss():
    """One fast step on a chunk lowers that chunk's loss when re-read from the same position
    (a gradient step in the right direction, with a small rate)."""
    cfg = HopeConfig(**(SMALL | {"lr_fast": 0.05, "decay_fast": 0.0}))
    model = make_model(cfg, seed=5).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    toks = torch.randint(0, cfg.vocab_size, (1, cfg.chunk), generator=g)
    start = model.init_state(1)

    def loss(state):
        with torch.no_grad():
            h, _, _ = model.forward_open(toks, state)
            return float(F.cross_entropy(model.logits(h[:, :-1])[0], toks[0, 1:], reduction="sum"))

    _, after, _ = model.learn_chunk(toks, start, Learning(titans=False, fast=True, mid=False))
    stepped = type(start)([{**s, **{k: a[k] for k in ("fast_up", "fast_down")}}
                           for s, a in zip(start.layers, after.layers)],
                          start.n_committed, start.n_open, start.open_tokens, start.last_hidden,
                          start.updates)
    assert loss(stepped) < loss(start)
