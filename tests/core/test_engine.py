"""Engine: absorb and generate (sampling, stops, streaming, early close), on a tiny checkpoint."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hope_testkit import ATOL, assert_states_close, assert_states_equal, max_abs, random_tokens

from hope_core.engine import Engine
from hope_core.model import State
from hope_core.sampling import SamplingParams
from hope_core.state import SessionState

PROMPT_TEXT = "Hello there, how are you?"


@pytest.fixture(scope="module")
def prompt(engine) -> list[int]:
    return engine.tokenizer.encode(PROMPT_TEXT)


@pytest.fixture(scope="module")
def session(engine):
    """A session with some history (learned), reused by copy in every test."""
    s = engine.new_session()
    engine.absorb(s, random_tokens(2 * engine.cfg.mid_period + 3, 5))
    return s


def run(engine: Engine, session, prompt, **params):
    """Generate on a copy of `session`; returns (result, events, the copy)."""
    s = session.copy()
    gen = engine.generate(s, prompt, SamplingParams(**params))
    events = list(gen)
    return gen.result, events, s


def greedy_replay(engine: Engine, session, prompt, ids) -> list[float]:
    """Replay `ids` after `prompt`, checking each is the argmax; returns their log-probs."""
    s = session.copy()
    engine.absorb(s, prompt)
    lps = []
    for t in ids:
        logits = engine.next_logits(s)
        assert int(logits.argmax()) == t
        lps.append(float(F.log_softmax(logits, -1)[t]))
        engine.absorb(s, [t])
    return lps


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------

def test_seed_reproducibility(engine, session, prompt):
    a, _, sa = run(engine, session, prompt, max_tokens=12, temperature=1.0, seed=123)
    b, _, sb = run(engine, session, prompt, max_tokens=12, temperature=1.0, seed=123)
    c, _, _ = run(engine, session, prompt, max_tokens=12, temperature=1.0, seed=124)
    assert a.token_ids == b.token_ids and a.text == b.text and a.logprobs == b.logprobs
    assert_states_equal(sa.state, sb.state, what="same seed, same final state")
    assert a.token_ids != c.token_ids, "another seed gave the same 12 tokens out of 4096"
    for p in (dict(top_p=0.9), dict(top_k=50), dict(temperature=0.7, top_k=20, top_p=0.8)):
        x, _, _ = run(engine, session, prompt, max_tokens=8, seed=7, **p)
        y, _, _ = run(engine, session, prompt, max_tokens=8, seed=7, **p)
        assert x.token_ids == y.token_ids, p


def test_temperature_zero_is_greedy_and_deterministic(engine, session, prompt):
    a, _, sa = run(engine, session, prompt, max_tokens=2 * engine.cfg.chunk + 3, temperature=0)
    b, _, sb = run(engine, session, prompt, max_tokens=2 * engine.cfg.chunk + 3, temperature=0,
                   seed=99)
    assert a.token_ids == b.token_ids
    assert_states_equal(sa.state, sb.state)
    lps = greedy_replay(engine, session, prompt, a.token_ids)  # each token is the argmax
    assert max(abs(x - y) for x, y in zip(lps, a.logprobs)) <= ATOL


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_top_k_one_equals_greedy(engine, session, prompt, temperature):
    greedy, _, _ = run(engine, session, prompt, max_tokens=10, temperature=0)
    k1, _, _ = run(engine, session, prompt, max_tokens=10, temperature=temperature, top_k=1,
                   seed=5)
    assert k1.token_ids == greedy.token_ids
    tiny_p, _, _ = run(engine, session, prompt, max_tokens=10, temperature=temperature,
                       top_p=1e-6, seed=6)
    assert tiny_p.token_ids == greedy.token_ids


def test_generation_logprobs_are_those_of_the_sampled_tokens(engine, session, prompt):
    res, _, _ = run(engine, session, prompt, max_tokens=9, temperature=1.0, seed=3)
    assert len(res.logprobs) == len(res.token_ids) == 9
    s = session.copy()
    engine.absorb(s, prompt)
    for t, lp in zip(res.token_ids, res.logprobs):
        assert lp <= 0
        assert abs(float(F.log_softmax(engine.next_logits(s), -1)[t]) - lp) <= ATOL
        engine.absorb(s, [t])


def test_generation_alternatives_are_the_most_likely_tokens(engine, session, prompt):
    """`top_logprobs`: at each generated token, the k most likely tokens of the distribution it
    was sampled from, most likely first, with their log-probabilities; none when not asked."""
    k = 4
    res, _, _ = run(engine, session, prompt, max_tokens=7, temperature=1.0, seed=3, top_logprobs=k)
    plain, _, _ = run(engine, session, prompt, max_tokens=7, temperature=1.0, seed=3)
    assert plain.token_ids == res.token_ids and plain.top_logprobs == []
    assert len(res.top_logprobs) == len(res.token_ids) == 7
    s = session.copy()
    engine.absorb(s, prompt)
    for t, lp, top in zip(res.token_ids, res.logprobs, res.top_logprobs):
        logp = F.log_softmax(engine.next_logits(s), -1)
        best = torch.sort(logp, descending=True, stable=True)
        assert [a for a, _ in top] == best.indices[:k].tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in top]), best.values[:k], atol=ATOL, rtol=0)
        if t in dict(top):
            assert abs(dict(top)[t] - lp) <= ATOL
        engine.absorb(s, [t])


@pytest.mark.parametrize("n", [3, 13])
def test_absorb_alternatives(engine, session, n):
    """Each absorbed token's alternatives are the most likely tokens at its place, the same
    alone and in a batch, and asking for them changes nothing else."""
    toks = random_tokens(n, 60 + n)
    a, b = session.copy(), session.copy()
    with_top = engine.absorb(a, toks, alternatives=3)
    without = engine.absorb(b, toks)
    assert without.top == [] and with_top.logprobs == without.logprobs
    assert_states_equal(a.state, b.state)
    assert len(with_top.top) == n and all(len(top) == 3 for top in with_top.top)
    for tok, lp, top in zip(toks, with_top.logprobs, with_top.top):
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True)
        assert lp <= values[0] + ATOL  # none more likely than the first alternative
        if tok in dict(top):
            assert abs(dict(top)[tok] - lp) <= ATOL
    c = session.copy()
    s = session.copy()
    first = engine.absorb(s, toks[:1], alternatives=3).top[0]
    batched = engine.absorb_batch([c], [toks[:1]], alternatives=3)[0].top[0]
    assert [t for t, _ in batched] == [t for t, _ in first] == [t for t, _ in with_top.top[0]]
    assert first[0][0] == int(engine.next_logits(session).argmax())


@pytest.mark.parametrize("bad", [dict(max_tokens=-1), dict(temperature=-0.1), dict(temperature=float("inf")),
                                 dict(temperature=float("nan")), dict(top_p=-0.1), dict(top_p=1.5),
                                 dict(top_p=float("nan")), dict(top_k=-1),
                                 dict(top_logprobs=-1), dict(top_logprobs=21)])
def test_sampling_params_are_validated(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


# ---------------------------------------------------------------------------------------------
# finishing: length, stop ids, stop strings
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("max_tokens", [0, 1, 7])
def test_max_tokens_is_respected(engine, session, prompt, max_tokens):
    res, events, s = run(engine, session, prompt, max_tokens=max_tokens, temperature=1.0, seed=1)
    assert res.finish_reason == "length"
    assert len(res.token_ids) == max_tokens == len(res.logprobs)
    assert s.tokens_absorbed == session.tokens_absorbed + len(prompt) + max_tokens
    assert "".join(e.text for e in events) == res.text


def test_stop_token_ids(engine, session, prompt):
    full, _, _ = run(engine, session, prompt, max_tokens=16, temperature=1.0, seed=11)
    ids = full.token_ids
    j = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])  # first occurrence at j
    res, events, s = run(engine, session, prompt, max_tokens=16, temperature=1.0, seed=11,
                         stop_token_ids=[ids[j], 4095 if ids[j] != 4095 else 4094])
    assert res.finish_reason == "stop"
    assert res.token_ids == ids[:j + 1]  # the stop token is returned ...
    assert s.tokens_absorbed == session.tokens_absorbed + len(prompt) + j + 1  # ... and absorbed
    assert res.text == engine.tokenizer.decode(ids[:j], skip_special=True)  # its text is not
    assert "".join(e.text for e in events) == res.text


def _stop_string(text: str, min_at: int = 1, length: int = 4) -> tuple[str, int]:
    """A substring of `text` whose first occurrence starts at some i >= min_at."""
    for i in range(min_at, len(text) - length):
        cand = text[i:i + length]
        if text.find(cand) == i and "\ufffd" not in cand:
            return cand, i
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stop_strings(engine, session, prompt, seed):
    full, _, _ = run(engine, session, prompt, max_tokens=20, temperature=1.0, seed=seed)
    stop, at = _stop_string(full.text, min_at=3)
    res, events, s = run(engine, session, prompt, max_tokens=20, temperature=1.0, seed=seed,
                         stop=["this never occurs \u2603", stop])
    assert res.finish_reason == "stop"
    assert res.text == full.text[:at]
    assert stop not in res.text
    assert "".join(e.text for e in events) == res.text
    # generation ended with the token that completed the stop string: the tokens are a prefix of
    # the unstopped run, all absorbed, and their decoded text contains the stop string
    n = len(res.token_ids)
    assert res.token_ids == full.token_ids[:n]
    decoded = engine.tokenizer.decode(res.token_ids, skip_special=True)
    assert stop in decoded and stop not in engine.tokenizer.decode(res.token_ids[:-1],
                                                                  skip_special=True)
    assert s.tokens_absorbed == session.tokens_absorbed + len(prompt) + n


def test_earliest_of_several_stop_strings_wins(engine, session, prompt):
    full, _, _ = run(engine, session, prompt, max_tokens=24, temperature=1.0, seed=4)
    early, at = _stop_string(full.text, min_at=2, length=3)
    late, _ = _stop_string(full.text, min_at=at + 6, length=3)
    res, _, _ = run(engine, session, prompt, max_tokens=24, temperature=1.0, seed=4,
                    stop=[late, early])
    assert res.finish_reason == "stop" and res.text == full.text[:at]


@pytest.mark.parametrize("params", [
    dict(max_tokens=15, temperature=1.0, seed=8),
    dict(max_tokens=15, temperature=1.0, seed=8, stop=["zzzzzz-never"]),
    dict(max_tokens=15, temperature=0),
])
def test_streamed_text_equals_result_text(engine, session, prompt, params):
    res, events, _ = run(engine, session, prompt, **params)
    assert "".join(e.text for e in events) == res.text
    assert res.finish_reason == "length"
    assert res.text == engine.tokenizer.decode(res.token_ids, skip_special=True)


@pytest.mark.parametrize("params", [
    dict(max_tokens=15, temperature=1.0, seed=8),
    dict(max_tokens=15, temperature=1.0, seed=8, stop=["zzzzzz-never"]),
])
def test_stream_events_are_the_generated_tokens(engine, session, prompt, params):
    """One event per generated token, carrying that token's id and log-probability."""
    res, events, _ = run(engine, session, prompt, **params)
    assert [e.token_id for e in events] == res.token_ids
    assert [e.logprob for e in events] == res.logprobs


# ---------------------------------------------------------------------------------------------
# streaming and early close
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_taken", [1, 3, 6])
def test_closing_early_absorbs_only_what_was_yielded(engine, session, prompt, n_taken):
    s = session.copy()
    gen = engine.generate(s, prompt, SamplingParams(max_tokens=20, temperature=1.0, seed=2))
    taken = [next(gen) for _ in range(n_taken)]
    gen.close()
    assert s.tokens_absorbed == session.tokens_absorbed + len(prompt) + n_taken
    with pytest.raises(RuntimeError):
        gen.result  # noqa: B018
    with pytest.raises(StopIteration):
        next(gen)
    # the state is exactly that of absorbing the prompt and the yielded tokens
    ref = session.copy()
    engine.absorb(ref, prompt + [e.token_id for e in taken])
    assert_states_close(s.state, ref.state, ATOL, "closed generation")


# ---------------------------------------------------------------------------------------------
# absorb
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 3, 4, 13, 40])
def test_absorb_logprobs(engine, session, n):
    s = session.copy()
    toks = random_tokens(n, 30 + n)
    first = float(F.log_softmax(engine.next_logits(s), -1)[toks[0]])
    r = engine.absorb(s, toks)
    assert len(r.logprobs) == n
    assert all(lp <= 0 and math.isfinite(lp) for lp in r.logprobs)
    assert abs(r.logprobs[0] - first) <= ATOL
    assert s.tokens_absorbed == session.tokens_absorbed + n


def test_absorb_nothing_changes_nothing(engine, session):
    s = session.copy()
    r = engine.absorb(s, [])
    assert r.logprobs == [] and r.updates == []
    assert_states_equal(s.state, session.state)


def test_absorb_rejects_out_of_vocabulary_tokens(engine, session):
    for bad in ([engine.cfg.vocab_size], [5, 6, -1], [7, 2**40]):
        s = session.copy()
        with pytest.raises((ValueError, OverflowError, RuntimeError)):
            engine.absorb(s, bad)
        assert_states_equal(s.state, session.state, what=f"after refusing {bad}")


@pytest.mark.parametrize("less,short", [(-1, [0, 1, 2]), (1, [0, 1, 0]), (1, [0, 0, 0])])
def test_absorb_batch_equals_absorbing_each_session_alone(engine, session, less, short):
    """Batched prefill: each session ends where absorbing its own piece alone ends; the new
    states are rows of one batch (views, no copy per session), which stack again for the next
    piece without a copy, and `compact` gives a kept session memory of its own."""
    C = engine.cfg.chunk
    take = 1 if less < 0 else C - less  # one token, or most of a chunk
    bases = []
    for i in range(3):  # session i's piece ends `short[i]` tokens before its chunk closes
        s = session.copy()
        engine.absorb(s, random_tokens((C - take - short[i] - int(s.state.n_open[0])) % C, 40 + i))
        bases.append(s)
    pieces = [random_tokens(take, 50 + i) for i in range(3)]
    batched = [b.copy() for b in bases]
    results = engine.absorb_batch(batched, pieces)
    for base, got, piece, res in zip(bases, batched, pieces, results):
        ref = base.copy()
        expect = engine.absorb(ref, piece)
        assert_states_close(got.state, ref.state, what="batched against alone")
        assert max(abs(a - b) for a, b in zip(res.logprobs, expect.logprobs)) <= ATOL
        assert len(res.updates) == len(expect.updates)
    assert len(results[0].updates) > 0  # a chunk closed and was learned inside the batch
    rows = [s.state for s in batched]
    stacked = State.cat(rows)
    for name, t in stacked.tensors().items():
        assert t.data_ptr() == rows[0].tensors()[name].data_ptr(), f"{name} was copied"
        torch.testing.assert_close(t, torch.cat([r.tensors()[name] for r in rows]), rtol=0, atol=0)
    reordered = State.cat([rows[1], rows[0]])  # not consecutive rows: a copy
    assert reordered.n_open.data_ptr() != rows[0].n_open.data_ptr()
    own = rows[1].compact()
    assert_states_equal(own, rows[1])
    for name, t in own.tensors().items():
        assert t.untyped_storage().nbytes() == t.nbytes, f"{name} still views the batch"


def test_update_records_match_the_counters(engine, session, prompt):
    """One UpdateRecord per level update, with finite metrics, from absorb and generate."""
    s = session.copy()
    before = s.updates
    r = engine.absorb(s, random_tokens(3 * engine.cfg.mid_period + 2, 9))
    gen = engine.generate(s, prompt, SamplingParams(max_tokens=2 * engine.cfg.chunk + 1, seed=0))
    list(gen)
    recs = r.updates + gen.result.updates
    for lvl in ("titans", "fast", "mid"):
        assert sum(u.level == lvl for u in recs) == s.updates[lvl] - before[lvl], lvl
    assert s.updates["mid"] > before["mid"]
    for u in recs:
        assert math.isfinite(u.surprise) and math.isfinite(u.update_norm) and u.update_norm >= 0


def test_served_states_hold_no_autograd_graph(engine, session, prompt):
    """Learning uses autograd inside a commit; nothing of the graph may survive in a state (it
    would keep every past chunk's activations alive and grow without bound)."""
    s = session.copy()
    engine.absorb(s, random_tokens(3 * engine.cfg.mid_period + 1, 13))
    list(engine.generate(s, prompt, SamplingParams(max_tokens=2 * engine.cfg.chunk + 1, seed=0)))
    batch = Engine.stack([s, engine.new_session()])
    for i in range(engine.cfg.chunk + 1):
        _, batch, _ = engine.decode_batch(batch, torch.tensor(random_tokens(2, 14 + i)))
    for state in (s.state, batch):
        bad = [k for k, v in state.tensors().items() if v.requires_grad or v.grad_fn is not None]
        assert not bad, f"state tensors attached to an autograd graph: {bad}"


def test_a_dropped_transaction_leaves_the_session_unchanged(engine, session, prompt):
    keep = session.state.clone()
    work = session.copy()
    engine.absorb(work, random_tokens(2 * engine.cfg.mid_period, 12))
    list(engine.generate(work, prompt, SamplingParams(max_tokens=5, seed=0)))
    assert_states_equal(session.state, keep, what="original after a dropped working copy")


def test_new_sessions_start_with_bos(engine):
    s = engine.new_session()
    assert s.tokens_absorbed == 1 and s.fingerprint == engine.fingerprint
    ref = SessionState(engine.model.init_state(1), engine.fingerprint)
    engine.absorb(ref, [engine.tokenizer.bos_id])
    assert max_abs(engine.next_logits(s), engine.next_logits(ref)) == 0


def test_bf16_slow_weights_keep_the_session_memories_float32(engine_dir, engine):
    """With bfloat16 slow weights (autocast, the CUDA default) the session's memories stay
    float32 through commits, on the engine's own path and through the scheduler's decode batch,
    and they learn what the float32 engine learns, up to bfloat16's rounding of the activations."""
    from hope_core.checkpoint import load_checkpoint
    from hope_core.scheduler import Job, Scheduler

    fast = Engine(load_checkpoint(engine_dir), bf16=True)
    ref = fast.model.init_state(1).tensors()
    tokens = random_tokens(6 * engine.cfg.chunk + 1, 77)
    half, full = fast.new_session(), engine.new_session()
    fast.absorb(half, tokens)
    engine.absorb(full, tokens)
    sched = Scheduler(fast, max_batch=4)
    sessions = [fast.new_session() for _ in range(3)]
    futures = [sched.submit(Job(s, tokens[:5 + i], SamplingParams(max_tokens=3 * engine.cfg.chunk, seed=i)))
               for i, s in enumerate(sessions)]
    while not all(f.done() for f in futures):
        sched.step()
    for what, s in [("engine", half)] + [(f"scheduler {i}", s) for i, s in enumerate(sessions)]:
        assert s.updates["titans"] >= 3, what
        for name, t in s.state.tensors().items():
            if not name.endswith("last_hidden"):  # an activation: the forward's precision
                assert t.dtype == ref[name].dtype, f"{what}: {name} is {t.dtype}"
    # what each learned, from its own start (the bfloat16 engine's initial memories are its
    # parameters' bfloat16 values)
    start_half, start_full = fast.model.init_state(1), engine.model.init_state(1)
    for i, (layer_half, layer_full) in enumerate(zip(half.state.layers, full.state.layers)):
        for key in ("mem_a", "mem_b", "mom_a", "fast_up", "mid_up"):
            learned_full = layer_full[key] - start_full.layers[i][key]
            learned_half = layer_half[key] - start_half.layers[i][key]
            assert learned_full.norm() > 0, key
            assert (learned_half - learned_full).norm() <= 0.1 * learned_full.norm(), f"layer {i}: {key}"
