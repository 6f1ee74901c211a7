"""Check the CUDA path against the CPU one, on a machine with a GPU: `python scripts/gpu_check.py`.

* the bundled model in bf16 on CUDA scores text like float32 on the CPU (log-probabilities);
* the scheduler with CUDA graphs (decode steps and commits replayed) produces the same tokens
  and states as the same scheduler run eagerly on CUDA, and as `Engine.generate` alone; also
  with rows waiting to commit together (`commit_wait`), which then sit among a padded step's rows;
* how long the captured decode step and commit take, per batch size.

Prints a JSON summary (also written to the file given as the first argument).
"""

from __future__ import annotations

import json
import sys
import time

import torch

from hope_core.batch import DecodeBatch
from hope_core.engine import Engine
from hope_core.model import Learning
from hope_core.sampling import SamplingParams
from hope_core.scheduler import COMMIT_WAIT, Job, Scheduler


def run_jobs(engine: Engine, prompts: list[list[int]], params: list[SamplingParams], graphs: bool,
             commit_wait: int | None = None):
    sched = Scheduler(engine, max_batch=len(prompts), graphs=graphs, commit_wait=commit_wait)
    sessions = [engine.new_session() for _ in prompts]
    futures = [sched.submit(Job(s, p, sp)) for s, p, sp in zip(sessions, prompts, params)]
    while not all(f.done() for f in futures):
        sched.step()
    return [f.result().generation.token_ids for f in futures], sessions


def max_state_diff(a, b) -> float:
    ta, tb = a.state.tensors(), b.state.tensors()
    return max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta)


def main() -> None:
    cuda = torch.cuda.is_available()  # without one, a smoke run of the same code on the CPU
    out: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if cuda else "cpu"}
    cpu, gpu = Engine(device="cpu"), Engine(device="cuda" if cuda else "cpu")
    text = ("The session keeps learning while it serves: every chunk it reads is written into its "
            "fast and mid memories, and the slow weights stay shared. ") * 6
    tokens = cpu.tokenizer.encode(text)[:256]
    lp_cpu = torch.tensor(cpu.absorb(cpu.new_session(), tokens).logprobs)
    lp_gpu = torch.tensor(gpu.absorb(gpu.new_session(), tokens).logprobs)
    out["absorb_mean_logprob_cpu_fp32"] = float(lp_cpu.mean())
    out["absorb_mean_logprob_cuda_bf16"] = float(lp_gpu.mean())
    out["absorb_max_abs_logprob_diff"] = float((lp_cpu - lp_gpu).abs().max())

    prompts = [gpu.tokenizer.encode(t) for t in ("Hello", "def main():", "To be, or not", "The memory of",
                                                    "Once upon a time", "import torch", "Q: what is", "A")]
    params = [SamplingParams(max_tokens=40 + 3 * i, temperature=0.0) for i in range(len(prompts))]
    eager_ids, eager_sessions = run_jobs(gpu, prompts, params, graphs=False)
    graph_ids, graph_sessions = run_jobs(gpu, prompts, params, graphs=True)
    out["graph_vs_eager_same_tokens"] = sum(a == b for a, b in zip(eager_ids, graph_ids)) / len(prompts)
    out["graph_vs_eager_max_state_diff"] = max(max_state_diff(a, b) for a, b in zip(eager_sessions, graph_sessions))
    alone = []
    for p, sp in zip(prompts, params):
        gen = gpu.generate(gpu.new_session(), p, sp)
        alone.append([e.token_id for e in gen])
    out["graph_vs_alone_same_tokens"] = sum(a == b for a, b in zip(alone, graph_ids)) / len(prompts)
    # the prompts' lengths differ, so chunks fill at different steps and rows wait to commit
    wait_eager_ids, wait_eager = run_jobs(gpu, prompts, params, graphs=False, commit_wait=COMMIT_WAIT)
    wait_graph_ids, wait_graph = run_jobs(gpu, prompts, params, graphs=True, commit_wait=COMMIT_WAIT)
    out["waiting_graph_vs_eager_same_tokens"] = (
        sum(a == b for a, b in zip(wait_eager_ids, wait_graph_ids)) / len(prompts))
    out["waiting_graph_vs_eager_max_state_diff"] = max(max_state_diff(a, b) for a, b in zip(wait_eager, wait_graph))
    out["waiting_graph_vs_alone_same_tokens"] = sum(a == b for a, b in zip(alone, wait_graph_ids)) / len(prompts)

    # the batched step alone, per batch size, with the sessions' chunk phases spread evenly (a
    # sixteenth of the rows commit at each step), learning on
    bases = []
    for i in range(gpu.cfg.chunk):
        s = gpu.new_session()
        gpu.absorb(s, list(range(100, 100 + i)))
        bases.append(s.state)
    timings = {}
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for n in (1, 16, 64, 256, 512) if cuda else (1, 16):
        batch = DecodeBatch(gpu.model, gpu.new_session().state, capacity=n, graphs=cuda, autocast=gpu.autocast)
        for i in range(n):
            batch.join(bases[i % len(bases)])
        toks, learns = [5] * n, [Learning()] * n
        for _ in range(2 * gpu.cfg.chunk):  # warm up: every decode and commit shape is captured
            batch.step(toks, learns)
        sync()
        t = time.perf_counter()
        steps = 64 if cuda else 16
        for _ in range(steps):
            batch.step(toks, learns)
        sync()
        per_step = (time.perf_counter() - t) / steps
        timings[n] = {"ms_per_step_incl_commits": per_step * 1e3, "tokens_per_s": n / per_step}
        print(f"batch {n}: {per_step * 1e3:.2f} ms/step, {n / per_step:,.0f} tokens/s", file=sys.stderr, flush=True)
    out["batch_step_timings"] = timings
    print(json.dumps(out, indent=1))
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
