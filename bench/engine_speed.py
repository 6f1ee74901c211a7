"""Decode speed through the engine, without HTTP.

* One session, learning on versus off: `hope_core.evaluate.decode_speed` (the same measurement
  `hope eval` reports), alternated over a few repetitions, best of each kept.
* Many sessions at once: N jobs submitted together to the engine's scheduler (continuous
  batching, `hope_core.scheduler`), each a fresh session with the same short prompt, sampling
  `max_tokens` tokens with learning on. Aggregate tokens/s = generated tokens / wall time from the
  first submit to the last result (prefill included, as `vllm bench` counts output throughput).
  Decode step times come from the scheduler's `on_step` statistics: the GPU roofline uses them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from hope_core.engine import Engine
from hope_core.evaluate import decode_speed
from hope_core.model import Learning
from hope_core.sampling import SamplingParams

PROMPT_TEXT = "The sea was calm that morning, and the old lighthouse keeper wrote in his book about the"


def scheduler_available() -> bool:
    try:
        import hope_core.scheduler  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class SingleSession:
    learn_on: float  # tokens/s
    learn_off: float
    tokens: int

    @property
    def ratio(self) -> float:
        return self.learn_on / self.learn_off


@dataclass
class ConcurrencyRow:
    sessions: int
    tokens: int  # generated, all sessions together
    seconds: float
    learn: bool
    step_s: float | None = None  # mean decode step with all `sessions` in the batch and no prefill

    @property
    def tokens_per_s(self) -> float:
        """End to end: prefill, admission and the stragglers included."""
        return self.tokens / self.seconds

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Decode alone: one token per session per step (chunk commits included, prefill not), the
        figure to compare with a decode loop that starts its clock after the prompt."""
        return self.sessions / self.step_s if self.step_s else None


@dataclass
class EngineResults:
    device: str
    single: SingleSession | None = None
    concurrency: list[ConcurrencyRow] = field(default_factory=list)
    note: str = ""  # why the concurrency rows are missing, when they are
    # sessions out of phase, with and without waiting to commit together: commit_wait -> row
    scattered: dict[int, ConcurrencyRow] = field(default_factory=dict)
    # one session through the scheduler, learning on and off, in alternated runs
    learning_one: ConcurrencyRow | None = None
    frozen_one: ConcurrencyRow | None = None
    reps: int = 1  # runs of each measurement; the best is kept

    @property
    def scheduler_ratio(self) -> float | None:
        """Learning on over off, one session through the scheduler (decode steps)."""
        on, off = self.learning_one, self.frozen_one
        if on and off and on.decode_tokens_per_s and off.decode_tokens_per_s:
            return on.decode_tokens_per_s / off.decode_tokens_per_s
        return None

    def at(self, sessions: int) -> ConcurrencyRow | None:
        return next((r for r in self.concurrency if r.sessions == sessions), None)

    def speedup(self, sessions: int) -> float | None:
        one, many = self.at(1), self.at(sessions)
        return many.tokens_per_s / one.tokens_per_s if one and many else None


def prompt_tokens(engine: Engine, n: int) -> list[int]:
    ids = engine.tokenizer.encode(PROMPT_TEXT)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def single_session(engine: Engine, n_tokens: int, reps: int = 1, log=print) -> SingleSession:
    """Best of `reps` alternated runs each way: on a shared machine the best run is the one the
    least disturbed, and alternating keeps a slow spell from landing on one side only."""
    on, off = 0.0, 0.0
    for _ in range(reps):
        on = max(on, decode_speed(engine, Learning(), n_tokens))
        off = max(off, decode_speed(engine, Learning.off(), n_tokens))
    res = SingleSession(on, off, n_tokens)
    log(f"engine single session: learning on {on:.1f} tok/s, off {off:.1f} tok/s, ratio {res.ratio:.2f}")
    return res


def concurrency(engine: Engine, levels: list[int], n_tokens: int, n_prompt: int = 16, learn: bool = True,
                log=print, rows: list[ConcurrencyRow] | None = None,
                threads: int | None = None, reps: int = 1, scattered: bool = False,
                commit_wait: int | None = None) -> list[ConcurrencyRow]:
    """Aggregate tokens/s at each number of concurrent sessions, through the scheduler. Rows are
    appended to `rows` (when given) as each level finishes, so an interrupted run keeps them.
    With `reps`, each level runs that many times and keeps its best run (the least disturbed on
    a shared machine); the repetitions of a level follow each other, the levels in order.
    `scattered`: session i's prompt is i tokens longer (modulo a chunk), so the sessions'
    chunks close at different steps, as they do for requests that arrive at different times."""
    from hope_core.scheduler import Job, Scheduler

    steps: list = []
    sched = Scheduler(engine, max_batch=max(levels), on_step=steps.append, threads=threads,
                      commit_wait=commit_wait)
    sched.start()
    prompt = prompt_tokens(engine, n_prompt + engine.cfg.chunk)

    def run_level(n: int, max_tokens: int, seed0: int) -> tuple[int, float]:
        extra = [i % engine.cfg.chunk if scattered else 0 for i in range(n)]
        jobs = [Job(session=engine.new_session(), prompt=prompt[:n_prompt + extra[i]],
                    params=SamplingParams(max_tokens=max_tokens, seed=seed0 + i), learn=learn) for i in range(n)]
        t0 = time.perf_counter()
        futures = [sched.submit(j) for j in jobs]
        results = [f.result() for f in futures]
        dt = time.perf_counter() - t0
        return sum(len(r.generation.token_ids) for r in results if r.generation is not None), dt

    rows = [] if rows is None else rows
    try:
        # warm-up: a full chunk so that the learning commit path runs once before any clock; on
        # CUDA at every level, since each new batch size captures its CUDA graphs on first use
        cuda = engine.device.type == "cuda"
        run_level(min(4, max(levels)), engine.cfg.chunk + 2, 10_000)
        for n in levels:
            if cuda:
                run_level(n, engine.cfg.chunk + 2, 20_000)
            best: ConcurrencyRow | None = None
            for _ in range(reps):
                steps.clear()
                tokens, dt = run_level(n, n_tokens, 0)
                # the mean, not the median: the steps that commit a chunk (and learn) are part of the cost
                full = [s.seconds for s in steps if s.batch_size == n and s.prefill_tokens == 0]
                row = ConcurrencyRow(n, tokens, dt, learn, sum(full) / len(full) if full else None)
                if best is None or row.tokens_per_s > best.tokens_per_s:
                    best = row
            row = best
            rows.append(row)
            step = f", decode step {row.step_s * 1e3:.2f} ms" if row.step_s else ""
            log(f"engine {n:>3} sessions: {row.tokens_per_s:9.1f} tok/s aggregate "
                f"({tokens} tokens in {dt:.2f} s{step})")
    finally:
        sched.stop()
    return rows


def run(engine: Engine, levels: list[int], single_tokens: int, concurrent_tokens: int, reps: int = 1,
        log=print, threads: int | None = None, publish=None) -> EngineResults:
    """`publish(results)` is called first with the (still empty) results, which then fill in place."""
    res = EngineResults(str(engine.device), reps=reps)
    if publish:
        publish(res)
    res.single = single_session(engine, single_tokens, reps, log)
    if scheduler_available():
        concurrency(engine, levels, concurrent_tokens, log=log, rows=res.concurrency, threads=threads,
                    reps=reps)
        # on and off alternated, so that a slow spell of a shared machine lands on both sides;
        # a one-session run lasts half a second, so it takes more of them to find a quiet one
        for _ in range(reps + 2):
            for learn in (True, False):
                row = concurrency(engine, [1], concurrent_tokens, learn=learn, log=log, threads=threads)[0]
                best = res.learning_one if learn else res.frozen_one
                if best is None or row.tokens_per_s > best.tokens_per_s:
                    if learn:
                        res.learning_one = row
                    else:
                        res.frozen_one = row
        if engine.device.type == "cpu":  # with CUDA graphs, full chunks always commit at once
            out_of_phase(engine, min(16, max(levels)), concurrent_tokens, reps, res, log, threads)
    else:
        res.note = "hope_core.scheduler is not available"
        log(f"engine concurrency: skipped ({res.note})")
    return res


def out_of_phase(engine: Engine, n: int, n_tokens: int, reps: int, res: EngineResults, log=print,
                 threads: int | None = None) -> None:
    """n sessions whose chunks close at different steps, committing each at once (commit_wait
    0) against waiting to commit together (the scheduler's default); alternated, best of each."""
    from hope_core.scheduler import COMMIT_WAIT

    for _ in range(reps):
        for wait in (0, COMMIT_WAIT):
            row = concurrency(engine, [n], n_tokens, log=lambda *_: None, threads=threads,
                              scattered=True, commit_wait=wait)[0]
            if wait not in res.scattered or row.tokens_per_s > res.scattered[wait].tokens_per_s:
                res.scattered[wait] = row
    for wait, row in sorted(res.scattered.items()):
        log(f"engine {n:>3} sessions out of phase, commit_wait {wait}: {row.tokens_per_s:9.1f} tok/s aggregate")
