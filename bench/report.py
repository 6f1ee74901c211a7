"""The results of one `hope bench` run as markdown tables (docs/benchmarks.md) and as JSON.

Each part is optional (`--only`): a table whose part did not run is left out, a part that failed
says so. The targets of issue #4 are a pass/fail table computed from the same run.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

import torch

from bench.arithmetic import ArithmeticResults
from bench.baselines import NARROW, BaselineResults
from bench.engine_speed import EngineResults
from bench.gpu import GpuResults
from bench.http_load import HttpResults
from bench.state_io import StateIOResults
from bench.timing import available_cores


@dataclass
class Machine:
    cpu: str
    cores: int
    threads: int  # torch intra-op threads used
    torch: str
    python: str
    gpu: str | None
    date: str
    command: str
    load_avg: float | None = None  # 1-minute load average when the run began: others' work on the machine
    load_avg_end: float | None = None  # ... and when it ended (the run's own load included)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str, command: str) -> Machine:
    gpu = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else None
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return Machine(cpu_model(), available_cores(), torch.get_num_threads(), torch.__version__,
                   platform.python_version(), gpu, time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), command,
                   load)


@dataclass
class BenchResults:
    machine: Machine
    device: str
    quick: bool
    engine: EngineResults | None = None
    baselines: BaselineResults | None = None
    http: HttpResults | None = None
    state_io: StateIOResults | None = None
    gpu: GpuResults | None = None
    arithmetic: ArithmeticResults | None = None
    failed: dict[str, str] = field(default_factory=dict)  # part -> error
    seconds: dict[str, float] = field(default_factory=dict)  # part -> wall time

    def hope_decode(self, batch: int) -> tuple[float | None, str]:
        """HOPE's decode tokens/s with learning on at this batch, and where the figure comes from:
        the scheduler's decode steps (its serving path); the single-session loop at batch 1 without it."""
        e = self.engine
        if e is None:
            return None, ""
        row = e.at(batch)
        if row is not None and row.decode_tokens_per_s:
            return row.decode_tokens_per_s, "scheduler"
        if batch == 1 and e.single is not None:
            return e.single.learn_on, "single session"
        return None, ""

    def target_batches(self) -> tuple[int, int]:
        return (1, 256) if self.device.startswith("cuda") else (1, 16)


# ---- formatting -------------------------------------------------------------------------------------

def _f(x: float | None, digits: int = 1, scale: float = 1.0, suffix: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x * scale:,.{digits}f}{suffix}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows), ""]


def _header(r: BenchResults) -> list[str]:
    m = r.machine
    lines = ["# Benchmarks", "",
             "Made by `hope bench` (package `bench/`); rerun it to replace this file. Tokens/s are aggregate over",
             "all sessions or batch rows; the baselines are frozen GPT-2-style transformers with random weights and",
             "HOPE's parameter count. The run on an H200 is in [benchmarks-gpu.md](benchmarks-gpu.md).", "",
             f"- command: `{m.command}`",
             f"- date: {m.date}",
             f"- CPU: {m.cpu}, {m.cores} cores available, {m.threads} torch threads"
             + (f"; 1-minute load average {m.load_avg:.2f} when the run began" if m.load_avg is not None else "")
             + (f", {m.load_avg_end:.2f} when it ended" if m.load_avg_end is not None else ""),
             f"- torch {m.torch}, Python {m.python}, device `{r.device}`" + (f" ({m.gpu})" if m.gpu else ""),
             f"- mode: {'quick' if r.quick else 'full'}; wall time per part: "
             + ", ".join(f"{k} {v:.0f} s" for k, v in r.seconds.items()), ""]
    for part, err in r.failed.items():
        lines += [f"**{part} failed:** `{err}`", ""]
    return lines


def _engine(e: EngineResults) -> list[str]:
    out = []
    if e.single is not None:
        s = e.single
        out += ["## Single-session decode, learning on versus off", "",
                f"`hope_core.evaluate.decode_speed`: {s.tokens} sampled tokens after a short prompt, one session,"
                " on one torch thread (the benchmark's main thread, kept at one for the scheduler's sake);"
                f" {e.reps} pairs of back-to-back runs, learning on then off: the best run each way, and the"
                " median of the pairs' ratios (a slow spell of this shared machine lands on both runs of a pair)."
                " Through the scheduler: one session as in the next table, decode steps, in the same way.", ""]
        rows = [["on", _f(s.learn_on)], ["off", _f(s.learn_off)], ["on / off", _f(s.ratio, 2)]]
        on, off = e.learning_one, e.frozen_one
        if on and off and e.scheduler_ratio:
            rows += [["on, through the scheduler (decode steps)", _f(on.decode_tokens_per_s)],
                     ["off, through the scheduler (decode steps)", _f(off.decode_tokens_per_s)],
                     ["on / off, through the scheduler", _f(e.scheduler_ratio, 2)]]
        out += _table(["learning", "tokens/s"], rows)
    if e.concurrency:
        one = e.at(1)
        out += ["## Concurrent sessions through the engine's scheduler (no HTTP)", "",
                "N fresh sessions submitted at once, each a 16-token prompt then the same number of sampled tokens,",
                "learning on. End to end: generated tokens over the wall time, prefill included. Decode: the tokens",
                "of the decode steps with all N sessions in the batch over their time (chunk commits included; a",
                "session waiting to commit takes no token). Each row is",
                f"the best of {e.reps} sweeps over the levels; the speedup is the median over the sweeps of the ratio",
                "within a sweep.", ""]
        rows = []
        for row in e.concurrency:
            rows.append([str(row.sessions), str(row.tokens), _f(row.tokens_per_s),
                         _f(e.speedup(row.sessions), 2, suffix="x") if one else "-",
                         _f(row.decode_tokens_per_s), _f(row.step_s, 2, 1e3)])
        out += _table(["sessions", "tokens", "tokens/s end to end", "speedup vs 1", "tokens/s decode",
                       "decode step ms"], rows)
    if e.scattered:
        n = next(iter(e.scattered.values())).sessions
        out += ["### Sessions out of phase", "",
                f"{n} sessions whose prompts differ in length, so that their chunks close at different steps (as",
                "requests arriving at different times do), each committing its chunk at once (`commit_wait` 0) or",
                "waiting, out of the decode step, for others to commit with it (the scheduler's default). End to end,",
                f"best of {e.reps} runs each; the gain is the median over pairs of back-to-back runs.", ""]
        out += _table(["commit_wait", "tokens/s end to end"],
                      [[str(w), _f(r.tokens_per_s)] for w, r in sorted(e.scattered.items())])
        if e.scattered_ratios:
            out += [f"Waiting to commit together: {statistics.median(e.scattered_ratios):.2f}x the tokens/s.", ""]
    if e.note and not e.concurrency:
        out += ["## Concurrent sessions through the engine's scheduler", "", f"Not measured: {e.note}.", ""]
    return out


def _http(h: HttpResults) -> list[str]:
    server = (f"the server at `{h.url}`" if h.device == "remote"
              else f"`hope serve --device {h.device} --store memory://`, started by the benchmark")
    if h.engine_process:
        server += " (its scheduler in " + ("an engine process)" if h.engine_process == "true" else "a thread)")
    out = ["## HTTP serving with Poisson arrivals", "",
           f"Against {server}: streaming chat completions, each request its own session (learning, committed),",
           f"exactly {h.max_tokens} tokens (`ignore_eos`); Poisson arrivals at the request rate shown, at most N in",
           "flight. TTFT: request sent to first text; ITL: gap between text chunks. CPU: the server's and the load",
           "generator's CPU time over the level's wall time, in cores (both on this machine). "
           + (f"Each row is the best of {len(h.sweeps)} sweeps over the levels (errors: all of them); the speedup "
              "is the median over the sweeps of the ratio within a sweep." if len(h.sweeps) > 1 else ""), ""]
    rows = []
    for r in h.levels:
        speedup = h.speedup(r.concurrency)
        rows.append([str(r.concurrency), _f(r.request_rate, 0), str(r.requests), str(h.errors(r.concurrency)),
                     _f(r.tokens_per_s), _f(speedup, 2, suffix="x") if speedup else "-",
                     _f(r.ttft_p50, 0, 1e3), _f(r.ttft_p99, 0, 1e3), _f(r.itl_p50, 1, 1e3), _f(r.itl_p99, 1, 1e3),
                     _f(r.cores(r.server_cpu_s), 2), _f(r.cores(r.client_cpu_s), 2)])
    out += _table(["concurrency", "req/s", "requests", "errors", "tokens/s", "speedup vs 1", "TTFT p50 ms",
                   "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "server CPU", "client CPU"], rows)
    if h.engine_alone:
        out += _engine_alone(h)
    return out


def _engine_alone(h: HttpResults) -> list[str]:
    out = ["### The same requests on the engine alone", "",
           "Each level's requests on the engine's scheduler in a process of its own, with the server's chat",
           "prompt, token count and learning: N start at once and each that ends is followed at once by the",
           "next, so they arrive as they batch best; no HTTP, no state encoding, no store. One sweep.", ""]
    base = next((r for r in h.engine_alone if r.concurrency == 1), None)
    rows = []
    for r in h.engine_alone:
        served = h.at(r.concurrency)
        rows.append([str(r.concurrency), str(r.requests), _f(r.tokens_per_s),
                     _f(r.tokens_per_s / base.tokens_per_s, 2, suffix="x") if base and base.tokens_per_s else "-",
                     _f(served.tokens_per_s / r.tokens_per_s, 2) if served and r.tokens_per_s else "-"])
    out += _table(["concurrency", "requests", "tokens/s", "speedup vs 1", "HTTP / engine alone"], rows)
    return out


def _baselines(r: BenchResults) -> list[str]:
    b = r.baselines
    assert b is not None
    c = b.config
    out = ["## Frozen baselines", "",
           f"GPT-2 shape: {c.n_layers} layers, d_model {c.d_model}, {c.n_heads} heads, MLP {c.mlp_ratio}x, vocabulary "
           f"{c.vocab_size}, {c.n_positions} positions: {b.n_params:,} parameters against HOPE's {b.target_params:,}; "
           f"random weights, {b.dtype} on `{b.device}`. Prompt {b.prompt_tokens} tokens, then {b.new_tokens} new "
           "tokens per row, greedy. The KV loop's clock starts after the prefill; `generate`'s includes it.", "",
           "HOPE: learning on, decode tokens/s at the same batch through the scheduler (the serving path); at batch 1",
           "also `Engine.generate` on one session, as in the first table.", ""]
    batches = sorted({row.batch for row in b.rows})
    rows = []
    for n in batches:
        hope, src = r.hope_decode(n)
        kv, hf = b.speed("kv_loop", n), b.speed("hf_generate", n)
        hf_note = next((row.note for row in b.rows if row.method == "hf_generate" and row.batch == n), "")
        cell = _f(hope) + (f" ({src})" if src == "single session" else "")
        if n == 1 and src == "scheduler" and r.engine and r.engine.single:  # the other batch-1 figure, for reference
            cell += f" (Engine.generate alone: {_f(r.engine.single.learn_on)})"
        rows.append([str(n), cell, _f(kv),
                     _f(hf) if hf is not None else (hf_note or "-"),
                     _f(hope / kv, 2, suffix="x") if hope and kv else "-",
                     _f(hope / hf, 2, suffix="x") if hope and hf else "-"])
    out += _table(["batch", "HOPE learning on", "plain KV loop", "HF generate", "HOPE / KV loop", "HOPE / generate"],
                  rows)
    return out + _floor(r)


def _floor(r: BenchResults) -> list[str]:
    """Batch 1 at full width against the same ops on narrow models (widths / NARROW): how much of
    a token's time the eager ops cost before any arithmetic."""
    e, b = r.engine, r.baselines
    hope_full, src = r.hope_decode(1)
    hope_narrow = e.narrow_one.decode_tokens_per_s if e and e.narrow_one else None
    kv_full = b.speed("kv_loop", 1) if b else None
    kv_narrow = b.speed("kv_loop_narrow", 1) if b else None
    if not (hope_full and hope_narrow and kv_full and kv_narrow and src == "scheduler"):
        return []
    ms = [1e3 / x for x in (hope_full, hope_narrow, kv_full, kv_narrow)]
    out = ["### Batch 1 before any arithmetic", "",
           f"The same models with every width divided by {NARROW} (random weights): the same ops on about 1/26 of "
           "the arithmetic (the vocabulary is not narrowed), so a narrow model's time per token is what its "
           "eager ops cost. HOPE: one session through "
           "the scheduler, learning on (a decode step and a sixteenth of a commit, its re-forward and backward, per "
           "token); the KV loop at batch 1.", ""]
    out += _table(["", "ms per token, full width", f"ms per token, widths / {NARROW}", "narrow / full"],
                  [["HOPE learning on", _f(ms[0], 2), _f(ms[1], 2), _f(ms[1] / ms[0], 2)],
                   ["plain KV loop", _f(ms[2], 2), _f(ms[3], 2), _f(ms[3] / ms[2], 2)]])
    if ms[1] >= ms[2]:
        verdict = (f"HOPE's ops alone ({ms[1]:.2f} ms a token) take longer than the KV loop's whole token "
                   f"({ms[2]:.2f} ms): at batch 1 on this device no saving of arithmetic reaches the KV loop, only "
                   "fewer launched ops per token (kernels fused by a compiler; on the GPU path, CUDA graphs).")
    else:
        verdict = (f"HOPE's ops alone take {ms[1]:.2f} ms of its {ms[0]:.2f} ms a token; the KV loop's whole "
                   f"token takes {ms[2]:.2f} ms.")
    return [*out, verdict, ""]


def _arithmetic(r: BenchResults) -> list[str]:
    a = r.arithmetic
    assert a is not None
    out = ["## Arithmetic per token", "",
           "FLOPs of matrix products and attention, forward and backward (element-wise work not counted), counted",
           "op by op (`bench/arithmetic.py`): HOPE through the scheduler, one session decoding whole chunks after a",
           "16-token prompt; the KV loop over its decode calls after the same prompt. A token's FLOPs do not depend",
           "on the batch.", ""]
    out += _table(["", "MFLOP per token"],
                  [["HOPE learning off (the decode step)", _f(a.hope_off / 1e6, 1)],
                   ["HOPE learning on (the decode step and a sixteenth of a commit: the chunk's re-forward and "
                    "backward)", _f(a.hope_on / 1e6, 1)],
                   ["plain KV loop", _f(a.kv_loop / 1e6, 1)]])
    out += [f"Learning adds {a.learning_share:.1f}x the decode step's arithmetic; HOPE learning on does "
            f"{a.hope_on / a.kv_loop:.1f}x the KV loop's per token.", ""]
    if a.rates:
        out += [f"What this machine's `torch.mm` reaches ({a.dtype} on `{a.device}`, best of repeated runs):", ""]
        out += _table(["product", "GFLOP/s"], [[x.shape, _f(x.flops_per_s / 1e9, 1)] for x in a.rates])
    b = r.baselines
    if b is None or not a.best_rate:
        return out
    rows, verdicts = [], []
    for n in sorted({row.batch for row in b.rows if row.method == "kv_loop"}):
        hope, _ = r.hope_decode(n)
        kv = b.speed("kv_loop", n)
        if not kv:
            continue
        kv_rate, hope_rate = kv * a.kv_loop, hope * a.hope_on if hope else None  # FLOPs/s
        need = kv * a.hope_on  # HOPE's FLOPs/s at the KV loop's tokens/s
        rows.append([str(n), _f(kv), _f(kv_rate / 1e9, 1), _f(hope), _f(hope_rate, 1, 1e-9), _f(need / 1e9, 1),
                     _f(need / a.best_rate, 0, 100, "%")])
        if n in r.target_batches() and hope_rate:
            verdicts.append(f"At batch {n} HOPE computes at {hope_rate / kv_rate:.2f}x the KV loop's rate; at the "
                            f"loop's tokens/s it would need {need / 1e9:,.1f} GFLOP/s, "
                            f"{need / a.best_rate:.0%} of the fastest product measured here.")
    out += ["HOPE's tokens/s as in the baselines table (decode, learning on); GFLOP/s = tokens/s x FLOPs per token.",
            ""]
    out += _table(["batch", "KV loop tokens/s", "KV loop GFLOP/s", "HOPE tokens/s", "HOPE GFLOP/s",
                   "HOPE needs, at the KV loop's tokens/s", "of the fastest product"], rows)
    return [*out, " ".join(verdicts), ""] if verdicts else out


def _state_io(s: StateIOResults) -> list[str]:
    out = ["## Session state load and store", "",
           f"Store: encode (safetensors) + compare-and-set commit. Load: read + decode with validation. Milliseconds, "
           f"median and p99 of {s.reps} repetitions.", ""]
    rows = []
    for row in s.rows:
        rows.append([row.store, row.case, _f(row.nbytes / 2**20, 2), _f(row.load_p50_ms, 2), _f(row.load_p99_ms, 2),
                     _f(row.store_p50_ms, 2), _f(row.store_p99_ms, 2)] + ([row.note] if row.note else []))
    out += _table(["store", "state", "MiB", "load p50", "load p99", "store p50", "store p99"], rows)
    return out


def _gpu(g: GpuResults) -> list[str]:
    out = ["## GPU roofline", "",
           f"{g.device_name}: measured device-to-device copy {g.bandwidth / 1e12:.2f} TB/s (bytes read + written). "
           f"Bytes per decode step = slow weights {g.weights_bytes / 2**20:.1f} MiB once + per session "
           f"{g.state_read_bytes / 2**20:.2f} MiB of state read + {g.commit_bytes / 2**20:.2f} MiB amortised commit "
           "(bench/gpu.py says what is counted): a lower bound on the traffic.", ""]
    rows = [[str(r.batch), _f(r.step_s, 3, 1e3), _f(r.bytes_per_step / 2**20, 1), _f(r.achieved / 1e9, 1),
             _f(r.fraction, 2, 100, "%")] for r in g.rows]
    out += _table(["batch", "step ms", "MiB per step", "GB/s", "of measured bandwidth"], rows)
    return out


def targets(r: BenchResults) -> list[list[str]]:
    """[target, measured, verdict] rows; a target whose inputs were not measured says so."""
    out = []

    def row(name: str, value: float | None, goal: float, fmt: str) -> None:
        if value is None:
            out.append([name, "not measured", "-"])
        else:
            out.append([name, format(value, fmt), "pass" if value >= goal else "FAIL"])

    e = r.engine
    row("learning on >= 0.7 x learning off, one session", e.single.ratio if e and e.single else None, 0.7, ".2f")
    if e and e.scheduler_ratio:
        row("learning on >= 0.7 x learning off, one session through the scheduler", e.scheduler_ratio, 0.7, ".2f")
    n = 16
    row(f"{n} concurrent sessions >= 6 x one (engine, end to end)", e.speedup(n) if e else None, 6.0, ".2f")
    if r.http is not None:
        row(f"{n} concurrent sessions >= 6 x one (HTTP)", r.http.speedup(n), 6.0, ".2f")
    for batch in r.target_batches():
        hope, _ = r.hope_decode(batch)
        kv = r.baselines.speed("kv_loop", batch) if r.baselines else None
        row(f"HOPE learning on >= plain KV loop, batch {batch}", hope / kv if hope and kv else None, 1.0, ".2f")
    return out


def markdown(r: BenchResults) -> str:
    lines = _header(r)
    lines += ["## Targets (issue #4)", ""]
    lines += _table(["target", "measured (ratio)", "verdict"], targets(r))
    if r.engine is not None:
        lines += _engine(r.engine)
    if r.http is not None:
        lines += _http(r.http)
    if r.baselines is not None:
        lines += _baselines(r)
    if r.arithmetic is not None:
        lines += _arithmetic(r)
    if r.state_io is not None:
        lines += _state_io(r.state_io)
    if r.gpu is not None:
        lines += _gpu(r.gpu)
    return "\n".join(lines).rstrip() + "\n"


def plain(x):
    """JSON-ready: dataclasses become dicts (their properties included), NaN becomes null."""
    if is_dataclass(x) and not isinstance(x, type):
        d = {f.name: plain(getattr(x, f.name)) for f in fields(x)}
        for klass in type(x).__mro__:
            for name, attr in vars(klass).items():
                if isinstance(attr, property) and name not in d:
                    d[name] = plain(getattr(x, name))
        return d
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def to_json(r: BenchResults) -> dict:
    out = plain(r)
    out["targets"] = [dict(zip(("target", "measured", "verdict"), t)) for t in targets(r)]
    return out
