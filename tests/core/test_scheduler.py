"""Continuous batching (hope_core.scheduler, hope_core.batch): a job run inside a changing batch
gets what `Engine.generate` gives it alone, and the batch never mixes sessions up."""

from __future__ import annotations

import itertools
import random
import threading
import time

import pytest
import torch
from hope_testkit import ATOL

from hope_core.batch import DecodeBatch
from hope_core.engine import Engine, PromptAbsorbed, TokenEvent
from hope_core.model import Learning, State
from hope_core.sampling import SamplingParams, sample, sample_rows
from hope_core.scheduler import Cancelled, Job, NotAdmitted, Scheduler


def alone(engine: Engine, prompt: list[int], params: SamplingParams, learn=True, base=None):
    session = (base or engine.new_session()).copy()
    gen = engine.generate(session, prompt, params, learn)
    for _ in gen:
        pass
    return gen.result, session


def assert_same_state(a, b) -> None:
    ta, tb = a.state.tensors(), b.state.tensors()
    for name in ta:
        torch.testing.assert_close(ta[name].float(), tb[name].float(), atol=ATOL, rtol=0, msg=name)


def random_jobs(engine: Engine, n: int, seed: int) -> list[tuple[list[int], SamplingParams, Learning]]:
    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        prompt = [rng.randrange(5, 4000) for _ in range(rng.randrange(1, 40))]
        params = SamplingParams(max_tokens=rng.randrange(1, 30), seed=seed * 100 + i,
                                temperature=rng.choice([0.0, 0.7, 1.0]), top_p=rng.choice([1.0, 0.9]),
                                top_k=rng.choice([0, 20]), top_logprobs=rng.choice([0, 0, 3]))
        learn = rng.choice([Learning(), Learning(), Learning.off(), Learning(mid=False)])
        jobs.append((prompt, params, learn))
    return jobs


def assert_same_alternatives(got, want) -> None:
    """Alternatives per token: the same tokens in the same order, log-probabilities to ATOL."""
    assert [[t for t, _ in top] for top in got] == [[t for t, _ in top] for top in want]
    torch.testing.assert_close(torch.tensor([v for top in got for _, v in top]),
                               torch.tensor([v for top in want for _, v in top]), atol=ATOL, rtol=0)


def run_to_end(sched: Scheduler, futures) -> int:
    steps = 0
    while not all(f.done() for f in futures):
        sched.step()
        steps += 1
    return steps


@pytest.mark.parametrize("max_batch,prefill", [(3, 4), (8, 64)])
def test_a_batched_job_equals_the_same_job_alone(any_engine, max_batch, prefill):
    engine = any_engine
    jobs = random_jobs(engine, 7, seed=max_batch)
    sched = Scheduler(engine, max_batch=max_batch, prefill_tokens=prefill)
    sessions = [engine.new_session() for _ in jobs]
    futures = [sched.submit(Job(s, p, sp, learn)) for s, (p, sp, learn) in zip(sessions, jobs)]
    run_to_end(sched, futures)
    for (prompt, params, learn), session, fut in zip(jobs, sessions, futures):
        ref, ref_session = alone(engine, prompt, params, learn)
        got = fut.result()
        assert got.generation.token_ids == ref.token_ids
        assert got.generation.text == ref.text
        assert got.generation.finish_reason == ref.finish_reason
        torch.testing.assert_close(torch.tensor(got.generation.logprobs), torch.tensor(ref.logprobs),
                                   atol=ATOL, rtol=0)
        assert len(got.generation.top_logprobs) == (len(ref.token_ids) if params.top_logprobs else 0)
        assert_same_alternatives(got.generation.top_logprobs, ref.top_logprobs)
        assert [u.level for u in got.updates] == [u.level for u in ref.updates]
        assert [u.level for u in got.generation.updates] == [u.level for u in ref.updates]  # as generate's
        assert_same_state(session, ref_session)


def test_prompt_logprobs_and_scoring_only_jobs(engine):
    prompt = list(range(100, 137))
    session = engine.new_session()
    sched = Scheduler(engine, prefill_tokens=8)
    events: list = []
    fut = sched.submit(Job(session, prompt, SamplingParams(max_tokens=0), emit=events.append))
    run_to_end(sched, [fut])
    ref_session = engine.new_session()
    ref = engine.absorb(ref_session, prompt)
    torch.testing.assert_close(torch.tensor(fut.result().prompt_logprobs), torch.tensor(ref.logprobs),
                               atol=ATOL, rtol=0)
    assert fut.result().generation is None
    assert len(events) == 1 and isinstance(events[0], PromptAbsorbed) and events[0].token_ids == prompt
    assert_same_state(session, ref_session)
    assert fut.result().prompt_top == events[0].top == []


def test_prompt_alternatives_in_a_group_that_asks_for_more(engine):
    """Jobs prefilled together ask for different numbers of alternatives per prompt token: each
    gets its own number, the ones `Engine.absorb` gives."""
    prompts = [list(range(100, 137)), list(range(300, 337)), list(range(500, 537))]
    sched = Scheduler(engine, prefill_tokens=8 * len(prompts))
    events: list[list] = [[] for _ in prompts]
    futures = [sched.submit(Job(engine.new_session(), p, SamplingParams(max_tokens=0), emit=ev.append,
                                prompt_alternatives=k))
               for p, ev, k in zip(prompts, events, [2, 0, 5])]
    run_to_end(sched, futures)
    for p, ev, k, fut in zip(prompts, events, [2, 0, 5], futures):
        ref = engine.absorb(engine.new_session(), p, alternatives=k)
        assert len(fut.result().prompt_top) == (len(p) if k else 0)
        assert all(len(top) == k for top in fut.result().prompt_top)
        assert_same_alternatives(fut.result().prompt_top, ref.top)
        assert ev[0].top == fut.result().prompt_top


def test_sessions_leave_the_scheduler_with_memory_of_their_own(engine):
    """Prefill hands its rows on as views of one batch; every session a job gives back (scoring
    only, or generating) holds tensors of its own, so a kept session never pins a batch."""
    sched = Scheduler(engine)
    sessions = [engine.new_session() for _ in range(4)]
    futures = [sched.submit(Job(s, list(range(200, 230)), SamplingParams(max_tokens=n, seed=i)))
               for i, (s, n) in enumerate(zip(sessions, [0, 0, 3, 5]))]
    run_to_end(sched, futures)
    for i, s in enumerate(sessions):
        for name, t in s.state.tensors().items():
            assert t.untyped_storage().nbytes() == t.nbytes, f"session {i}: {name} views a larger tensor"


def test_jobs_that_finish_together_leave_the_batch_before_any_of_them_ends(engine):
    """A finished job's future wakes its consumer (the server encodes and stores the state);
    every row that finishes in a step is out of the batch first, taken from the last row back,
    so no row is moved to fill a hole in a batch that empties."""
    sched = Scheduler(engine)
    sessions = [engine.new_session() for _ in range(4)]
    futures = [sched.submit(Job(s, list(range(200, 209)), SamplingParams(max_tokens=6, seed=i)))
               for i, s in enumerate(sessions)]
    rows_when_ended: list[int] = []
    for f in futures:
        f.add_done_callback(lambda _: rows_when_ended.append(sched.batch.n))
    moved: list[tuple[int, int]] = []
    move = sched.batch._move
    sched.batch._move = lambda src, dst: (moved.append((src, dst)), move(src, dst))[1]
    run_to_end(sched, futures)
    assert rows_when_ended == [0, 0, 0, 0]
    assert moved == []
    for (s, f), i in zip(zip(sessions, futures), range(4)):
        ref, ref_session = alone(engine, list(range(200, 209)), SamplingParams(max_tokens=6, seed=i))
        assert f.result().generation.token_ids == ref.token_ids
        assert_same_state(s, ref_session)


def test_close_turn_is_absorbed_after_a_reply_cut_by_max_tokens(engine):
    prompt, params = [300, 301, 302], SamplingParams(max_tokens=5, seed=3)
    session = engine.new_session()
    sched = Scheduler(engine)
    fut = sched.submit(Job(session, prompt, params, close_turn=7))
    run_to_end(sched, [fut])
    ref, ref_session = alone(engine, prompt, params)
    engine.absorb(ref_session, [7])
    assert fut.result().generation.token_ids == ref.token_ids
    assert session.tokens_absorbed == ref_session.tokens_absorbed
    assert_same_state(session, ref_session)


def test_a_long_prompt_does_not_stall_the_sessions_that_decode(engine):
    sched = Scheduler(engine, prefill_tokens=8)
    decoding = sched.submit(Job(engine.new_session(), [5], SamplingParams(max_tokens=20, seed=1)))
    sched.step()  # its prompt is in; it decodes from now on
    long = sched.submit(Job(engine.new_session(), list(range(200, 400)), SamplingParams(max_tokens=1)))
    steps = 0
    while not long.done():
        stats = sched.step()
        steps += 1
        assert stats.prefill_tokens <= 8
        if not decoding.done():
            assert stats.batch_size >= 1  # the decoding job advanced in this very step
    assert steps >= 200 // 8
    assert decoding.done()


def test_a_consumer_that_goes_away_ends_only_its_own_job(engine):
    jobs = random_jobs(engine, 4, seed=11)
    jobs = [(p, SamplingParams(max_tokens=20, seed=i), learn) for i, (p, _, learn) in enumerate(jobs)]
    seen: list[int] = []

    def leave_after_three(item):
        if isinstance(item, TokenEvent):
            seen.append(item.token_id)
            if len(seen) == 3:
                raise ConnectionAbortedError

    sched = Scheduler(engine, max_batch=4)
    sessions = [engine.new_session() for _ in jobs]
    before = sessions[1].tokens_absorbed
    futures = [sched.submit(Job(s, p, sp, learn, emit=leave_after_three if i == 1 else None))
               for i, (s, (p, sp, learn)) in enumerate(zip(sessions, jobs))]
    run_to_end(sched, futures)
    with pytest.raises(ConnectionAbortedError):
        futures[1].result()
    # like a closed `Engine.generate`: the working copy holds exactly what was handed out
    assert sessions[1].tokens_absorbed == before + len(jobs[1][0]) + 3
    for i in (0, 2, 3):
        ref, ref_session = alone(engine, *jobs[i])
        assert futures[i].result().generation.token_ids == ref.token_ids
        assert_same_state(sessions[i], ref_session)


@pytest.mark.parametrize("seed,commit_wait", [(0, 0), (1, 3), (2, 8)])
def test_jobs_cancelled_at_random_steps_leave_the_others_as_if_alone(engine, seed, commit_wait):
    """Cancellations land on jobs in prefill, decoding, or waiting to commit, several in one
    step; each cancelled job ends with Cancelled, and every other one ends exactly where it would
    have alone."""
    rng = random.Random(seed)
    jobs = random_jobs(engine, 10, seed=seed)
    sched = Scheduler(engine, max_batch=6, prefill_tokens=rng.choice([4, 16]), commit_wait=commit_wait)
    sessions = [engine.new_session() for _ in jobs]
    submitted = [Job(s, p, sp, learn, cancel=threading.Event()) for s, (p, sp, learn) in zip(sessions, jobs)]
    futures = [sched.submit(j) for j in submitted]
    doomed = set(rng.sample(range(len(jobs)), 4))
    while not all(f.done() for f in futures):
        sched.step()
        for i in sorted(doomed):
            if rng.random() < 0.15:
                submitted[i].cancel.set()
                doomed.discard(i)
    survivors = 0
    for (prompt, params, learn), session, fut in zip(jobs, sessions, futures):
        if fut.exception() is not None:
            assert isinstance(fut.exception(), Cancelled)
            continue
        ref, ref_session = alone(engine, prompt, params, learn)
        assert fut.result().generation.token_ids == ref.token_ids
        assert_same_state(session, ref_session)
        survivors += 1
    assert len(jobs) - 4 <= survivors < len(jobs)  # (seeded: some of the doomed were still running)


def test_the_background_thread_serves_jobs_submitted_from_many_threads(engine):
    sched = Scheduler(engine, max_batch=4).start()
    jobs = random_jobs(engine, 10, seed=5)
    results: dict[int, object] = {}

    def client(i: int) -> None:
        prompt, params, learn = jobs[i]
        results[i] = sched.submit(Job(engine.new_session(), prompt, params, learn)).result(timeout=60)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sched.stop()
    for i, (prompt, params, learn) in enumerate(jobs):
        assert results[i].generation.token_ids == alone(engine, prompt, params, learn)[0].token_ids
    with pytest.raises(RuntimeError):
        sched.submit(Job(engine.new_session(), [1], SamplingParams(max_tokens=1)))


def test_out_of_vocabulary_prompts_are_refused_at_submit(engine):
    with pytest.raises(ValueError):
        Scheduler(engine).submit(Job(engine.new_session(), [engine.cfg.vocab_size], SamplingParams()))


def test_rows_keep_their_sessions_through_joins_and_leaves(engine):
    """Slots are reused and rows move when sessions leave: every row still holds its session."""
    states = []
    for i in range(5):
        s = engine.new_session()
        engine.absorb(s, list(range(10 + i, 13 + 3 * i)))
        states.append(s.state)
    batch = DecodeBatch(engine.model, engine.new_session().state, capacity=2)
    for st in states[:4]:
        batch.join(st)  # grows past its capacity
    out = batch.leave(1)  # row 3 moves into row 1
    torch.testing.assert_close(out.layers[0]["open_k"], states[1].layers[0]["open_k"])
    batch.join(states[4])
    expect = [states[0], states[3], states[2], states[4]]
    for row, st in enumerate(expect):
        got = batch.row_state(row)
        for name, t in st.tensors().items():
            torch.testing.assert_close(got.tensors()[name], t, msg=name)
    assert batch.open_counts == [int(st.n_open[0]) for st in expect]


def test_sampling_a_row_does_not_depend_on_the_other_rows():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 3
    params = [SamplingParams(temperature=0.9, top_p=p, top_k=k, seed=s)
              for s, (p, k) in enumerate([(1.0, 0), (0.8, 0), (1.0, 5), (0.5, 3), (1.0, 0), (0.0001, 0)])]
    for trial in range(20):
        gens = [random.Random(trial * 10 + i) for i in range(6)]
        together = sample_rows(logits, params, gens)
        single = [sample(logits[i], params[i], random.Random(trial * 10 + i)) for i in range(6)]
        assert together == single
        assert together[5] == int(logits[5].argmax())  # a vanishing top_p is greedy
        for row, p in zip(together, params):
            if p.top_k:
                assert row in torch.topk(logits[params.index(p)], p.top_k).indices.tolist()


@pytest.mark.parametrize("commit_wait", [0, 3])
def test_padded_steps_compute_the_same_as_exact_ones(engine, commit_wait):
    """The CUDA-graph path runs power-of-two batches whose extra rows are padding; on the CPU the
    same padded shapes run eagerly (`pad=True`): the real rows must not notice, nor the rows that
    wait to commit and so sit among the padded ones."""
    jobs = random_jobs(engine, 5, seed=21)
    results = []
    for pad in (False, True):
        sched = Scheduler(engine, max_batch=5, prefill_tokens=16)
        sched.batch = DecodeBatch(engine.model, engine.new_session().state, capacity=8, pad=pad,
                                  commit_wait=commit_wait)
        sessions = [engine.new_session() for _ in jobs]
        futures = [sched.submit(Job(s, p, sp, learn)) for s, (p, sp, learn) in zip(sessions, jobs)]
        run_to_end(sched, futures)
        results.append(([f.result().generation.token_ids for f in futures], sessions))
    assert results[0][0] == results[1][0]
    for a, b in zip(results[0][1], results[1][1]):
        assert_same_state(a, b)


@pytest.mark.parametrize("phases,old", [([3, 3, 3, 3], 0), ([0, 5, 0, 9], 0), ([15, 2, 15, 15], 0),
                                        ([1, 1, 2, 1], 2)])
def test_decode_batch_steps_equal_the_functional_batched_step(engine, phases, old):
    """The decode batch writes its slot buffers in place (the window and the open chunk joined
    as one view), commits consecutive rows through views and rolls their windows in place,
    other rows through a gather: every way ends where `Engine.decode_batch`, which copies
    everything, ends. The first `old` sessions have a full window, the others are young."""
    sessions, C = [], engine.cfg.chunk
    for i, phase in enumerate(phases):
        s, n_open = engine.new_session(), phase % C
        history = C + (engine.cfg.window if i < old else 0)
        engine.absorb(s, [(7 * i + j) % 4000 + 5 for j in range(history + n_open - int(s.state.n_open[0]))])
        assert int(s.state.n_open[0]) == n_open
        sessions.append(s)
    batch = DecodeBatch(engine.model, engine.new_session().state, capacity=len(phases))
    for s in sessions:
        batch.join(s.state)
    joined = batch.slots.layers[0]
    assert joined["open_k"].data_ptr() == joined["attn_k"][:, -1:].data_ptr() + joined["attn_k"].stride(1) * 4
    expect = Engine.stack(sessions)
    for step in range(2 * C + 3):
        tokens = torch.tensor([(step * 31 + 11 * r) % 4000 + 5 for r in range(len(phases))])
        batch.step(tokens, [Learning()] * len(phases))
        _, expect, _ = engine.decode_batch(expect, tokens, Learning())
        for name, t in expect.tensors().items():
            torch.testing.assert_close(batch.view().tensors()[name], t, atol=ATOL, rtol=0,
                                       msg=f"step {step}: {name}")


@pytest.mark.parametrize("pad", [False, True])
def test_rows_whose_chunks_fill_wait_and_commit_together(engine, pad):
    """With `commit_wait`, a row whose chunk fills steps aside until others fill theirs (or it
    has waited long enough): the commits come in fewer, larger groups, sessions that committed
    together stay in phase, and every session ends exactly where absorbing its own tokens ends.
    With padded steps (the CUDA-graph shapes) the waiting rows sit among the padding rows, which
    the step computes too: they come out untouched."""
    C = engine.cfg.chunk
    phases = [0, 1, 2, C - 1, 1]
    bases, streams = [], []
    for i, phase in enumerate(phases):
        s = engine.new_session()
        engine.absorb(s, [(3 * i + j) % 4000 + 5 for j in range(C + phase - int(s.state.n_open[0]))])
        bases.append(s)
        streams.append([(17 * i + 5 * j) % 4000 + 5 for j in range(6 * C)])

    def run(commit_wait: int):
        batch = DecodeBatch(engine.model, engine.new_session().state, capacity=2, commit_wait=commit_wait,
                            pad=pad)
        for i, s in enumerate(bases):
            batch.join(s.state, owner=i)
        fed, groups = [0] * len(bases), []
        for _ in range(4 * C):
            owners = batch.owners[:batch.n_decoding]
            tokens = [streams[o][fed[o]] for o in owners]
            for o in owners:
                fed[o] += 1
            groups += [len(rows) for rows, _ in batch.step(tokens, [Learning()] * len(owners))]
            assert batch.n_decoding > 0
        groups += [len(rows) for rows, _ in batch.commit_waiting()]
        return batch, fed, groups

    _, _, eager_groups = run(0)
    waited, fed, groups = run(3)
    assert len(groups) < len(eager_groups)  # fewer, larger commits
    assert max(groups) > max(eager_groups)
    for row, owner in enumerate(waited.owners):
        alone = bases[owner].copy()
        engine.absorb(alone, streams[owner][:fed[owner]])
        got = waited.row_state(row)
        for name, t in alone.state.tensors().items():
            if name == "last_hidden":  # a decode step keeps its own; absorb keeps the chunk's
                continue
            torch.testing.assert_close(got.tensors()[name], t, atol=ATOL, rtol=0, msg=f"session {owner}: {name}")


def test_a_waiting_row_leaves_only_after_its_commit_and_joins_go_before_waiting_rows(engine):
    C = engine.cfg.chunk
    full, fresh = engine.new_session(), engine.new_session()
    engine.absorb(full, list(range(5, 5 + C - 1 - int(full.state.n_open[0]))))  # one token short
    batch = DecodeBatch(engine.model, fresh.state, capacity=4, commit_wait=3)
    batch.join(full.state, owner="full")
    batch.join(fresh.state, owner="fresh")
    batch.step([7, 8], [Learning(), Learning()])
    assert batch.owners == ["fresh", "full"] and batch.n_waiting == 1
    with pytest.raises(ValueError):
        batch.leave(1)
    assert batch.join(engine.new_session().state, owner="new") == 1
    assert batch.owners == ["fresh", "new", "full"] and batch.n_decoding == 2
    (rows, _), = batch.commit_waiting()
    assert rows == [2] and batch.n_waiting == 0
    assert int(batch.row_state(2).n_committed[0]) == int(full.state.n_committed[0]) + C
    left = batch.leave(0)
    assert int(left.n_committed[0]) == int(fresh.state.n_committed[0])
    assert batch.owners == ["full", "new"]  # the last decoding row took the hole


def test_several_rows_join_at_once_before_the_waiting_rows(engine):
    """A prefill group joins the decode batch in one copy per buffer: the rows land after the
    decoding rows, the waiting rows move out of their way, and every row holds its session."""
    C = engine.cfg.chunk
    states = []
    for i in range(5):
        s = engine.new_session()
        engine.absorb(s, [(5 * i + j) % 4000 + 5 for j in range(C - 1 - int(s.state.n_open[0]) + (i % 2))])
        states.append(s.state)
    batch = DecodeBatch(engine.model, engine.new_session().state, capacity=2, commit_wait=4)
    for i in range(2):
        batch.join(states[i], owner=i)  # session 0 is one token short of a full chunk
    batch.step([7, 8], [Learning(), Learning()])
    assert batch.owners == [1, 0] and batch.n_waiting == 1
    waiting = batch.row_state(1)
    group = State.cat(states[2:])
    assert batch.join_many(group, [2, 3, 4]) == 1  # grows past its capacity
    assert batch.owners == [1, 2, 3, 4, 0] and batch.n_decoding == 4 and batch.n_waiting == 1
    expect = [None, states[2], states[3], states[4], waiting]
    for row, st in enumerate(expect):
        if st is None:
            continue
        got = batch.row_state(row)
        for name, t in st.tensors().items():
            torch.testing.assert_close(got.tensors()[name], t, rtol=0, atol=0, msg=f"row {row}: {name}")
    assert batch.open_counts[1:] == [int(st.n_open[0]) % C for st in expect[1:]]
    with pytest.raises(ValueError):
        batch.join_many(group, [5, 6])


def test_turn_close_tokens_go_through_the_batched_step(engine):
    """A finished reply's turn-close token is absorbed in the next batched step, beside jobs
    still decoding (and possibly completing a chunk there): every session ends as if it were
    alone, with the close token absorbed after its reply."""
    jobs = [([300, 301, 302], SamplingParams(max_tokens=5, seed=3), 7),
            ([40, 41], SamplingParams(max_tokens=engine.cfg.chunk - 3, seed=4), 9),
            ([50] * 11, SamplingParams(max_tokens=20, seed=5), None)]
    sched = Scheduler(engine)
    sessions = [engine.new_session() for _ in jobs]
    futs = [sched.submit(Job(s, p, params, close_turn=close)) for s, (p, params, close) in zip(sessions, jobs)]
    run_to_end(sched, futs)
    for s, fut, (prompt, params, close) in zip(sessions, futs, jobs):
        ref, ref_session = alone(engine, prompt, params)
        if close is not None:
            engine.absorb(ref_session, [close])
        assert fut.result().generation.token_ids == ref.token_ids
        assert s.tokens_absorbed == ref_session.tokens_absorbed
        assert_same_state(s, ref_session)


def test_a_padded_step_after_a_leave_beside_a_waiting_row(engine):
    """A decoding row leaves while a row waits to commit: the waiting row moves down, and the
    slot it left (its chunk full) becomes padding. A padded step (the CUDA-graph shapes) must
    compute that slot like any padding row, and the real rows as an exact step does."""
    C = engine.cfg.chunk
    states = []
    for i in range(7):
        s = engine.new_session()
        want = C - 1 if i == 0 else C + 1 + i % 2  # row 0 is one token short of a full chunk
        engine.absorb(s, [(11 * i + j) % 4000 + 5 for j in range(want - s.tokens_absorbed)])
        states.append(s.state)
    results = []
    for pad in (False, True):
        batch = DecodeBatch(engine.model, engine.new_session().state, capacity=8, pad=pad, commit_wait=8)
        for i, st in enumerate(states):
            batch.join(st, owner=i)
        batch.step([100 + r for r in range(7)], [Learning()] * 7)
        assert batch.n_waiting == 1
        batch.leave(0)  # the last waiting row moves into the last decoding one's place
        for step in range(3):
            batch.step([200 + step] * batch.n_decoding, [Learning()] * batch.n_decoding)
        batch.commit_waiting()
        results.append({o: batch.row_state(row) for row, o in enumerate(batch.owners)})
    for owner, exact in results[0].items():
        for name, t in exact.tensors().items():
            torch.testing.assert_close(results[1][owner].tensors()[name], t, atol=ATOL, rtol=0,
                                       msg=f"session {owner}: {name}")


def test_a_job_cancelled_in_the_queue_ends_at_the_next_step(engine):
    sched = Scheduler(engine, max_batch=1)
    running = sched.submit(Job(engine.new_session(), [5, 6], SamplingParams(max_tokens=30, temperature=0)))
    queued_job = Job(engine.new_session(), [7], SamplingParams(max_tokens=3), cancel=threading.Event())
    queued = sched.submit(queued_job)
    sched.step()
    queued_job.cancel.set()
    sched.step()
    assert queued.done() and isinstance(queued.exception(), Cancelled)
    assert not running.done()


def test_a_job_not_admitted_in_time_ends_untouched(engine):
    """`admit_within_s` bounds the wait for a row of the batch: past it the queued job fails
    with NotAdmitted and its session is as it was; a job admitted in time runs as if alone, and
    a job without a deadline waits as long as it takes."""
    sched = Scheduler(engine, max_batch=1)
    running = sched.submit(Job(engine.new_session(), [5, 6], SamplingParams(max_tokens=30, temperature=0)))
    late_session, patient_session = engine.new_session(), engine.new_session()
    before = {name: t.clone() for name, t in late_session.state.tensors().items()}
    late = sched.submit(Job(late_session, [7], SamplingParams(max_tokens=3), admit_within_s=0.05))
    patient = sched.submit(Job(patient_session, [7], SamplingParams(max_tokens=3)))
    sched.step()
    time.sleep(0.1)
    sched.step()
    assert late.done() and isinstance(late.exception(), NotAdmitted)
    assert "0.05 s" in str(late.exception())
    assert all(torch.equal(t, before[name]) for name, t in late_session.state.tensors().items())
    assert not patient.done() and not running.done()
    prompt, params = [9, 10], SamplingParams(max_tokens=4, seed=2)
    in_time_session = engine.new_session()
    in_time = sched.submit(Job(in_time_session, prompt, params, admit_within_s=60))
    run_to_end(sched, [running, patient, in_time])
    ref, ref_session = alone(engine, prompt, params)
    assert in_time.result().generation.token_ids == ref.token_ids
    assert_same_state(in_time_session, ref_session)


def _broken_session(engine: Engine, **tensors: torch.Tensor):
    """A fresh session with some tensors replaced, as a bug could leave one (never a stored
    state: those are validated when loaded)."""
    s = engine.new_session()
    s.state = s.state.map(lambda t: t)  # dicts of its own: fresh sessions share their tensors
    for name, t in tensors.items():
        if name.startswith("layer0."):
            s.state.layers[0][name.removeprefix("layer0.")] = t
        else:
            setattr(s.state, name, t)
    return s


def test_a_failing_step_fails_the_jobs_in_flight_and_keeps_the_queue(engine):
    """A step that raises (the commit of a session whose open chunk holds a token outside the
    vocabulary) fails the jobs it ran; a job still queued was not touched and then runs as if
    alone."""
    C, V = engine.cfg.chunk, engine.cfg.vocab_size
    sched = Scheduler(engine, max_batch=1, commit_wait=0)
    broken = _broken_session(engine, n_open=torch.tensor([C - 1]),
                             open_tokens=torch.full((1, C), V + 7))  # the next token fills the chunk
    bad = sched.submit(Job(broken, [], SamplingParams(max_tokens=2)))
    prompt, params = [9, 10, 11], SamplingParams(max_tokens=6, seed=1)
    good_session = engine.new_session()
    good = sched.submit(Job(good_session, prompt, params))
    assert sched.run_step() is None  # the step failed
    assert bad.done() and bad.exception() is not None and not good.done()
    while not good.done():
        sched.run_step()
    ref, ref_session = alone(engine, prompt, params)
    assert good.result().generation.token_ids == ref.token_ids
    assert_same_state(good_session, ref_session)
    with pytest.raises(ValueError):  # a close token outside the vocabulary fails at submit, alone
        sched.submit(Job(engine.new_session(), [5], SamplingParams(max_tokens=1), close_turn=engine.cfg.vocab_size))


def test_a_session_that_cannot_join_the_batch_ends_alone(engine):
    """A state of the wrong shape fails its own join, whole: its job ends with the error, the
    batch is unchanged and the jobs beside it run as if alone."""
    sched = Scheduler(engine, max_batch=4)
    jobs = random_jobs(engine, 3, seed=8)
    sessions = [engine.new_session() for _ in jobs]
    futures = [sched.submit(Job(s, p, sp, learn)) for s, (p, sp, learn) in zip(sessions, jobs)]
    sched.step()
    bad = sched.submit(Job(_broken_session(engine, **{"layer0.attn_k": torch.zeros(1, 3, 3, 3)}), [],
                           SamplingParams(max_tokens=2)))
    run_to_end(sched, [*futures, bad])
    assert isinstance(bad.exception(), ValueError)
    for (prompt, params, learn), session, fut in zip(jobs, sessions, futures):
        ref, ref_session = alone(engine, prompt, params, learn)
        assert fut.result().generation.token_ids == ref.token_ids
        assert_same_state(session, ref_session)


def test_a_reply_that_fills_its_chunk_keeps_that_commits_updates_when_it_waits(engine):
    """A reply whose last token fills its chunk, while `commit_wait` holds the row back: the
    commit comes after the reply was marked closing, and its updates are still the reply's."""
    C = engine.cfg.chunk
    levels = []
    for commit_wait in (0, 8):
        sched = Scheduler(engine, commit_wait=commit_wait)
        first, other = engine.new_session(), engine.new_session()
        fill = C - first.tokens_absorbed - 1  # the prompt's token, then `fill` tokens fill the chunk
        done = sched.submit(Job(first, [300], SamplingParams(max_tokens=fill, temperature=0), close_turn=7))
        rest = sched.submit(Job(other, [], SamplingParams(max_tokens=3 * C, temperature=0)))
        run_to_end(sched, [done, rest])
        levels.append([u.level for u in done.result().generation.updates])
    assert levels[0] == levels[1] and levels[0], levels


def test_step_stats_count_the_tokens_a_step_made(engine):
    """Rows waiting to commit are in the step's batch but take no token: `decoded` says how many
    did, and the tokens of all steps add up to the tokens the jobs generated."""
    steps = []
    sched = Scheduler(engine, max_batch=4, prefill_tokens=64, commit_wait=8, on_step=steps.append)
    jobs = [Job(session=engine.new_session(), prompt=[5] * (3 + 5 * i), params=SamplingParams(max_tokens=40, seed=i))
            for i in range(4)]  # out of phase: their chunks fill at different steps
    futures = [sched.submit(j) for j in jobs]
    run_to_end(sched, futures)
    made = sum(len(f.result().generation.token_ids) for f in futures)
    assert sum(s.decoded for s in steps) == made
    assert any(s.decoded < s.batch_size for s in steps)  # some stepped aside to wait
    assert all(s.decoded <= s.batch_size for s in steps)


def test_a_session_waiting_to_commit_does_not_sit_out_long_prefill_steps(engine):
    """A row whose chunk fills may wait up to `commit_wait` decode steps for another to commit
    with it. A step that also absorbs a slice of a long prompt takes many times longer: waiting
    through eight of those stalled a stream for seconds. Prefill counts towards the wait."""
    done = [0]
    seen: dict[int, list[int]] = {0: [], 1: []}

    def emit(i: int):
        return lambda e: seen[i].append(done[0]) if isinstance(e, TokenEvent) else None

    sched = Scheduler(engine, max_batch=4, prefill_tokens=64, commit_wait=8,
                      on_step=lambda s: done.__setitem__(0, done[0] + 1))
    # chunks out of phase by two tokens (of 4): the first to fill would sit out two steps
    decoders = [Job(session=engine.new_session(), prompt=[5] * n, params=SamplingParams(max_tokens=48, seed=i),
                    emit=emit(i)) for i, n in enumerate((1, 3))]
    long = sched.submit(Job(session=engine.new_session(), prompt=[7] * (64 * 30), params=SamplingParams(max_tokens=1)))
    futures = [sched.submit(j) for j in decoders]
    prefilling = []  # the steps that absorbed prompt tokens
    while not all(f.done() for f in [*futures, long]):
        stats = sched.step()
        if stats.prefill_tokens:
            prefilling.append(done[0])
    for steps in seen.values():
        during = [b - a for a, b in itertools.pairwise(steps) if b <= prefilling[-1]]
        assert len(during) > 20 and max(during) == 1, during


def test_a_session_waits_to_commit_only_with_sessions_it_commits_with(engine):
    """Sessions that learn differently commit in separate groups: waiting for one another saves
    nothing, so a session whose chunk fills does not sit out steps for them."""
    done = [0]
    seen: list[int] = []
    sched = Scheduler(engine, max_batch=4, prefill_tokens=64, commit_wait=8,
                      on_step=lambda s: done.__setitem__(0, done[0] + 1))
    reader = Job(session=engine.new_session(), prompt=[5], params=SamplingParams(max_tokens=24, seed=0),
                 learn=False, emit=lambda e: seen.append(done[0]) if isinstance(e, TokenEvent) else None)
    learner = Job(session=engine.new_session(), prompt=[5] * 3, params=SamplingParams(max_tokens=24, seed=1))
    run_to_end(sched, [sched.submit(reader), sched.submit(learner)])
    assert [b - a for a, b in itertools.pairwise(seen)] == [1] * (len(seen) - 1)
