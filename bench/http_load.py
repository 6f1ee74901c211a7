"""A load generator for `hope serve`, in the manner of `vllm bench serve`.

For each concurrency level N: `requests(N)` streaming `/v1/chat/completions` requests arrive as a
Poisson process (exponential inter-arrival times at `request_rate` per second; by default 32N/s,
so the level fills up at once and stays full: at 4N/s a level of one request waited for its
next arrival a quarter of the time, and measured the schedule instead of the server), at most N
in flight (an arrival beyond that waits for a slot, as vLLM's `--max-concurrency`). Every request
has its own session id, so every session learns and commits, and asks for exactly `max_tokens`
tokens (`ignore_eos`).

The levels run `sweeps` times over (three in the full `hope bench`): each level reports its run
with the most tokens/s, and a speedup over one request is the median of the ratios within a sweep,
as the engine part does; this machine's speed wanders by more than the differences measured.

Measured per level:
* output tokens/s: completion tokens (from the usage chunk) over the level's wall time;
* TTFT: request sent -> first chunk with text (the prompt absorbed and one token made);
* ITL: the gaps between successive chunks with text. A token whose text is held back (partial
  UTF-8, a possible stop string) arrives with the next one, so an ITL can span two tokens;
* errors: any status other than 200, an error event in the stream, a stream cut short;
* CPU: the server's and this load generator's CPU time over the level's wall time, in cores (the
  generator shares the machine, as `vllm bench serve` does; the server's only when this process
  started it, read from /proc: an engine process of its own is not counted).

`engine_alone` runs the same requests on the engine's scheduler, all arriving together and with
no HTTP or store (`run` starts it in a fresh process, as the server is): set beside the HTTP
table, it shows what serving costs.

`HopeServer` starts `hope serve` as a subprocess on a free loopback port with the in-memory store
and limits set high enough for the levels, waits for /readyz, and stops it afterwards; with
`--url` an already running server is used instead.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from bench.timing import available_cores, percentile, sweep_speedup

if TYPE_CHECKING:
    from hope_core.engine import Engine

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Tell me a long story about a lighthouse keeper and the sea."


@dataclass
class LoadConfig:
    levels: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    max_tokens: int = 32
    request_rate: float | None = None  # requests/s; None: 32 x the level's concurrency
    requests_per_slot: int = 2  # requests per level = max(min_requests, requests_per_slot x N)
    min_requests: int = 8
    prompt: str = PROMPT
    seed: int = 0
    timeout_s: float = 600.0
    sweeps: int = 1  # runs over all the levels; a level reports its best, a speedup its median

    def n_requests(self, concurrency: int) -> int:
        return max(self.min_requests, self.requests_per_slot * concurrency)

    def rate(self, concurrency: int) -> float:
        return self.request_rate or 32.0 * concurrency


@dataclass
class RequestResult:
    ok: bool
    output_tokens: int = 0
    ttft: float = float("nan")  # seconds
    itls: list[float] = field(default_factory=list)
    latency: float = float("nan")
    error: str = ""


@dataclass
class LevelResult:
    concurrency: int
    request_rate: float
    requests: int
    errors: int
    seconds: float
    output_tokens: int
    ttft_p50: float
    ttft_p99: float
    itl_p50: float
    itl_p99: float
    first_error: str = ""
    server_cpu_s: float | None = None  # CPU time the server process used during the level
    client_cpu_s: float | None = None  # ... and this load generator

    def cores(self, cpu_s: float | None) -> float | None:
        """CPU seconds over the level's wall time: how many cores it kept busy."""
        return cpu_s / self.seconds if cpu_s is not None and self.seconds > 0 else None

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class EngineAloneLevel:
    """A level's requests on the engine's scheduler alone (`engine_alone`): no HTTP, no store."""

    concurrency: int
    requests: int
    output_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class HttpResults:
    url: str
    device: str
    max_tokens: int
    sweeps: list[list[LevelResult]] = field(default_factory=list)  # every run, one list per sweep
    engine_process: str = ""  # "true" when the server ran its scheduler in an engine process
    engine_alone: list[EngineAloneLevel] = field(default_factory=list)  # the same requests, no HTTP

    @property
    def levels(self) -> list[LevelResult]:
        """Each level's run with the most tokens/s (the least disturbed on a shared machine), in
        the order the levels ran."""
        best: dict[int, LevelResult] = {}
        for sweep in self.sweeps:
            for r in sweep:
                if r.concurrency not in best or r.tokens_per_s > best[r.concurrency].tokens_per_s:
                    best[r.concurrency] = r
        return list(best.values())

    def at(self, concurrency: int) -> LevelResult | None:
        return next((r for r in self.levels if r.concurrency == concurrency), None)

    def errors(self, concurrency: int) -> int:
        """Failed requests at `concurrency`, over every sweep."""
        return sum(r.errors for sweep in self.sweeps for r in sweep if r.concurrency == concurrency)

    def speedup(self, concurrency: int) -> float | None:
        """Tokens/s at `concurrency` over one request at a time (`bench.timing.sweep_speedup`)."""
        return sweep_speedup(self.sweeps, lambda r: r.concurrency, concurrency)


# ---- one request -----------------------------------------------------------------------------------

async def one_request(client: httpx.AsyncClient, session_id: str, cfg: LoadConfig, seed: int) -> RequestResult:
    body = {"model": "hope", "messages": [{"role": "user", "content": cfg.prompt}], "stream": True,
            "max_tokens": cfg.max_tokens, "ignore_eos": True, "temperature": 1.0, "seed": seed,
            "session_id": session_id, "stream_options": {"include_usage": True}}
    res = RequestResult(ok=False)
    t0 = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200].decode(errors='replace')}"
                return res
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    res.error = f"stream error: {event['error'].get('message', event['error'])}"
                    return res
                if event.get("usage"):
                    res.output_tokens = event["usage"]["completion_tokens"]
                if any(c.get("delta", {}).get("content") for c in event.get("choices", [])):
                    t = time.perf_counter()
                    if last is None:
                        res.ttft = t - t0
                    else:
                        res.itls.append(t - last)
                    last = t
            if not done:
                res.error = "stream ended without [DONE]"
                return res
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.latency = time.perf_counter() - t0
    res.ok = True
    return res


# ---- one concurrency level -----------------------------------------------------------------------------

def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of process `pid` so far (Linux /proc), or None."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


async def run_level(client: httpx.AsyncClient, concurrency: int, cfg: LoadConfig, tag: str,
                    server_pid: int | None = None) -> LevelResult:
    n, rate = cfg.n_requests(concurrency), cfg.rate(concurrency)
    rng = random.Random(cfg.seed + concurrency)
    arrivals, t = [], 0.0
    for _ in range(n):
        arrivals.append(t)
        t += rng.expovariate(rate)
    slots = asyncio.Semaphore(concurrency)
    server0, client0 = cpu_seconds(server_pid), time.process_time()
    start = time.perf_counter()

    async def request(i: int, at: float) -> RequestResult:
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        async with slots:
            return await one_request(client, f"bench-{tag}-c{concurrency}-{i}", cfg, cfg.seed + i)

    results = await asyncio.gather(*(request(i, at) for i, at in enumerate(arrivals)))
    seconds = time.perf_counter() - start
    client_cpu = time.process_time() - client0
    server1 = cpu_seconds(server_pid)
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft for r in ok]
    itls = [x for r in ok for x in r.itls]
    errors = [r.error for r in results if not r.ok]
    return LevelResult(concurrency, rate, n, len(errors), seconds, sum(r.output_tokens for r in ok),
                       percentile(ttfts, 50), percentile(ttfts, 99), percentile(itls, 50), percentile(itls, 99),
                       errors[0] if errors else "",
                       server1 - server0 if server0 is not None and server1 is not None else None, client_cpu)


async def run_levels(base_url: str, cfg: LoadConfig, log=print, into: list[list[LevelResult]] | None = None,
                     server_pid: int | None = None) -> list[list[LevelResult]]:
    """`cfg.sweeps` runs over the levels; each sweep is appended to `into` as it starts, and its
    levels as they finish, so a run cut short keeps what it measured."""
    limits = httpx.Limits(max_connections=max(cfg.levels) + 8, max_keepalive_connections=max(cfg.levels) + 8)
    async with httpx.AsyncClient(base_url=base_url, timeout=cfg.timeout_s, limits=limits) as client:
        warm = await one_request(client, f"bench-{uuid.uuid4().hex[:8]}-warmup", cfg, cfg.seed)  # pays set-up
        if not warm.ok:
            raise RuntimeError(f"warm-up request failed: {warm.error}")
        out = [] if into is None else into
        for _ in range(cfg.sweeps):
            tag = uuid.uuid4().hex[:8]  # fresh session ids, even against a server that keeps its sessions
            sweep: list[LevelResult] = []
            out.append(sweep)
            for n in cfg.levels:
                r = await run_level(client, n, cfg, tag, server_pid)
                sweep.append(r)
                err = f", {r.errors} errors ({r.first_error})" if r.errors else ""
                log(f"http {n:>3} concurrent: {r.tokens_per_s:9.1f} tok/s, TTFT p50 {r.ttft_p50 * 1e3:.0f} ms "
                    f"p99 {r.ttft_p99 * 1e3:.0f} ms, ITL p50 {r.itl_p50 * 1e3:.1f} ms p99 {r.itl_p99 * 1e3:.1f} ms "
                    f"({r.requests} requests{err})")
        return out


# ---- the same requests on the engine alone ------------------------------------------------------------------

def engine_alone(engine: Engine, cfg: LoadConfig, threads: int | None = None, log=print) -> list[EngineAloneLevel]:
    """Each level's requests on `engine`'s scheduler (a thread of its own, as the server runs it),
    built as the server builds them: the user message in the chat template, `max_tokens` tokens
    with no stop token (`ignore_eos`), learning on, the reply closed with the end-of-message token.
    N jobs start at once and each one that ends is followed at once by the next, up to the
    level's number of requests: the arrivals that batch best, and no HTTP, no state encoding, no
    store. Set beside the HTTP table, it separates what the engine does with this workload from
    what serving it over HTTP with Poisson arrivals costs."""
    # here, not at the top: against a remote server (`--url`) this module needs no model
    from hope_core.sampling import SamplingParams
    from hope_core.scheduler import Job, Scheduler

    tok = engine.tokenizer
    prompt = [*tok.encode_message("user", cfg.prompt), tok.role_ids["assistant"]]

    def job(seed: int) -> Job:
        params = SamplingParams(max_tokens=cfg.max_tokens, temperature=1.0, seed=seed, stop_token_ids=[])
        return Job(engine.new_session(), prompt, params, close_turn=tok.end_id)

    sched = Scheduler(engine, max_batch=max(cfg.levels), threads=threads).start()
    out = []
    try:
        sched.submit(job(cfg.seed)).result()  # warm-up: the prompt's chunk commit and a decode step
        for n in cfg.levels:
            total = cfg.n_requests(n)
            t0 = time.perf_counter()
            running = {sched.submit(job(cfg.seed + i)) for i in range(min(n, total))}
            started, tokens = len(running), 0
            while running:
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for f in done:
                    gen = f.result().generation
                    tokens += len(gen.token_ids) if gen is not None else 0
                    if started < total:
                        running.add(sched.submit(job(cfg.seed + started)))
                        started += 1
            level = EngineAloneLevel(n, total, tokens, time.perf_counter() - t0)
            log(f"http workload on the engine alone, {n:>3} at once: {level.tokens_per_s:9.1f} tok/s "
                f"({total} requests)")
            out.append(level)
    finally:
        sched.stop()
    return out


def engine_alone_process(cfg: LoadConfig, checkpoint: str | None = None, device: str = "cpu",
                         threads: int | None = None, log=print) -> list[EngineAloneLevel]:
    """`engine_alone` in a fresh process (`python -m bench.http_load`), as `hope serve` would
    load the model: its levels come back as JSON on stdout, its log lines on stderr."""
    cmd = [sys.executable, "-m", "bench.http_load", "--engine-alone", json.dumps(asdict(cfg)),
           "--device", device, *(["--checkpoint", str(checkpoint)] if checkpoint else []),
           *(["--threads", str(threads)] if threads else [])]
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    with subprocess.Popen(cmd, cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        # as the HTTP levels' requests time out, so does this run, whatever it is stuck on
        watchdog = threading.Timer(cfg.timeout_s * len(cfg.levels), proc.kill)
        watchdog.start()
        try:
            assert proc.stdout is not None and proc.stderr is not None
            for line in proc.stderr:  # its progress, as it goes (stdout holds one line, at the end)
                log(line.rstrip("\n"))
            out = proc.stdout.read()
        finally:
            watchdog.cancel()
    if proc.returncode != 0:
        raise RuntimeError(f"the engine-alone run exited {proc.returncode}")
    return [EngineAloneLevel(**row) for row in json.loads(out)]


def _engine_alone_main(argv: list[str]) -> None:
    import argparse

    import torch

    from hope_core.checkpoint import load_checkpoint
    from hope_core.engine import Engine

    p = argparse.ArgumentParser(prog="python -m bench.http_load")
    p.add_argument("--engine-alone", required=True, metavar="JSON", help="a LoadConfig as JSON")
    p.add_argument("--device", default="cpu")
    p.add_argument("--checkpoint")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    cfg = LoadConfig(**json.loads(args.engine_alone))
    threads = args.threads or available_cores()
    torch.set_num_threads(1)  # this thread; the scheduler's own thread runs with `threads`, as in the server
    engine = Engine(load_checkpoint(args.checkpoint, device=args.device), device=args.device)
    levels = engine_alone(engine, cfg, threads, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(json.dumps([asdict(level) for level in levels]))


# ---- the server ------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HopeServer:
    """`hope serve` in a subprocess, in-memory store, on a free loopback port."""

    def __init__(self, checkpoint: str | None = None, device: str = "cpu", max_concurrency: int = 64,
                 threads: int | None = None, ready_timeout_s: float = 180.0, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.NamedTemporaryFile(prefix="hope-bench-serve-", suffix=".log", delete=False)
        self.log_path = Path(self._log.name)
        cmd = [sys.executable, "-m", "hope.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--store", "memory://", "--device", device, "--log-level", "warning"]
        if checkpoint:
            cmd += ["--checkpoint", str(checkpoint)]
        environ = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                   "HOPE_STORE": "memory://", "HOPE_PLAYGROUND": "false",
                   # every request of a level runs at once, and none is refused for waiting
                   "HOPE_MAX_CONCURRENT_REQUESTS": str(max_concurrency),
                   "HOPE_MAX_BATCH_SIZE": str(max_concurrency),  # all of them in one decode batch
                   "HOPE_MAX_WAITING_REQUESTS": str(4 * max_concurrency + 16),
                   **({"OMP_NUM_THREADS": str(threads)} if threads else {}), **(env or {})}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=environ, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_ready(ready_timeout_s)

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hope serve exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"hope serve not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, keep_log: bool = False) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        if not keep_log:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> HopeServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def model_info(base_url: str) -> dict[str, str]:
    """The labels of the server's `hope_model_info` metric (device, engine_process, ...)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "hope_model_info":
                return dict(sample.labels)
    return {}


def run(cfg: LoadConfig, url: str | None = None, checkpoint: str | None = None, device: str = "cpu",
        threads: int | None = None, log=print, publish=None) -> HttpResults:
    """`publish(results)` is called once the server is up; sweeps and their levels are appended as
    they run. Without `url`, the same requests run first on the engine alone (`engine_alone`), in a process
    of its own as the server is: a fresh process for each, so that neither inherits what this one
    ran (on the CPU, another thread's OpenMP team slows a scheduler's steps by up to a third)."""
    if url:
        res = HttpResults(url, "remote", cfg.max_tokens, engine_process=model_info(url).get("engine_process", ""))
        if publish:
            publish(res)
        asyncio.run(run_levels(url.rstrip("/"), cfg, log, into=res.sweeps))
        return res
    alone = engine_alone_process(cfg, checkpoint, device, threads, log)
    server = HopeServer(checkpoint, device, max(cfg.levels), threads)
    errors = True
    try:
        log(f"http: hope serve on {server.base_url} (device {device}, memory store)")
        res = HttpResults(server.base_url, device, cfg.max_tokens,
                          engine_process=model_info(server.base_url).get("engine_process", ""), engine_alone=alone)
        if publish:
            publish(res)
        try:
            asyncio.run(run_levels(server.base_url, cfg, log, into=res.sweeps, server_pid=server.proc.pid))
        except RuntimeError as e:
            raise RuntimeError(f"{e}\nserver log:\n{server.log_tail()}") from None
        errors = any(level.errors for sweep in res.sweeps for level in sweep)
    finally:
        server.stop(keep_log=errors)  # the server's side of failed requests is in its log
        if errors:
            log(f"http: server log kept at {server.log_path}")
    return res


if __name__ == "__main__":
    _engine_alone_main(sys.argv[1:])
