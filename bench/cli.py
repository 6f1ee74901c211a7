"""`hope bench`: decode speed, concurrency, HTTP load, state I/O, frozen baselines, arithmetic, GPU roofline.

    hope bench --quick                                 # about a minute on 2 CPU cores (the tests use it)
    OMP_NUM_THREADS=2 hope bench --write docs/benchmarks.md --json bench.json
    hope bench --device cuda --only engine,baselines,gpu

One line per measurement goes to stderr as it is made; the markdown tables go to stdout at the end
(and to --write). A part that fails is reported and the others still run; the exit status is 1 then.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

PARTS = ("engine", "baselines", "arithmetic", "http", "state_io", "gpu")


@dataclass
class Plan:
    """How much of everything to run: `--quick` is sized for about a minute on 2 CPU cores."""

    levels: list[int]  # concurrent sessions (engine and HTTP)
    http_levels: list[int]
    single_tokens: int  # single-session decode
    single_reps: int
    concurrent_tokens: int  # per session in the engine's concurrency runs
    http_tokens: int  # max_tokens of each HTTP request
    http_requests_per_slot: int
    http_min_requests: int
    http_sweeps: int
    baseline_tokens: int
    baseline_reps: int
    state_d_models: list[int]
    state_reps: int

    @classmethod
    def make(cls, device: str, quick: bool) -> Plan:
        cuda = device.startswith("cuda")
        if quick:
            return cls(levels=[1, 4, 16], http_levels=[1, 4], single_tokens=32, single_reps=1,
                       concurrent_tokens=32, http_tokens=16, http_requests_per_slot=1, http_min_requests=4,
                       http_sweeps=1, baseline_tokens=32, baseline_reps=2, state_d_models=[128], state_reps=3)
        levels = [1, 4, 16, 64, 256, 512] if cuda else [1, 4, 16, 64]
        return cls(levels=levels, http_levels=levels, single_tokens=256 if cuda else 200, single_reps=5,
                   concurrent_tokens=128 if cuda else 64, http_tokens=64 if cuda else 32,
                   http_requests_per_slot=2, http_min_requests=8, http_sweeps=3,
                   baseline_tokens=128 if cuda else 64,
                   # one `generate` call on CUDA is all launch overhead (tens of ms a step): one run is enough
                   baseline_reps=1 if cuda else 3, state_d_models=[128, 512, 1024], state_reps=10)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hope bench", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: about a minute on 2 CPU cores")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {','.join(PARTS)}")
    p.add_argument("--write", metavar="FILE", help="write the markdown report here (e.g. docs/benchmarks.md)")
    p.add_argument("--json", metavar="FILE", help="write every number as JSON here")
    p.add_argument("--checkpoint", help="checkpoint directory (default: the bundled one)")
    p.add_argument("--levels", help="concurrency levels for the engine and HTTP parts, e.g. 1,4,16,64")
    p.add_argument("--url", help="benchmark this running server instead of starting `hope serve`")
    p.add_argument("--redis-url", default=None, help="Redis for the state I/O part (default redis://127.0.0.1:6379/15,"
                   " keys under a prefix of their own, deleted afterwards)")
    p.add_argument("--threads", type=int, help="torch threads (default: the cores available)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers `generate` baseline")
    args = p.parse_args(argv)
    unknown = set(args.only.split(",")) - set(PARTS)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}; choose from {','.join(PARTS)}")
    return args


def command_line(argv: list[str]) -> str:
    env = "".join(f"{k}={os.environ[k]} " for k in ("OMP_NUM_THREADS",) if k in os.environ)
    return env + shlex.join(["hope", "bench", *argv])


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Interrupted(BaseException):
    """SIGTERM (a `timeout` around the run): stop, but keep and write what was measured."""


def _on_sigterm(signum, frame) -> None:
    raise Interrupted()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.checkpoint:  # the HTTP part's processes run from the repository's root, not from here
        args.checkpoint = str(Path(args.checkpoint).resolve())
    import torch

    from bench import report
    from bench.timing import limit_threads
    from hope_core.checkpoint import check_device

    device = check_device(args.device)  # before any part runs: a bad one is one line, exit 2
    threads = limit_threads(args.threads)
    parts = [p for p in PARTS if p in args.only.split(",")]
    plan = Plan.make(device, args.quick)
    if args.levels:
        try:
            plan.levels = plan.http_levels = [int(x) for x in args.levels.split(",")]
        except ValueError:
            raise ValueError(f"--levels takes numbers of sessions separated by commas, not {args.levels!r}") from None
        if min(plan.levels) < 1:
            raise ValueError(f"--levels are numbers of sessions, at least 1: {args.levels!r}")

    results = report.BenchResults(report.machine_info(device, command_line(argv)), device, args.quick)
    engine = None

    def get_engine():
        nonlocal engine
        if engine is None:
            from hope_core.checkpoint import load_checkpoint
            from hope_core.engine import Engine

            engine = Engine(load_checkpoint(args.checkpoint, device=device), device=device)
        return engine

    def save() -> str:
        """Write the report as it stands: after every part, so a run cut short keeps its numbers."""
        text = report.markdown(results)
        if args.write:
            Path(args.write).parent.mkdir(parents=True, exist_ok=True)
            Path(args.write).write_text(text)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report.to_json(results), indent=2))
        return text

    def part(name: str, fn) -> None:
        """Run one part; `fn(publish)` hands its results object over as soon as it exists."""
        t0 = time.perf_counter()
        try:
            fn(lambda obj: setattr(results, name, obj))
        except Exception as e:  # one broken part must not hide the others' numbers
            results.failed[name] = f"{type(e).__name__}: {e}"
            log(f"{name} FAILED: {type(e).__name__}: {e}")
        except Interrupted:
            results.failed[name] = "interrupted (SIGTERM): its table holds what was measured before"
            log(f"{name}: interrupted")
            raise
        finally:
            results.seconds[name] = time.perf_counter() - t0
            save()

    if any(p != "http" for p in parts) or (args.checkpoint and not args.url):
        # loaded before the parts, which report their failures and go on: a checkpoint that cannot
        # be loaded is one line and exit 2 (hope.cli), not the same failure in every part
        get_engine()

    main_thread = threading.current_thread() is threading.main_thread()  # signals go to the main thread only
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        if "engine" in parts:
            from bench import engine_speed

            # one thread here, `threads` in the scheduler's thread: a second multi-threaded OpenMP
            # team in the process slows the scheduler's steps (hope_core.scheduler.Scheduler)
            torch.set_num_threads(1)
            part("engine", lambda publish: engine_speed.run(get_engine(), plan.levels, plan.single_tokens,
                                                            plan.concurrent_tokens, plan.single_reps, log,
                                                            threads=threads, publish=publish))
            torch.set_num_threads(threads)
        if "gpu" in parts:
            if device.startswith("cuda"):
                from bench import gpu

                rows = results.engine.concurrency if results.engine else []
                steps = {r.sessions: r.step_s for r in rows if r.step_s}
                part("gpu", lambda publish: gpu.run(get_engine(), steps, log=log, publish=publish))
            else:
                log("gpu: skipped (not a CUDA device)")
        if "baselines" in parts:
            from bench import baselines

            def run_baselines(publish):
                e = get_engine()
                cfg = e.cfg
                batches = sorted({*plan.levels} | {1, *results.target_batches()[1:]})
                return baselines.run(sum(p.numel() for p in e.model.parameters()), batches, 16, plan.baseline_tokens,
                                     device, cfg.vocab_size, cfg.d_model, cfg.n_heads, hf=not args.no_hf,
                                     reps=plan.baseline_reps, log=log, publish=publish)

            part("baselines", run_baselines)
        if "arithmetic" in parts:
            from bench import arithmetic

            part("arithmetic", lambda publish: arithmetic.run(get_engine(), log=log, publish=publish))
        if "state_io" in parts:
            from bench import state_io

            part("state_io", lambda publish: state_io.run(
                get_engine().checkpoint, plan.state_d_models, plan.state_reps,
                redis_url=args.redis_url or state_io.DEFAULT_REDIS_URL, log=log, publish=publish))
        if "http" in parts:
            from bench import http_load

            cfg = http_load.LoadConfig(levels=plan.http_levels, max_tokens=plan.http_tokens,
                                       requests_per_slot=plan.http_requests_per_slot,
                                       min_requests=plan.http_min_requests, sweeps=plan.http_sweeps)
            engine = None  # the server process needs the memory and the cores: drop our model first
            part("http", lambda publish: http_load.run(cfg, args.url, args.checkpoint, device, threads, log,
                                                       publish))
    except Interrupted:
        pass
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        results.machine.load_avg_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        print(save())
        for path in (args.write, args.json):
            if path:
                log(f"wrote {path}")
    if results.failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
