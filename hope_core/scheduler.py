"""Continuous batching: many sessions generating at once, one batched forward per step.

A `Job` is one request's engine work on its session's working copy: absorb a prompt, generate
up to `max_tokens` (each token absorbed, learning as it goes), optionally close the turn. The
`Scheduler` runs jobs on one thread, step by step:

1. admit waiting jobs while fewer than `max_batch` are running;
2. absorb up to `prefill_tokens` prompt tokens, oldest job first, whole chunks of several jobs
   in one batched forward, so a long prompt advances every step without stalling the sessions
   that are decoding;
3. run one decode step for every job that is generating: the logits of all of them, one batched
   sampling, and one batched forward that absorbs the sampled tokens (`DecodeBatch`), committing
   and learning the chunks that close, batched too.

Jobs join the batch when their prompt is in and leave when they finish, between steps. Each job
sees exactly what `Engine.generate` would produce for it alone (the same function of its own
state and its own random numbers; batching changes only float rounding).

`emit` is called on the scheduler thread with `PromptAbsorbed` and then each `TokenEvent`; if it
raises (the client went away), the job ends there and its future gets that exception.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from hope_core.batch import DecodeBatch
from hope_core.engine import (
    AbsorbResult,
    Engine,
    GenerationResult,
    PromptAbsorbed,
    TextStream,
    UpdateRecord,
    _learning,
    _records,
)
from hope_core.model import Learning, State
from hope_core.sampling import Alternatives, SamplingParams, pick_tokens, top_alternatives
from hope_core.state import SessionState

log = logging.getLogger("hope.scheduler")

Emit = Callable[[object], None]


@dataclass
class Job:
    session: SessionState  # the working copy; its `state` is replaced when the job ends
    prompt: list[int]
    params: SamplingParams
    learn: bool | Learning = True
    close_turn: int | None = None  # absorbed after a reply that did not end on a stop token
    emit: Emit | None = None
    cancel: threading.Event | None = None  # set: drop the job before its next piece of work
    prompt_alternatives: int = 0  # the most likely tokens reported at each prompt token's position
    admit_within_s: float | None = None  # not given a row of the batch by then: NotAdmitted


class Cancelled(Exception):
    """A job's `cancel` event was set before it finished."""


class NotAdmitted(Exception):
    """A job waited longer than its `admit_within_s` for a row of the batch. It touched
    nothing: its session is as it was submitted."""


@dataclass
class JobResult:
    prompt_logprobs: list[float]
    generation: GenerationResult | None  # None when max_tokens is 0 (scoring only)
    updates: list[UpdateRecord] = field(default_factory=list)
    prompt_top: list[Alternatives] = field(default_factory=list)  # with `Job.prompt_alternatives`


@dataclass
class StepStats:
    """What one scheduler step did, for metrics."""

    batch_size: int  # jobs in the decode step (0: prefill only), rows waiting to commit included
    prefill_tokens: int
    seconds: float
    decoded: int = 0  # rows that took a token in the decode step (not those waiting to commit)


class _Running:
    def __init__(self, job: Job, future: Future) -> None:
        self.job, self.future = job, future
        self.queued_at = time.monotonic()
        self.learning = _learning(job.learn)
        self.pos = 0  # prompt tokens absorbed
        self.prompt_logprobs: list[float] = []
        self.prompt_top: list[Alternatives] = []
        self.open: int | None = None  # tokens in the session's open chunk (host copy)
        self.updates: list[UpdateRecord] = []  # made while absorbing the prompt
        self.decode_updates: list[UpdateRecord] = []
        self.close_updates: list[UpdateRecord] = []
        self.closing = False  # its reply is done: its next (last) step absorbs `close_turn`
        self.close_absorbed = False  # `close_turn` went through a step: later commits hold it
        self.text: TextStream | None = None
        self.generator = job.params.generator()

    @property
    def cancelled(self) -> bool:
        return self.job.cancel is not None and self.job.cancel.is_set()

    def emit(self, item: object) -> None:
        if self.job.emit is not None:
            self.job.emit(item)


COMMIT_WAIT = 8  # steps a full chunk may wait to commit with others; see DecodeBatch.step


class Scheduler:
    def __init__(self, engine: Engine, max_batch: int = 64, prefill_tokens: int = 256,
                 graphs: bool | None = None, on_step: Callable[[StepStats], None] | None = None,
                 threads: int | None = None, commit_wait: int | None = None) -> None:
        """`threads`: torch CPU threads of the scheduler's own thread (`start`). On CPU, keep
        every other thread that runs torch work at one thread: a second OpenMP team in the
        process (one per thread that ran a multi-threaded op) slows this one's steps by a third
        to a half on a 2-core machine (docs/architecture.md, "Many sessions at once").

        `commit_wait`: steps a session whose chunk is full may wait for others to commit with
        it (`DecodeBatch`); by default COMMIT_WAIT on the CPU and 0 with CUDA graphs. Waiting
        works there too, but is not measured on a GPU yet, where the rows stepping aside (a
        gather and a scatter per state buffer: ~140 kernel launches a step in which rows fill)
        may cost what the commits it merges save."""
        self.engine = engine
        self.threads = threads
        self.max_batch = max_batch
        self.prefill_tokens = max(prefill_tokens, engine.cfg.chunk)
        if graphs is None:
            graphs = engine.device.type == "cuda"
        if commit_wait is None:
            commit_wait = 0 if graphs else COMMIT_WAIT
        self.batch = DecodeBatch(engine.model, engine.new_session().state, capacity=min(max_batch, 8),
                                 graphs=graphs, autocast=engine.autocast, commit_wait=commit_wait)
        self.on_step = on_step
        self._waiting: deque[_Running] = deque()
        self._prefill: deque[_Running] = deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- the public side (any thread) ---------------------------------------------------------

    def submit(self, job: Job) -> Future[JobResult]:
        V = self.engine.cfg.vocab_size
        if any(t < 0 or t >= V for t in job.prompt) or not (job.close_turn is None or 0 <= job.close_turn < V):
            raise ValueError("token id out of the vocabulary")
        future: Future[JobResult] = Future()
        with self._cv:
            if self._stopping:
                raise RuntimeError("the scheduler is stopped")
            self._waiting.append(_Running(job, future))
            self._cv.notify()
        return future

    def start(self) -> Scheduler:
        self._thread = threading.Thread(target=self._loop, name="hope-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Finish nothing more: jobs still queued or running fail with RuntimeError."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()
        self._fail_all(RuntimeError("the scheduler stopped"))

    def cancel(self, job: Job) -> None:
        """Drop `job` before its next piece of work (as setting its `cancel` event does)."""
        if job.cancel is None:
            job.cancel = threading.Event()
        job.cancel.set()
        with self._cv:
            self._cv.notify()

    @property
    def _decoding(self) -> list[_Running]:
        """The generating jobs, in the order of their rows in the decode batch."""
        return self.batch.owners

    @property
    def busy(self) -> int:
        """Jobs admitted or waiting."""
        return len(self._waiting) + len(self._prefill) + len(self._decoding)

    @property
    def queued(self) -> int:
        """Jobs not admitted yet: they wait for a row of the batch (at most `max_batch` run)."""
        return len(self._waiting)

    # ---- the loop ---------------------------------------------------------------------------------

    def _loop(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        while True:
            with self._cv:
                while not self._stopping and not (self._waiting or self._prefill or self._decoding):
                    self._cv.wait()
                if self._stopping:
                    return
            self.run_step()

    def run_step(self) -> StepStats | None:
        """One step; a failure (a bug, out of memory) fails the jobs in flight instead of
        raising, so the caller's loop keeps serving. Queued jobs were not touched: they stay
        queued."""
        try:
            return self.step()
        except Exception as e:
            log.exception("scheduler step failed")
            self._fail_all(e, queued=False)
            return None

    def step(self) -> StepStats:
        """One iteration: admit, a slice of prefill, one batched decode step."""
        t0 = time.perf_counter()
        with self._cv:
            queued_cancelled = [r for r in self._waiting if r.cancelled]
            for r in queued_cancelled:  # their clients wait for them to end, not for a free row
                self._waiting.remove(r)
            while self._waiting and len(self._prefill) + len(self._decoding) < self.max_batch:
                self._prefill.append(self._waiting.popleft())
            now = time.monotonic()
            overdue = [r for r in self._waiting
                       if r.job.admit_within_s is not None and now - r.queued_at > r.job.admit_within_s]
            for r in overdue:
                self._waiting.remove(r)
        for r in queued_cancelled:
            self._end(r, Cancelled())
        for r in overdue:
            self._end(r, NotAdmitted(f"no row of the batch came free in {r.job.admit_within_s:g} s"))
        for r in [r for r in self._prefill if r.cancelled]:
            self._prefill.remove(r)
            self._end(r, Cancelled())
        self._finish([(r, Cancelled()) for r in self._decoding if r.cancelled])
        n_prefill = self._prefill_step()
        if n_prefill and self.batch.n_waiting:  # a longer step: the waiting may have waited enough
            self.batch.waited(n_prefill / self.engine.cfg.chunk)
            if self.batch.commit_due():  # then they commit now, and take a token in this step
                self._attach(self.batch.commit_waiting())
        n_decode = len(self._decoding)
        decoded = self._decode_step() if n_decode else 0
        stats = StepStats(n_decode, n_prefill, time.perf_counter() - t0, decoded)
        if self.on_step is not None:
            self.on_step(stats)
        return stats

    def _prefill_step(self) -> int:
        """Absorb up to `prefill_tokens` prompt tokens, oldest job first, in rounds: each job
        takes its piece up to its next chunk boundary (a whole chunk once it stands on one), and
        the pieces of equal length run as one batched forward."""
        budget, done = self.prefill_tokens, 0
        C = self.engine.cfg.chunk
        while budget > 0 and self._prefill:
            groups: dict[tuple[int, Learning], list[_Running]] = {}
            for r in list(self._prefill):
                if budget <= 0:
                    break
                if r.open is None:
                    r.open = int(r.job.session.state.n_open[0])
                take = min(len(r.job.prompt) - r.pos, budget, C - r.open)
                budget -= take
                groups.setdefault((take, r.learning), []).append(r)
            for (take, learning), rs in groups.items():
                results: list[AbsorbResult | None] = [None] * len(rs)
                if take:  # (0: an empty prompt, straight to decoding)
                    try:
                        results = self.engine.absorb_batch([r.job.session for r in rs],
                                                           [r.job.prompt[r.pos:r.pos + take] for r in rs], learning,
                                                           alternatives=max(r.job.prompt_alternatives for r in rs))
                    except Exception as e:
                        for r in rs:
                            self._prefill.remove(r)
                            self._end(r, e)
                        continue
                ready = [r for r, res in zip(rs, results) if self._absorb(r, take, res)]
                if ready:
                    # the group's rows are consecutive views of one state (`absorb_batch`): they
                    # join the decode batch with one copy per buffer, not one per session
                    try:
                        self.batch.join_many(State.cat([r.job.session.state for r in ready]), ready)
                    except Exception as e:  # a join fails whole (DecodeBatch): only these jobs end
                        for r in ready:
                            self._end(r, e)
                done += take * len(rs)
        return done

    def _absorb(self, r: _Running, take: int, res: AbsorbResult | None) -> bool:
        """Account for the absorption of the next `take` prompt tokens; a job whose prompt is in
        leaves prefill. Returns whether the job now joins the decode batch."""
        if res is not None:
            r.prompt_logprobs += res.logprobs
            r.updates += res.updates
            if r.job.prompt_alternatives:  # the group computed as many as its most demanding job
                r.prompt_top += [top[:r.job.prompt_alternatives] for top in res.top]
        r.pos, r.open = r.pos + take, (r.open + take) % self.engine.cfg.chunk
        if r.pos < len(r.job.prompt):
            return False
        self._prefill.remove(r)
        try:
            r.emit(PromptAbsorbed(list(r.job.prompt), r.prompt_logprobs, r.prompt_top))
        except Exception as e:
            self._end(r, e)
            return False
        if r.job.params.max_tokens == 0:
            r.job.session.state = r.job.session.state.compact()  # not a view of the prefill batch
            self._end(r)
            return False
        r.text = TextStream(self.engine.tokenizer, r.job.params)
        return True

    def _decode_step(self) -> int:
        """One batched decode step. Returns the rows that took a token."""
        if self.batch.n_decoding == 0:  # only sessions waiting to commit are left
            self._attach(self.batch.commit_waiting())
        rows = self._decoding[:self.batch.n_decoding]
        logits = self.batch.logits()
        picked = pick_tokens(logits, [r.job.params for r in rows], [r.generator for r in rows])
        # a finished reply's turn-close token goes through the batched step like any token,
        # instead of a forward of its own after the job leaves
        closing = [i for i, r in enumerate(rows) if r.closing]
        if closing:
            picked[closing] = torch.tensor([rows[i].job.close_turn for i in closing], device=picked.device)
            for i in closing:
                rows[i].close_absorbed = True
        lse = torch.logsumexp(logits, -1)
        lps = logits.gather(1, picked[:, None])[:, 0] - lse
        # the step's one read from the device: each row's token, its log-probability and the
        # alternatives asked for (float64 holds the ids exactly); the tokens go into the batch's
        # forward without leaving it
        k = max(r.job.params.top_logprobs for r in rows)
        columns = [picked.double()[:, None], lps.double()[:, None]]
        if k:
            top_ids, top_lps = top_alternatives(logits - lse[:, None], k)
            columns += [top_ids.double(), top_lps.double()]
        host = torch.cat(columns, 1).tolist()
        self._attach(self.batch.step(picked, [r.learning for r in rows]))
        finished: list[tuple[_Running, BaseException | None]] = []
        for r, row in zip(rows, host):
            if r.closing:
                finished.append((r, None))
                continue
            assert r.text is not None
            n = r.job.params.top_logprobs  # the row's first n of the k alternatives read
            top = [(int(t), lp) for t, lp in zip(row[2:2 + n], row[2 + k:2 + k + n], strict=True)]
            event = r.text.push(int(row[0]), row[1], top)
            try:
                r.emit(event)
            except BaseException as e:  # the consumer is gone: stop this job, keep the others
                finished.append((r, e))
                continue
            if r.text.finished:
                close = r.job.close_turn
                if close is not None and not (r.text.ids and r.text.ids[-1] in r.text.stop_ids):
                    r.closing = True  # one more step, then it leaves
                else:
                    finished.append((r, None))
        self._finish(finished)
        return len(rows)

    def _attach(self, commits) -> None:
        """Each commit's updates go to the job of each row it committed."""
        for row_ids, metrics in commits:
            if metrics is None:
                continue
            for i, row in enumerate(row_ids):
                owner = self.batch.owners[row]
                # a chunk that holds the close token (a row whose reply filled its chunk may
                # wait to commit until after it was marked closing: that chunk is the reply's)
                if owner.close_absorbed:
                    owner.close_updates += _records(metrics, i)
                else:
                    owner.decode_updates += _records(metrics, i)

    def _finish(self, finished: list[tuple[_Running, BaseException | None]]) -> None:
        """Take the finished jobs out of the decode batch, then end them. Their futures are set
        only once every row is out: a future wakes the HTTP side (encoding and storing the
        state), whose Python work would hold the GIL between the leaves' many small copies (16
        leaves took 250-450 ms in the server against 20 ms alone). From the last row back, a
        leave moves no other row into its hole when the batch empties."""
        for r, _ in sorted(finished, key=lambda f: self._decoding.index(f[0]), reverse=True):
            self._leave(r)
        for r, err in finished:
            self._end(r, err)

    def _leave(self, r: _Running) -> None:
        # rows move inside the batch (joins, leaves, commits that wait): look it up
        row = self._decoding.index(r)
        if row >= self.batch.n_decoding:  # it waits to commit: commit first (rows stay put)
            self._attach(self.batch.commit_waiting())
        r.job.session.state = self.batch.leave(row)

    def _end(self, r: _Running, error: BaseException | None = None) -> None:
        if r.future.done():
            return
        if error is not None:
            r.future.set_exception(error)
            return
        # the generation's updates are the prompt's and the reply's, as Engine.generate's are
        gen = r.text.result(r.updates + r.decode_updates) if r.text is not None else None
        r.future.set_result(JobResult(r.prompt_logprobs, gen, r.updates + r.decode_updates + r.close_updates,
                                      r.prompt_top))

    def _fail_all(self, error: BaseException, queued: bool = True) -> None:
        """Fail the jobs in flight, and with `queued` the jobs not admitted yet too."""
        with self._cv:
            jobs = [*(self._waiting if queued else ()), *self._prefill, *self._decoding]
            if queued:
                self._waiting.clear()
            self._prefill.clear()
        self.batch.clear()
        for r in jobs:
            self._end(r, error)
