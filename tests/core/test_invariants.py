"""The six invariants of HOPE.md section 4, on tiny seeded models.

1. split invariance (bytes round trips between requests, bf16 storage, a process restart)
2. chunked prefill == token-by-token decoding, at every phase of the chunk and mid periods
3. learning off: no memory changes, and the model is the slow model
4. the slow weights are bit-identical after serving
5. sessions are independent, also inside one batched decode step
6. learning helps: a passage read once scores better later, after it left the window

Most checks run on three tiny checkpoints (`any_engine`): chunk 4 / window 16 / mid period 8,
chunk 2 / window 8 / mid period 6 (a chunk shorter than the convolution's tail), and the first
shape with the plain Titans variant (self_modifying=False).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hope_testkit import (
    ATOL,
    FAST_KEYS,
    MID_KEYS,
    TITANS_KEYS,
    assert_states_close,
    assert_states_equal,
    bare_session,
    make_engine,
    max_abs,
    memory_tensors,
    random_splits,
    random_tokens,
    snapshot_slow,
    state_diffs,
    tiny_config,
)
from safetensors.torch import load_file

from hope_core.checkpoint import load_checkpoint
from hope_core.engine import Engine
from hope_core.model import Learning
from hope_core.sampling import SamplingParams
from hope_core.state import SessionState

REPO = Path(__file__).resolve().parents[2]


def _stream_len(cfg) -> int:
    """Several mid periods, ending inside an open chunk (after the BOS of new_session)."""
    n = 3 * cfg.mid_period + 1
    return n + 1 if (1 + n) % cfg.chunk == 0 else n


def _logp(engine: Engine, session: SessionState) -> torch.Tensor:
    return F.log_softmax(engine.next_logits(session), -1)


# ============================================================================================
# 1. Split invariance
# ============================================================================================

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_invariance_fp32_bytes_round_trips(any_engine, seed):
    e = any_engine
    stream = random_tokens(_stream_len(e.cfg), seed)
    ref = e.new_session()
    ref_lp = e.absorb(ref, stream).logprobs

    s = e.new_session()
    lps: list[float] = []
    for lo, hi in random_splits(len(stream), pieces=7, seed=seed):
        s = e.load_session(s.to_bytes())  # every request: load the stored state, absorb, store
        lps += e.absorb(s, stream[lo:hi]).logprobs
    s = e.load_session(s.to_bytes())

    assert ref.updates["mid"] >= 2, "the stream must cross mid boundaries"
    assert s.tokens_absorbed == ref.tokens_absorbed == 1 + len(stream)
    assert s.updates == ref.updates
    assert len(lps) == len(ref_lp)
    assert max(abs(a - b) for a, b in zip(lps, ref_lp)) <= ATOL
    assert_states_close(s.state, ref.state, ATOL, "split vs one request")
    assert max_abs(e.next_logits(s), e.next_logits(ref)) <= ATOL


def test_split_invariance_token_by_token_requests(any_engine):
    """The extreme split: one request per token, each with a store/load in between."""
    e = any_engine
    stream = random_tokens(_stream_len(e.cfg), 7)
    ref = e.new_session()
    e.absorb(ref, stream)
    s = e.new_session()
    for t in stream:
        s = e.load_session(s.to_bytes())
        e.absorb(s, [t])
    assert_states_close(s.state, ref.state, ATOL, "token-per-request vs one request")
    assert max_abs(e.next_logits(s), e.next_logits(ref)) <= ATOL


def test_split_invariance_bf16_storage(any_engine):
    """bf16 storage is lossy (8 mantissa bits) but must stay close, including after memories
    keep learning from the rounded state across many store/load cycles."""
    e = any_engine
    stream = random_tokens(_stream_len(e.cfg), 3)
    ref = e.new_session()
    e.absorb(ref, stream)
    s = e.new_session()
    for lo, hi in random_splits(len(stream), pieces=7, seed=3, allow_empty=False):
        blob = s.to_bytes("bfloat16")
        assert len(blob) < 0.6 * len(s.to_bytes("float32"))
        s = e.load_session(blob)
        e.absorb(s, stream[lo:hi])
    s = e.load_session(s.to_bytes("bfloat16"))

    assert s.updates == ref.updates and s.tokens_absorbed == ref.tokens_absorbed
    # next-token distribution: close in log-probability
    dlogp = max_abs(_logp(e, s), _logp(e, ref))
    assert dlogp <= 0.02, f"bf16 storage moved next-token log-probs by {dlogp}"
    # every float tensor within a few bf16 ulps of its own scale
    for name, diff in state_diffs(s.state, ref.state).items():
        t = ref.state.tensors()[name]
        if t.is_floating_point():
            scale = float(t.abs().max())
            assert diff <= 0.05 * scale + 1e-6, f"{name}: bf16 diff {diff} at scale {scale}"
        else:
            assert diff == 0, f"{name}: integer tensor changed by bf16 storage"


def test_split_invariance_across_engine_restart(engine_dir, tmp_path):
    """Serialize to a file, build a brand new Engine from the checkpoint dir, load, continue."""
    e1 = make_engine(engine_dir)
    stream = random_tokens(_stream_len(e1.cfg), 11)
    ref = e1.new_session()
    e1.absorb(ref, stream)

    k = len(stream) // 2 + 1
    s = e1.new_session()
    e1.absorb(s, stream[:k])
    (tmp_path / "session.bin").write_bytes(s.to_bytes())
    del e1, s

    e2 = Engine(load_checkpoint(engine_dir))
    s2 = e2.load_session((tmp_path / "session.bin").read_bytes())
    e2.absorb(s2, stream[k:])
    assert_states_close(s2.state, ref.state, ATOL, "across a restart")
    assert max_abs(e2.next_logits(s2), e2.next_logits(ref)) <= ATOL


_CHILD = r"""
import json, sys, torch
torch.set_num_threads(1)
from hope_core.checkpoint import load_checkpoint
from hope_core.engine import Engine
ckpt, state_in, tokens, out = sys.argv[1:]
e = Engine(load_checkpoint(ckpt))
s = e.load_session(open(state_in, "rb").read())
lp = e.absorb(s, json.loads(tokens)).logprobs
open(out, "wb").write(s.to_bytes())
json.dump({"logprobs": lp, "logits": e.next_logits(s).tolist()}, open(out + ".json", "w"))
"""


def test_split_invariance_across_process_restart(engine, engine_dir, tmp_path):
    """The second half of the stream is absorbed by another Python process."""
    e = engine
    stream = random_tokens(_stream_len(e.cfg), 12)
    ref = e.new_session()
    ref_lp = e.absorb(ref, stream).logprobs
    k = len(stream) // 3
    s = e.new_session()
    e.absorb(s, stream[:k])
    (tmp_path / "in.bin").write_bytes(s.to_bytes())
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    out = tmp_path / "out.bin"
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(engine_dir), str(tmp_path / "in.bin"),
                           json.dumps(stream[k:]), str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    child = json.loads(Path(str(out) + ".json").read_text())
    s2 = e.load_session(out.read_bytes())
    assert_states_close(s2.state, ref.state, ATOL, "across a process restart")
    assert max_abs(torch.tensor(child["logits"]), e.next_logits(ref)) <= ATOL
    assert max(abs(a - b) for a, b in zip(child["logprobs"], ref_lp[k:])) <= ATOL


# ============================================================================================
# 2. Chunked prefill == token-by-token decoding
# ============================================================================================

def test_chunked_prefill_equals_token_by_token(any_engine):
    """For every phase of the stream within the mid period (so every offset within a chunk),
    one absorb call, token-by-token absorb calls, and batched decode steps of one row give the
    same per-token log-probs and the same final state, across fast and mid boundaries."""
    e = any_engine
    C, M = e.cfg.chunk, e.cfg.mid_period
    for offset in range(M):
        base = bare_session(e)
        e.absorb(base, random_tokens(offset, 50 + offset))
        stream = random_tokens(2 * M + C + 1, 100 + offset)

        a = base.copy()
        lp_a = e.absorb(a, stream).logprobs

        b = base.copy()
        lp_b: list[float] = []
        for t in stream:
            want = float(_logp(e, b)[t])
            got = e.absorb(b, [t]).logprobs
            assert len(got) == 1 and abs(got[0] - want) <= ATOL
            lp_b += got

        state = base.state
        for t in stream:
            logits, state, _ = e.decode_batch(state, torch.tensor([t]))
        c = SessionState(state, e.fingerprint)

        where = f"offset {offset}"
        assert a.updates["mid"] >= 2 and a.updates["fast"] >= 4, where
        assert a.updates == b.updates == c.updates, where
        assert max(abs(x - y) for x, y in zip(lp_a, lp_b)) <= ATOL, where
        assert_states_close(b.state, a.state, ATOL, f"token-by-token, {where}")
        assert_states_close(c.state, a.state, ATOL, f"decode_batch, {where}")
        assert max_abs(e.next_logits(b), e.next_logits(a)) <= ATOL, where
        assert max_abs(logits[0], e.next_logits(a)) <= ATOL, where


def test_pretraining_forward_equals_serving(any_engine):
    """`HopeLM.forward` (pre-training: whole sequences, chunked, learning on) computes the same
    per-token losses as serving the sequence through the engine from a fresh state."""
    e = any_engine
    T = 3 * e.cfg.mid_period  # a multiple of the chunk
    toks = random_tokens(T + 1, 21)
    s = bare_session(e)
    lp = e.absorb(s, toks[:T]).logprobs
    with torch.no_grad():
        loss = e.model(torch.tensor([toks[:T]]), torch.tensor([toks[1:]]))[0]
    serving = [-x for x in lp[1:]] + [-float(_logp(e, s)[toks[T]])]
    assert max(abs(float(a) - b) for a, b in zip(loss, serving)) <= ATOL


# ============================================================================================
# 3. Learning off
# ============================================================================================

def test_learning_off_leaves_every_memory_unchanged(any_engine):
    e = any_engine
    C, M = e.cfg.chunk, e.cfg.mid_period
    s = e.new_session()
    e.absorb(s, random_tokens(2 * M + 1, 1))  # learned: memories are off their initial values
    fresh = bare_session(e)
    moved = [k for k, v in memory_tensors(s.state).items()
             if not torch.equal(v, fresh.state.tensors()[k])]
    assert any(k.endswith("mem_a") for k in moved) and any(k.endswith("fast_up") for k in moved)
    before, updates0, n0 = s.state, s.updates, s.tokens_absorbed

    # whole chunks (prefill path) and partial ones, crossing fast and mid boundaries
    r = e.absorb(s, random_tokens(2 * M + C + 1, 2), learn=False)
    assert r.updates == []
    for t in random_tokens(C + 1, 3):  # decode path: commits by roll only
        assert e.absorb(s, [t], learn=Learning.off()).updates == []
    gen = e.generate(s, random_tokens(3, 4), SamplingParams(max_tokens=2 * C + 1, seed=0),
                     learn=False)
    list(gen)
    assert gen.result.updates == []
    other = e.new_session()
    batch = Engine.stack([s, other])
    for i in range(M + 1):
        _, batch, recs = e.decode_batch(batch, torch.tensor(random_tokens(2, 40 + i)), learn=False)
        assert recs == [[], []]
    Engine.unstack(batch, [s, other])

    assert s.tokens_absorbed > n0 + 3 * M
    assert s.updates == updates0
    for name, v in memory_tensors(before).items():
        assert torch.equal(v, s.state.tensors()[name]), f"{name} changed with learning off"
    for name, v in memory_tensors(fresh.state).items():
        assert torch.equal(v, other.state.tensors()[name]), f"{name} of a fresh session changed"


@pytest.mark.parametrize("level", ["titans", "fast", "mid"])
def test_each_learning_switch_controls_only_its_level(engine, level):
    e = engine
    keys = {"titans": TITANS_KEYS, "fast": FAST_KEYS, "mid": MID_KEYS}[level]
    learning = Learning(titans=level == "titans", fast=level == "fast", mid=level == "mid")
    s = e.new_session()
    before = s.state
    e.absorb(s, random_tokens(2 * e.cfg.mid_period + 3, 5), learn=learning)
    changed = {k.split(".")[-1] for k, v in memory_tensors(before).items()
               if not torch.equal(v, s.state.tensors()[k])}
    assert changed <= set(keys), f"learning only {level} changed {changed - set(keys)}"
    assert {keys[0], keys[1]} <= changed, f"learning {level} did not change {keys[:2]}"
    assert {lvl: n > 0 for lvl, n in s.updates.items()} == {
        "titans": level == "titans", "fast": level == "fast", "mid": level == "mid"}


def test_fresh_session_memories_are_the_initial_values(engine):
    e = engine
    for s in (bare_session(e), e.new_session()):  # new_session has absorbed BOS: no chunk closed
        for i, blk in enumerate(e.model.blocks):
            layer = s.state.layers[i]
            assert torch.equal(layer["mem_a"][0], blk.titans.a0)
            assert torch.equal(layer["mem_b"][0], blk.titans.b0)
            for lvl in ("fast", "mid"):
                level = getattr(blk, lvl)
                assert torch.equal(layer[f"{lvl}_up"][0], level.up0)
                assert torch.equal(layer[f"{lvl}_down"][0], level.down0)
            for k in ("mom_a", "mom_b", "mid_up_grad", "mid_down_grad"):
                assert not layer[k].any(), k
        assert s.updates == {"titans": 0, "fast": 0, "mid": 0}


def test_learning_off_is_the_slow_model(any_engine):
    """With learning off the model is a pure sliding-window model of the slow weights: after a
    long stream its next-token logits are those of a fresh session fed only the last
    n_layers * (window - 1) + 1 tokens (the stacked windows' receptive field), at another
    absolute position and another chunk phase. With learning on they are not (memory)."""
    e = any_engine
    cfg = e.cfg
    R = cfg.n_layers * (cfg.window - 1) + 1
    stream = random_tokens(R + 3 * cfg.mid_period + 3, 8)
    long_off = bare_session(e)
    e.absorb(long_off, stream, learn=False)
    short = bare_session(e)
    e.absorb(short, stream[-R:], learn=False)
    assert max_abs(e.next_logits(long_off), e.next_logits(short)) <= ATOL

    long_on = bare_session(e)
    e.absorb(long_on, stream, learn=True)
    assert max_abs(e.next_logits(long_on), e.next_logits(short)) > 1e-3, "memory had no effect"


def test_attention_window_boundary(tmp_path):
    """With one layer and learning off, the next-token logits depend on exactly the last
    `window` tokens: changing the token `window - 1` back changes them, changing the one
    `window` back (or anything earlier) does not, at every chunk phase."""
    cfg = tiny_config(n_layers=1)
    e = make_engine(tmp_path / "ckpt1", cfg)
    W, C = cfg.window, cfg.chunk
    for n in range(2 * W, 2 * W + C):
        stream = random_tokens(n, 900 + n)

        def logits_with(i: int, tok: int | None, stream=stream) -> torch.Tensor:
            toks = list(stream)
            if tok is not None:
                toks[i] = tok
            s = bare_session(e)
            e.absorb(s, toks, learn=False)
            return e.next_logits(s)

        base = logits_with(0, None)
        inside = logits_with(n - W, (stream[n - W] + 1) % cfg.vocab_size)
        outside = logits_with(n - W - 1, (stream[n - W - 1] + 1) % cfg.vocab_size)
        assert max_abs(inside, base) > 1e-3, f"the token window-1 back is not seen (n={n})"
        assert max_abs(outside, base) <= ATOL, f"a token beyond the window is seen (n={n})"


def test_far_stream_positions_give_the_same_outputs(any_engine):
    """A session is an endless stream and attention is relative (RoPE, float64 angles): with
    learning off, the last window's worth of a stream gives the same logits at absolute
    positions around 10^9 as near the stream start. (Cached keys carry their rotation, so a
    far session must absorb its tokens at far positions: it starts at n_committed = shift, and
    is fed enough tokens for the unused, zero history slots to leave the receptive field.)"""
    e = any_engine
    cfg = e.cfg
    R = cfg.n_layers * (cfg.window - 1) + 1
    stream = random_tokens(R + cfg.window + 3 * cfg.mid_period + 1, 33)
    near = bare_session(e)
    e.absorb(near, stream, learn=False)
    for shift in (cfg.mid_period, 2 ** 20 * cfg.mid_period, 2 ** 27 * cfg.mid_period):
        fresh = e.model.init_state(1)
        far = SessionState(replace(fresh, n_committed=fresh.n_committed + shift), e.fingerprint)
        far = e.load_session(far.to_bytes())  # the validator accepts far positions
        e.absorb(far, stream[-(R + cfg.window):], learn=False)
        assert far.tokens_absorbed == shift + R + cfg.window
        assert max_abs(e.next_logits(near), e.next_logits(far)) <= ATOL, f"shift {shift}"


def test_learning_off_serving_equals_slow_forward(any_engine):
    """Serving with learning off equals the pre-training forward with learning off."""
    e = any_engine
    T = 2 * e.cfg.mid_period + e.cfg.chunk
    toks = random_tokens(T + 1, 9)
    s = bare_session(e)
    lp = e.absorb(s, toks[:T], learn=False).logprobs
    with torch.no_grad():
        loss = e.model(torch.tensor([toks[:T]]), torch.tensor([toks[1:]]), Learning.off())[0]
    serving = [-x for x in lp[1:]] + [-float(_logp(e, s)[toks[T]])]
    assert max(abs(float(a) - b) for a, b in zip(loss, serving)) <= ATOL


# ============================================================================================
# 4. Slow weights never change
# ============================================================================================

def test_slow_weights_bit_identical_after_serving(engine_dir):
    e = make_engine(engine_dir)
    snap = snapshot_slow(e.model)
    C, M = e.cfg.chunk, e.cfg.mid_period
    a = e.new_session()
    e.absorb(a, random_tokens(3 * M + 1, 1))  # prefill with learning on
    for t in random_tokens(C + 2, 2):
        e.absorb(a, [t])  # decode commits
    gen = e.generate(a, random_tokens(5, 3), SamplingParams(max_tokens=2 * M, temperature=1.0,
                                                            seed=1))
    list(gen)
    b = e.load_session(a.to_bytes())
    batch = Engine.stack([a, b, e.new_session()])
    for i in range(M + 1):
        _, batch, _ = e.decode_batch(batch, torch.tensor(random_tokens(3, 60 + i)))
    assert a.updates["mid"] >= 2

    now = snapshot_slow(e.model)
    assert now.keys() == snap.keys()
    changed = [k for k in snap if not torch.equal(snap[k], now[k])]
    assert not changed, f"slow weights changed while serving: {changed}"
    assert all(p.grad is None for p in e.model.parameters()), "serving accumulated .grad"
    on_disk = load_file(str(Path(engine_dir) / "model.safetensors"))
    assert all(torch.equal(on_disk[k], v) for k, v in e.model.state_dict().items())


# ============================================================================================
# 5. Session independence
# ============================================================================================

def _sessions_at_phases(e: Engine, seed: int) -> list[SessionState]:
    """Sessions whose open chunks and mid periods are at different phases, so that a decode
    step commits a chunk (and closes a mid period) in some rows and not in others."""
    C, M = e.cfg.chunk, e.cfg.mid_period
    lengths = [C - 1, 2 * C + 1, M - 1, M + C - 2]
    out = []
    for i, n in enumerate(lengths):
        s = bare_session(e)
        e.absorb(s, random_tokens(n, seed + i))
        out.append(s)
    return out


def test_decode_batch_rows_equal_single_session_decoding(any_engine):
    e = any_engine
    C, M = e.cfg.chunk, e.cfg.mid_period
    sessions = _sessions_at_phases(e, 300)
    batch = Engine.stack(sessions)
    singles = [s.state for s in sessions]
    mid0 = batch.updates[:, 2].clone()
    mixed_steps = 0
    for step in range(M + 1):
        toks = torch.tensor(random_tokens(len(sessions), 400 + step))
        commits = (batch.n_open + 1 == C).tolist()
        mixed_steps += any(commits) and not all(commits)
        logits, batch, recs = e.decode_batch(batch, toks)
        for i in range(len(sessions)):
            l1, singles[i], r1 = e.decode_batch(singles[i], toks[i:i + 1])
            where = f"step {step}, row {i}"
            assert max_abs(logits[i], l1[0]) <= ATOL, where
            row = batch.select(torch.tensor([i]))
            assert_states_close(row, singles[i], ATOL, where)
            assert [(u.level) for u in recs[i]] == [u.level for u in r1[0]], where
            for u, v in zip(recs[i], r1[0]):
                assert abs(u.surprise - v.surprise) <= ATOL and abs(u.update_norm - v.update_norm) <= ATOL
            # and the same as the plain single-session API
            ref = sessions[i].copy()
            ref.state = singles[i]
            assert max_abs(logits[i], e.next_logits(ref)) <= ATOL
    assert mixed_steps >= 2, "no step committed in some rows only"
    assert bool((batch.updates[:, 2] > mid0).all()), "every row should close a mid period"


def test_another_rows_token_does_not_change_a_row(any_engine):
    e = any_engine
    C = e.cfg.chunk
    batch = Engine.stack(_sessions_at_phases(e, 500))
    for step in range(C + 1):  # includes steps where rows commit
        toks = torch.tensor(random_tokens(4, 600 + step))
        other = toks.clone()
        other[1] = (other[1] + 17) % e.cfg.vocab_size
        other[3] = (other[3] + 29) % e.cfg.vocab_size
        la, sa, _ = e.decode_batch(batch, toks)
        lb, sb, _ = e.decode_batch(batch, other)
        assert max_abs(la[1], lb[1]) > 1e-3  # the changed rows did change
        for i in (0, 2):
            assert max_abs(la[i], lb[i]) <= 1e-6, f"step {step}, row {i}"
            rows = torch.tensor([i])
            assert_states_close(sa.select(rows), sb.select(rows), 1e-6, f"step {step}, row {i}")
        batch = sa


def test_traffic_on_one_session_leaves_another_untouched(engine):
    e = engine
    a = e.new_session()
    b = e.new_session()  # shares the engine's cached fresh state with `a`
    e.absorb(a, random_tokens(e.cfg.mid_period + 3, 70))
    blob_a = a.to_bytes()
    fresh = e.new_session().state.clone()
    before = a.state.clone()

    # heavy traffic on b: learning prefill, decode commits, generation, a batch with a in it
    e.absorb(b, random_tokens(3 * e.cfg.mid_period + 1, 71))
    for t in random_tokens(e.cfg.chunk + 1, 72):
        e.absorb(b, [t])
    list(e.generate(b, random_tokens(4, 73), SamplingParams(max_tokens=10, seed=3)))
    batch = Engine.stack([a, b])
    for i in range(e.cfg.mid_period + 1):
        _, batch, _ = e.decode_batch(batch, torch.tensor(random_tokens(2, 80 + i)))

    assert_states_equal(a.state, before, what="session a after traffic on b")
    assert_states_equal(e.load_session(a.to_bytes()).state, e.load_session(blob_a).state,
                        what="session a's bytes after traffic on b")
    assert_states_equal(e.new_session().state, fresh, what="the engine's cached fresh state")
    # and a continues exactly as its stored copy does
    probe = random_tokens(2 * e.cfg.chunk + 1, 74)
    stored = e.load_session(blob_a)
    assert e.absorb(a, probe).logprobs == e.absorb(stored, probe).logprobs


# ============================================================================================
# 6. Learning helps
# ============================================================================================

def test_learning_helps_after_the_passage_left_the_window(tmp_path):
    """A passage absorbed once (learning on), then pushed out of the stacked attention windows'
    receptive field by other tokens, scores (learning off) a lower loss than in a fresh session,
    and than in a session that read another passage and the same filler. With the passage
    absorbed with learning off, the gain vanishes (it must come from the memories)."""
    cfg = tiny_config(window=32, chunk=16, mid_period=32)
    e = make_engine(tmp_path / "ckpt", cfg, seed=0)
    R = cfg.n_layers * (cfg.window - 1) + 1
    n_filler = (R // cfg.chunk + 1) * cfg.chunk

    def score(session: SessionState, passage: list[int]) -> float:
        lp = e.absorb(session.copy(), passage, learn=False).logprobs
        return -sum(lp[1:]) / (len(lp) - 1)

    gains_ctrl, gains_fresh = [], []
    for seed in range(4):
        passage = random_tokens(2 * cfg.chunk - 1, 1000 + seed)  # + BOS: two whole chunks
        other = random_tokens(len(passage), 2000 + seed)
        filler = random_tokens(n_filler, 3000 + seed)

        read = e.new_session()
        e.absorb(read, passage)
        e.absorb(read, filler)
        control = e.new_session()
        e.absorb(control, other)
        e.absorb(control, filler)
        unlearned = e.new_session()
        e.absorb(unlearned, passage, learn=False)
        e.absorb(unlearned, filler, learn=False)
        no_learn_ctrl = e.new_session()
        e.absorb(no_learn_ctrl, other, learn=False)
        e.absorb(no_learn_ctrl, filler, learn=False)

        mine = score(read, passage)
        gains_ctrl.append(score(control, passage) - mine)
        gains_fresh.append(score(e.new_session(), passage) - mine)
        # without learning, having read the passage is invisible once it left the window
        assert abs(score(unlearned, passage) - score(no_learn_ctrl, passage)) <= ATOL

    assert min(gains_ctrl) > 0 and min(gains_fresh) > 0, (gains_ctrl, gains_fresh)
    assert sum(gains_ctrl) / len(gains_ctrl) > 0.02, gains_ctrl
    assert sum(gains_fresh) / len(gains_fresh) > 0.02, gains_fresh
