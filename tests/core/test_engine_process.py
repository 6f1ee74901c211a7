"""The scheduler in a child process (hope_core.engine_process): jobs give exactly what the
in-process scheduler gives, states cross through the shared slots intact, cancellation and a
consumer that leaves stop only their job, and a child that dies fails its jobs as a whole and
is replaced."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time

import pytest
import torch
from hope_testkit import ATOL
from test_scheduler import assert_same_alternatives, assert_same_state, random_jobs, run_to_end

from hope_core.engine import PromptAbsorbed, TokenEvent
from hope_core.engine_process import EngineDied, EngineProcess, StateSlots, slot_layout
from hope_core.model import State
from hope_core.sampling import SamplingParams
from hope_core.scheduler import Cancelled, Job, NotAdmitted, Scheduler

WAIT_S = 120  # a generous bound for a job on a loaded 2-core machine


def close(a: list[float], b: list[float]) -> None:
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=ATOL, rtol=0)


def start_process(engine, engine_dir, slots: int = 8, max_batch: int = 8, **kwargs) -> EngineProcess:
    return EngineProcess(engine_dir, engine.new_session().state, slots=slots, max_batch=max_batch, prefill_tokens=16,
                         threads=1, vocab_size=engine.cfg.vocab_size, **kwargs).start()


@pytest.fixture(scope="module")
def proc(engine, engine_dir):
    p = start_process(engine, engine_dir)
    yield p
    p.stop()


def test_slots_carry_a_state_exactly(engine):
    """A row view of a batch (not contiguous in its storage) goes in; an owned copy comes out."""
    sessions = [engine.new_session() for _ in range(3)]
    engine.absorb_batch(sessions, [[11, 12, 13], [14, 15, 16], [17, 18, 19]])
    row = sessions[1].state
    assert row.n_open.untyped_storage().nbytes() > row.n_open.nbytes  # a view of the batch
    batch = State.cat([s.state for s in sessions])
    slots = StateSlots(slot_layout(engine.new_session().state), 2)
    try:
        slots.write(1, row)
        out = slots.read(1)
        for name, t in row.tensors().items():
            assert torch.equal(out.tensors()[name], t), name
            assert out.tensors()[name].untyped_storage().nbytes() == t.nbytes, f"{name} is not its own"
        with pytest.raises(ValueError, match="does not fit"):
            slots.write(0, batch)  # three sessions do not fit one slot
    finally:
        slots.close()


def test_jobs_in_the_child_equal_jobs_in_process(engine, proc):
    """Same tokens, log-probabilities, updates, events and final states as the in-process
    scheduler, for mixed sampling parameters, learning switches and prompt lengths (the child's
    batches form at other moments, so floats may round differently)."""
    jobs = random_jobs(engine, 6, seed=5)
    sched = Scheduler(engine, max_batch=8, prefill_tokens=16)
    local_sessions = [engine.new_session() for _ in jobs]
    remote_sessions = [engine.new_session() for _ in jobs]
    local_events: list[list] = [[] for _ in jobs]
    remote_events: list[list] = [[] for _ in jobs]
    local = [sched.submit(Job(s, p, sp, learn, close_turn=7, emit=ev.append, prompt_alternatives=i % 3))
             for i, (s, (p, sp, learn), ev) in enumerate(zip(local_sessions, jobs, local_events))]
    run_to_end(sched, local)
    remote = [proc.submit(Job(s, p, sp, learn, close_turn=7, emit=ev.append, prompt_alternatives=i % 3))
              for i, (s, (p, sp, learn), ev) in enumerate(zip(remote_sessions, jobs, remote_events))]
    for lf, rf, ls, rs, le, re in zip(local, remote, local_sessions, remote_sessions, local_events, remote_events):
        want, got = lf.result(), rf.result(timeout=WAIT_S)
        assert got.generation.token_ids == want.generation.token_ids
        assert got.generation.text == want.generation.text
        assert got.generation.finish_reason == want.generation.finish_reason
        close(got.generation.logprobs, want.generation.logprobs)
        close(got.prompt_logprobs, want.prompt_logprobs)
        assert_same_alternatives(got.generation.top_logprobs, want.generation.top_logprobs)
        assert_same_alternatives(got.prompt_top, want.prompt_top)
        assert_same_alternatives(re[0].top, le[0].top)
        assert [e.top for e in re[1:]] == [[tuple(a) for a in e.top] for e in re[1:]]  # pairs, not JSON lists
        assert_same_alternatives([e.top for e in re[1:]], [e.top for e in le[1:]])
        assert [u.level for u in got.updates] == [u.level for u in want.updates]
        close([u.update_norm for u in got.updates], [u.update_norm for u in want.updates])
        close([u.surprise for u in got.updates], [u.surprise for u in want.updates])
        assert isinstance(re[0], PromptAbsorbed) and all(isinstance(e, TokenEvent) for e in re[1:])
        assert re[0].token_ids == le[0].token_ids
        assert [(e.token_id, e.text) for e in re[1:]] == [(e.token_id, e.text) for e in le[1:]]
        assert_same_state(rs, ls)
        assert rs.tokens_absorbed == ls.tokens_absorbed
    assert proc.busy == 0


def test_a_session_continues_across_jobs_in_the_child(engine, proc):
    """The state that comes back is the one the next job starts from: two turns in the child
    equal the same two turns in process."""
    sched = Scheduler(engine)
    local, remote = engine.new_session(), engine.new_session()
    for turn in range(2):
        prompt, params = list(range(100 + turn, 125 + turn)), SamplingParams(max_tokens=9, seed=turn)
        want = sched.submit(Job(local, prompt, params))
        run_to_end(sched, [want])
        got = proc.submit(Job(remote, prompt, params)).result(timeout=WAIT_S)
        assert got.generation.token_ids == want.result().generation.token_ids
    assert_same_state(remote, local)


def test_cancel_and_a_consumer_that_leaves_stop_only_their_job(engine, proc):
    cancelled_job = Job(engine.new_session(), [5, 6, 7], SamplingParams(max_tokens=4000, seed=1))
    leaver_seen: list = []

    def leave_after_three(item):
        if isinstance(item, TokenEvent):
            leaver_seen.append(item)
            if len(leaver_seen) >= 3:
                raise RuntimeError("client gone")

    leaver = Job(engine.new_session(), [8, 9], SamplingParams(max_tokens=4000, seed=2), emit=leave_after_three)
    keeper_session = engine.new_session()
    keeper = Job(keeper_session, [10, 11], SamplingParams(max_tokens=12, seed=3))
    before = keeper_session.state
    futures = [proc.submit(j) for j in (cancelled_job, leaver, keeper)]
    time.sleep(0.2)
    proc.cancel(cancelled_job)
    with pytest.raises(Cancelled):
        futures[0].result(timeout=WAIT_S)
    with pytest.raises(Cancelled):
        futures[1].result(timeout=WAIT_S)
    assert len(leaver_seen) == 3
    assert len(futures[2].result(timeout=WAIT_S).generation.token_ids) == 12
    assert keeper_session.state is not before
    assert proc.busy == 0


def test_a_job_not_admitted_in_time_crosses_as_not_admitted(engine, engine_dir):
    """The deadline for a row of the batch crosses to the child, and its failure comes back as
    NotAdmitted (the server answers 429), the session untouched."""
    proc = start_process(engine, engine_dir, slots=3, max_batch=2)  # more jobs than rows, as the server may
    try:
        long_jobs = [Job(engine.new_session(), [5 + i], SamplingParams(max_tokens=4000, seed=i)) for i in range(2)]
        futures = [proc.submit(j) for j in long_jobs]
        late_session = engine.new_session()
        before = late_session.state
        late = proc.submit(Job(late_session, [7], SamplingParams(max_tokens=3), admit_within_s=0.2))
        with pytest.raises(NotAdmitted, match=r"0\.2 s"):
            late.result(timeout=WAIT_S)
        assert late_session.state is before
        for j in long_jobs:
            proc.cancel(j)
        for f in futures:
            with pytest.raises(Cancelled):
                f.result(timeout=WAIT_S)
        assert proc.busy == 0
    finally:
        proc.stop()


def test_bad_tokens_are_refused_before_anything_runs(engine, proc):
    with pytest.raises(ValueError, match="vocabulary"):
        proc.submit(Job(engine.new_session(), [engine.cfg.vocab_size], SamplingParams(max_tokens=1)))
    assert proc.busy == 0


def test_a_child_that_dies_fails_its_jobs_and_is_replaced(engine, engine_dir):
    p = start_process(engine, engine_dir)
    try:
        session = engine.new_session()
        before = session.state
        started = threading.Event()
        job = Job(session, [5, 6], SamplingParams(max_tokens=4000, seed=1), emit=lambda _: started.set())
        future = p.submit(job)
        assert started.wait(WAIT_S)
        os.kill(p.pid, signal.SIGKILL)
        with pytest.raises(EngineDied):
            future.result(timeout=WAIT_S)
        assert session.state is before  # the job failed as a whole: its session is untouched
        deadline = time.monotonic() + WAIT_S
        while not p.alive and time.monotonic() < deadline:
            time.sleep(0.1)
        assert p.alive and p.restarts == 1
        out = p.submit(Job(engine.new_session(), [5, 6], SamplingParams(max_tokens=3, seed=1))).result(timeout=WAIT_S)
        assert len(out.generation.token_ids) == 3
    finally:
        p.stop()
    assert not p.alive
    with pytest.raises(RuntimeError, match="stopped"):
        p.submit(Job(engine.new_session(), [5], SamplingParams(max_tokens=1)))


def test_a_child_that_cannot_be_restarted_marks_the_process_failed(engine, engine_dir, tmp_path):
    """Its checkpoint gone, every restart fails; after the last one the process says so (the
    server's /healthz then fails, so that the orchestrator restarts the server)."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(engine_dir, ckpt)
    p = start_process(engine, ckpt, restart_delays_s=(0.05,))
    try:
        shutil.rmtree(ckpt)
        os.kill(p.pid, signal.SIGKILL)
        deadline = time.monotonic() + WAIT_S
        while not p.failed and time.monotonic() < deadline:
            time.sleep(0.1)
        assert p.failed and not p.alive and p.restarts == 2  # the first try and one retry
        with pytest.raises(EngineDied):
            p.submit(Job(engine.new_session(), [5], SamplingParams(max_tokens=1)))
    finally:
        p.stop()


def test_stop_during_the_restart_back_off_returns_at_once(engine, engine_dir, tmp_path):
    """A server told to stop while its engine waits to be restarted stops now, not after the
    back-off (up to 25 s), and starts no child after it."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(engine_dir, ckpt)
    p = start_process(engine, ckpt, restart_delays_s=(30.0,))
    shutil.rmtree(ckpt)  # the first restart fails, then the back-off
    first = p.pid
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + WAIT_S
    while (p.pid == first or p.alive or _running(p.pid)) and time.monotonic() < deadline:
        time.sleep(0.05)  # until the restarted child has failed and is gone
    time.sleep(0.5)  # the reader is in the back-off now
    stopping = time.monotonic()
    p.stop()
    assert time.monotonic() - stopping < 5
    assert p.restarts == 1 and not p.alive


def _running(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
