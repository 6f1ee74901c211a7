"""Decode speed through the engine, without HTTP.

* One session, learning on versus off: `hope_core.evaluate.decode_speed` (the same measurement
  `hope eval` reports), alternated over a few repetitions, best of each kept.
* Many sessions at once: N jobs submitted together to the engine's scheduler (continuous
  batching, `hope_core.scheduler`), each a fresh session with the same short prompt, sampling
  `max_tokens` tokens with learning on. Aggregate tokens/s = generated tokens / wall time from the
  first submit to the last result (prefill included, as `vllm bench` counts output throughput).
  Decode step times come from the scheduler's `on_step` statistics: the GPU roofline uses them.
* The per-op floor: one session through the scheduler on a model with the checkpoint's layout and
  every width divided by `NARROW` (random weights): the same ops on about 1/26 of the arithmetic
  (the vocabulary is not narrowed), so its decode time is what the eager ops cost before any
  arithmetic.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field, replace

import torch

from bench.baselines import NARROW, narrow_d_model
from bench.timing import sweep_speedup
from hope_core.checkpoint import Checkpoint
from hope_core.engine import Engine
from hope_core.evaluate import decode_speed
from hope_core.model import HopeLM, Learning
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
    learn_on: float  # tokens/s, the best run
    learn_off: float
    tokens: int
    pair_ratios: list[float]  # on / off, runs back to back

    @property
    def ratio(self) -> float:
        """The median over pairs of back-to-back runs: a slow spell of a shared machine (they
        last seconds to minutes here) lands on both runs of a pair."""
        return statistics.median(self.pair_ratios)


@dataclass
class ConcurrencyRow:
    sessions: int
    tokens: int  # generated, all sessions together
    seconds: float
    learn: bool
    step_s: float | None = None  # mean decode step with all `sessions` in the batch and no prefill
    step_tokens: float | None = None  # tokens those steps made, on average (rows waiting to commit make none)

    @property
    def tokens_per_s(self) -> float:
        """End to end: prefill, admission and the stragglers included."""
        return self.tokens / self.seconds

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Decode alone: the tokens the decode steps made over their time (chunk commits
        included, prefill not), the figure to compare with a decode loop that starts its clock
        after the prompt."""
        return (self.step_tokens or self.sessions) / self.step_s if self.step_s else None


@dataclass
class EngineResults:
    device: str
    single: SingleSession | None = None
    concurrency: list[ConcurrencyRow] = field(default_factory=list)  # the best run of each level
    sweeps: list[list[ConcurrencyRow]] = field(default_factory=list)  # every run, one list per sweep
    note: str = ""  # why the concurrency rows are missing, when they are
    # sessions out of phase, with and without waiting to commit together: commit_wait -> row
    scattered: dict[int, ConcurrencyRow] = field(default_factory=dict)
    scattered_ratios: list[float] = field(default_factory=list)  # waiting / at once, back to back
    # one session through the scheduler, learning on and off, in alternated runs
    learning_one: ConcurrencyRow | None = None
    frozen_one: ConcurrencyRow | None = None
    scheduler_pairs: list[float] = field(default_factory=list)  # on / off decode, back to back
    narrow_one: ConcurrencyRow | None = None  # one session, learning on, widths / NARROW (the per-op floor)
    reps: int = 1  # runs of each measurement

    @property
    def scheduler_ratio(self) -> float | None:
        """Learning on over off, one session through the scheduler (decode steps): the median
        over pairs of back-to-back runs."""
        return statistics.median(self.scheduler_pairs) if self.scheduler_pairs else None

    def at(self, sessions: int) -> ConcurrencyRow | None:
        return next((r for r in self.concurrency if r.sessions == sessions), None)

    def speedup(self, sessions: int) -> float | None:
        """Tokens/s end to end at `sessions` over one session (`bench.timing.sweep_speedup`)."""
        return sweep_speedup(self.sweeps, lambda r: r.sessions, sessions)


def prompt_tokens(engine: Engine, n: int) -> list[int]:
    ids = engine.tokenizer.encode(PROMPT_TEXT)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def single_session(engine: Engine, n_tokens: int, reps: int = 1, log=print) -> SingleSession:
    """`reps` pairs of back-to-back runs, learning on then off: the best run of each way, and the
    median of the pairs' ratios."""
    on, off = [], []
    for _ in range(reps):
        on.append(decode_speed(engine, Learning(), n_tokens))
        off.append(decode_speed(engine, Learning.off(), n_tokens))
    res = SingleSession(max(on), max(off), n_tokens, [a / b for a, b in zip(on, off)])
    log(f"engine single session: learning on {res.learn_on:.1f} tok/s, off {res.learn_off:.1f} tok/s, "
        f"ratio {res.ratio:.2f} (median of {reps} pairs)")
    return res


def concurrency(engine: Engine, levels: list[int], n_tokens: int, n_prompt: int = 16, learn: bool = True,
                log=print, threads: int | None = None, reps: int = 1, scattered: bool = False,
                commit_wait: int | None = None, sweeps: list[list[ConcurrencyRow]] | None = None
                ) -> list[ConcurrencyRow]:
    """Aggregate tokens/s at each number of concurrent sessions, through the scheduler: `reps`
    sweeps over the levels (each sweep appended to `sweeps` as it ends, so an interrupted run
    keeps them); returns the best run of each level, the least disturbed on a shared machine.
    `scattered`: session i's prompt is i tokens longer (modulo a chunk), so the sessions'
    chunks close at different steps, as they do for requests that arrive at different times."""
    from hope_core.scheduler import Job, Scheduler

    steps: list = []
    sched = Scheduler(engine, max_batch=max(levels), on_step=steps.append, threads=threads,
                      commit_wait=commit_wait)
    sched.start()
    prompt = prompt_tokens(engine, n_prompt + engine.cfg.chunk)

    def run_level(n: int, max_tokens: int, seed0: int) -> ConcurrencyRow:
        extra = [i % engine.cfg.chunk if scattered else 0 for i in range(n)]
        jobs = [Job(session=engine.new_session(), prompt=prompt[:n_prompt + extra[i]],
                    params=SamplingParams(max_tokens=max_tokens, seed=seed0 + i), learn=learn) for i in range(n)]
        steps.clear()
        t0 = time.perf_counter()
        futures = [sched.submit(j) for j in jobs]
        results = [f.result() for f in futures]
        dt = time.perf_counter() - t0
        tokens = sum(len(r.generation.token_ids) for r in results if r.generation is not None)
        # the mean, not the median: the steps that commit a chunk (and learn) are part of the cost
        full = [s for s in steps if s.batch_size == n and s.prefill_tokens == 0]
        return ConcurrencyRow(n, tokens, dt, learn, sum(s.seconds for s in full) / len(full) if full else None,
                              sum(s.decoded for s in full) / len(full) if full else None)

    sweeps = [] if sweeps is None else sweeps
    try:
        # warm-up: a full chunk so that the learning commit path runs once before any clock; on
        # CUDA at every level, since each new batch size captures its CUDA graphs on first use
        run_level(min(4, max(levels)), engine.cfg.chunk + 2, 10_000)
        if engine.device.type == "cuda":
            for n in levels:
                run_level(n, engine.cfg.chunk + 2, 20_000)
        for _ in range(reps):
            sweeps.append([run_level(n, n_tokens, 0) for n in levels])
    finally:
        sched.stop()
    best = [max((sweep[i] for sweep in sweeps[-reps:]), key=lambda r: r.tokens_per_s)
            for i in range(len(levels))]
    for row in best:
        step = f", decode step {row.step_s * 1e3:.2f} ms" if row.step_s else ""
        log(f"engine {row.sessions:>3} sessions: {row.tokens_per_s:9.1f} tok/s aggregate "
            f"({row.tokens} tokens in {row.seconds:.2f} s{step}), best of {reps}")
    return best


def run(engine: Engine, levels: list[int], single_tokens: int, concurrent_tokens: int, reps: int = 1,
        log=print, threads: int | None = None, publish=None) -> EngineResults:
    """`publish(results)` is called first with the (still empty) results, which then fill in place."""
    res = EngineResults(str(engine.device), reps=reps)
    if publish:
        publish(res)
    # on this thread, at the one torch thread the caller keeps it at: a second multi-threaded
    # OpenMP team in the process (this thread's, beside the scheduler's) stays and slows every
    # scheduler step after it by a third (measured: 16 sessions 580 against 860 tokens/s)
    res.single = single_session(engine, single_tokens, reps, log)
    if not scheduler_available():
        res.note = "hope_core.scheduler is not available"
        log(f"engine concurrency: skipped ({res.note})")
        return res
    res.concurrency[:] = concurrency(engine, levels, concurrent_tokens, log=log, threads=threads, reps=reps,
                                     sweeps=res.sweeps)
    for n in levels[1:]:
        log(f"engine {n:>3} sessions over one: {res.speedup(n):.2f}x (median of {reps} sweeps)")
    # learning on then off, back to back: a slow spell of a shared machine lands on both
    on, off = [], []
    for _ in range(reps):
        on.append(concurrency(engine, [1], concurrent_tokens, learn=True, log=lambda *_: None, threads=threads)[0])
        off.append(concurrency(engine, [1], concurrent_tokens, learn=False, log=lambda *_: None, threads=threads)[0])
    res.learning_one = max(on, key=lambda r: r.decode_tokens_per_s or 0)
    res.frozen_one = max(off, key=lambda r: r.decode_tokens_per_s or 0)
    res.scheduler_pairs = [a.decode_tokens_per_s / b.decode_tokens_per_s for a, b in zip(on, off)
                           if a.decode_tokens_per_s and b.decode_tokens_per_s]
    log(f"engine one session through the scheduler, learning on / off: {res.scheduler_ratio:.2f} "
        f"(median of {reps} pairs)")
    out_of_phase(engine, min(16, max(levels)), concurrent_tokens, reps, res, log, threads)
    narrow = narrow_engine(engine)
    res.narrow_one = max(concurrency(narrow, [1], concurrent_tokens, log=lambda *_: None, threads=threads,
                                     reps=reps), key=lambda r: r.decode_tokens_per_s or 0)
    if res.narrow_one.step_s:
        log(f"engine one session, widths / {NARROW} (per-op floor): decode step "
            f"{res.narrow_one.step_s * 1e3:.2f} ms ({res.narrow_one.decode_tokens_per_s:.1f} tok/s)")
    return res


def narrow_engine(engine: Engine, factor: int = NARROW) -> Engine:
    """An engine on a model with `engine`'s layers, heads, chunk, window and vocabulary, every
    width divided by `factor`, and random weights (speed does not depend on what they say)."""
    cfg = engine.cfg
    hidden = ("mem_hidden", "slow_hidden", "mid_hidden", "fast_hidden")
    narrow = replace(cfg, d_model=narrow_d_model(cfg.d_model, cfg.n_heads, factor),
                     **{k: max(1, getattr(cfg, k) // factor) for k in hidden})
    with torch.random.fork_rng(devices=[]):  # the same weights every run; the caller's generator untouched
        torch.manual_seed(0)
        model = HopeLM(narrow)
    ckpt = engine.checkpoint
    return Engine(Checkpoint(model, ckpt.tokenizer, f"narrow/{factor}", ckpt.path), device=engine.device)


def out_of_phase(engine: Engine, n: int, n_tokens: int, reps: int, res: EngineResults, log=print,
                 threads: int | None = None) -> None:
    """n sessions whose chunks close at different steps, committing each at once (commit_wait
    0) against waiting to commit together (the scheduler's default), back to back."""
    from hope_core.scheduler import COMMIT_WAIT

    for _ in range(reps):
        pair = {}
        for wait in (0, COMMIT_WAIT):
            row = concurrency(engine, [n], n_tokens, log=lambda *_: None, threads=threads,
                              scattered=True, commit_wait=wait)[0]
            pair[wait] = row
            if wait not in res.scattered or row.tokens_per_s > res.scattered[wait].tokens_per_s:
                res.scattered[wait] = row
        res.scattered_ratios.append(pair[COMMIT_WAIT].tokens_per_s / pair[0].tokens_per_s)
    for wait, row in sorted(res.scattered.items()):
        log(f"engine {n:>3} sessions out of phase, commit_wait {wait}: {row.tokens_per_s:9.1f} tok/s aggregate")
