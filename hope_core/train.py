"""`hope train`: pre-train the slow weights and the memories' initial values (HOPE.md 2.3).

Every training sequence is a fresh session that learns as it reads, chunk by chunk, exactly as
in serving; the outer loss backpropagates through the Titans writes. One process on CPU or
CUDA (bf16 autocast there), or several GPUs with `torchrun --nproc_per_node N -m hope.cli
train ...` (DDP; each rank samples its own batches).

A run directory holds
    checkpoint/          the servable checkpoint (safetensors weights, config, tokenizer)
    trainer.safetensors  optimizer state, for --resume
    sampler.safetensors  the batch sampler's state, for --resume
    progress.json        step, tokens seen, elapsed time, the last losses
    log.jsonl            one line per logged step: the loss curve
The learning-rate schedule (linear warm-up, cosine decay) follows whichever of `steps` and
`max_minutes` is further along, so a run given a time budget still ends at its lowest rate.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import tomllib
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hope_core import data
from hope_core.checkpoint import check_device, save_checkpoint
from hope_core.model import HopeConfig, HopeLM, check_types
from hope_core.tokenizer import DEFAULT_TOKENIZER_PATH, HopeTokenizer


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    seq_len: int = 512  # longer than the attention window, or the memories carry nothing
    batch_size: int = 16  # per process
    steps: int = 2000
    max_minutes: float = 0.0  # 0: no time budget
    lr: float = 3e-3
    # lr multiplier of the session CMS levels' initial weights (fast/mid up0, down0): their inner
    # steps are stop-gradient, so the outer optimiser moves them without seeing how the inner
    # updates answer; a smaller step keeps the two from chasing each other (docs/training.md)
    session_init_lr_scale: float = 1.0
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    seed: int = 1337
    sources: dict[str, float] = field(default_factory=lambda: {
        "python_docs": 0.3, "shakespeare": 0.25, "fortunes": 0.1, "synthetic": 0.15, "reread": 0.2})
    n_synthetic: int = 3000
    synthetic_distractor_tokens: int = 280
    eval_every: int = 100
    eval_batches: int = 2
    log_every: int = 5
    device: str = "auto"
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    # CUDA, one process: capture the whole training step (forward with the inner updates,
    # backward, clipping, AdamW) as one CUDA graph; the model is small enough that launching
    # its kernels one by one, not computing them, is what costs
    cuda_graph: bool = False
    tokenizer: str = str(DEFAULT_TOKENIZER_PATH)
    cache_dir: str = str(data.DEFAULT_CACHE_DIR)
    # packed token streams written by `hope train --export-tokens DIR`: train where the raw
    # sources are not installed (a GPU machine with no network)
    token_dir: str = ""

    def __post_init__(self) -> None:
        check_types(self, "[train]")
        positive = ("seq_len", "batch_size", "steps", "log_every", "eval_batches")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"[train] {name} must be at least 1, not {getattr(self, name)}")
        for name in ("max_minutes", "eval_every", "warmup_steps", "threads", "n_synthetic"):
            if getattr(self, name) < 0:
                raise ValueError(f"[train] {name} must not be negative, not {getattr(self, name)}")
        for name in ("lr", "grad_clip"):  # grad_clip 0 would zero every gradient, not switch clipping off
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"[train] {name} must be a positive number, not {getattr(self, name)}"
                                 + (" (for no clipping, give a large one)" if name == "grad_clip" else ""))
        for name in ("max_minutes", "weight_decay", "session_init_lr_scale"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"[train] {name} must be a non-negative number, not {getattr(self, name)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"[train] min_lr_ratio must be in [0, 1], not {self.min_lr_ratio}")
        if not self.sources or any(not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0
                                   for w in self.sources.values()):
            raise ValueError("[train] sources must map source names to non-negative weights")
        known = (*data.ALL_SOURCES, "synthetic", "reread")
        unknown = [name for name in self.sources if name not in known]
        if unknown and not self.token_dir:  # packed streams may be of any name
            raise ValueError(f"[train] unknown sources {unknown}; known: {list(known)}")


def load_config(path: str | Path | None) -> tuple[HopeConfig, TrainConfig]:
    raw = tomllib.loads(Path(path).read_text()) if path else {}
    tables = set(raw) - {"model", "train"}
    if tables:
        raise ValueError(f"unknown tables {sorted(tables)}: a config has [model] and [train]")
    tc_known = {f.name for f in fields(TrainConfig)}
    unknown = set(raw.get("train", {})) - tc_known
    if unknown:
        raise ValueError(f"unknown [train] keys: {sorted(unknown)}")
    cfg = HopeConfig.from_dict(raw.get("model", {}))  # checks its fields' types itself
    tc = TrainConfig(**raw.get("train", {}))
    if tc.seq_len % cfg.chunk:
        raise ValueError(f"[train] seq_len {tc.seq_len} is not a multiple of [model] chunk {cfg.chunk}")
    return cfg, tc


def lr_at(tc: TrainConfig, step: int, elapsed_s: float, warmup_s: float = 0.0) -> float:
    """Linear warm-up, then a cosine decay over the steps or the time budget, whichever runs out
    first. `warmup_s`: when the warm-up ended; the time budget's decay counts from there, as the
    steps' does (counting from 0 cut the rate by 8% at the warm-up's last step)."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = (step - tc.warmup_steps) / max(tc.steps - tc.warmup_steps, 1)
    if tc.max_minutes > 0:
        budget = tc.max_minutes * 60
        progress = max(progress, (elapsed_s - warmup_s) / max(budget - warmup_s, 1e-9))
    cos = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * cos)


def build_streams(tc: TrainConfig, tokenizer: HopeTokenizer, split: data.Split,
                  window: int | None = None) -> data.MixtureStream:
    """`window`: the model's attention window, which re-read rows must exceed (RereadStream)."""
    cache = Path(tc.cache_dir)
    streams: dict[str, data.TokenStream | data.RereadStream] = {}
    for source in tc.sources:
        if source == "reread":
            continue
        if tc.token_dir:
            streams[source] = data.TokenStream.load(Path(tc.token_dir) / f"{source}-{split}.npy")
            continue
        if source == "synthetic":
            n = tc.n_synthetic if split == "train" else max(50, tc.n_synthetic // 20)
            docs = data.load_synthetic(split, n, tc.synthetic_distractor_tokens * data.CHARS_PER_TOKEN,
                                       cache_dir=cache)
        else:
            docs = data.load_corpus(split, (source,), cache)
        streams[source] = data.TokenStream.cached(tokenizer, docs, cache, name=f"{source}-{split}")
    if "reread" in tc.sources:
        prose = [st for name, st in streams.items() if name != "synthetic"]
        streams["reread"] = data.RereadStream(prose, window=window)  # type: ignore[arg-type]
        streams["reread"].passage_range(tc.seq_len)  # refused now, not at the run's first re-read row
    # an episode must be read from its start, or its fact is cut off
    return data.MixtureStream(streams, tc.sources, aligned={"synthetic"} & set(tc.sources),
                              bos_id=tokenizer.bos_id)


def session_init(name: str) -> bool:
    """The initial weights of a session CMS level (fast/mid up0, down0)."""
    return name.endswith(("fast.up0", "fast.down0", "mid.up0", "mid.down0"))


def make_optimizer(model: HopeLM, tc: TrainConfig, capturable: bool = False) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors and embeddings do not; the session levels' initial weights
    step at `session_init_lr_scale` of the rate. A capturable optimiser keeps its learning
    rates as device tensors, so a CUDA graph replays the step with the current rate."""
    groups: dict[tuple[bool, bool], list] = {}
    for n, p in model.named_parameters():
        decays = p.dim() >= 2 and "embed" not in n
        groups.setdefault((decays, session_init(n)), []).append(p)
    dev = next(model.parameters()).device
    param_groups = []
    for (decays, init), params in groups.items():
        scale = tc.session_init_lr_scale if init else 1.0
        lr = torch.tensor(tc.lr * scale, device=dev) if capturable else tc.lr * scale
        param_groups.append({"params": params, "weight_decay": tc.weight_decay if decays else 0.0,
                             "lr": lr, "lr_scale": scale})
    return torch.optim.AdamW(param_groups, lr=tc.lr, betas=(0.9, 0.95), fused=dev.type == "cuda",
                             capturable=capturable)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr * group["lr_scale"])
        else:
            group["lr"] = lr * group["lr_scale"]


def export_tokens(tc: TrainConfig, tokenizer: HopeTokenizer, out: Path) -> list[Path]:
    """Write every source's packed tokens of both splits as `{source}-{split}.npy` in `out`."""
    written = []
    for split in ("train", "heldout"):
        mix = build_streams(tc, tokenizer, split)  # type: ignore[arg-type]
        for name, stream in mix.streams.items():
            if isinstance(stream, data.TokenStream):
                path = out / f"{name}-{split}.npy"
                stream.save(path)
                written.append(path)
    return written


def save_trainer_state(path: Path, opt: torch.optim.Optimizer, progress: dict) -> None:
    flat = {}
    for idx, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            flat[f"{idx}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    tmp = path / ".trainer.tmp"
    save_file(flat, str(tmp), metadata={"step": str(progress["step"])})
    os.replace(tmp, path / "trainer.safetensors")
    (path / ".progress.tmp").write_text(json.dumps(progress, indent=2))
    os.replace(path / ".progress.tmp", path / "progress.json")


def load_trainer_state(path: Path, opt: torch.optim.Optimizer) -> dict:
    flat = load_file(str(path / "trainer.safetensors"))
    state: dict[int, dict] = {}
    for name, v in flat.items():
        idx, k = name.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)
    return json.loads((path / "progress.json").read_text())


class Progress:
    """One line per logged step: quiet, greppable, and a loss curve in log.jsonl."""

    def __init__(self, tc: TrainConfig, out: Path, start_step: int, start_elapsed: float) -> None:
        self.tc, self.out = tc, out
        self.t0 = time.time() - start_elapsed
        self.window_t, self.window_tokens = time.time(), 0
        self.start_step = start_step
        self.logged_step = start_step

    @property
    def elapsed(self) -> float:
        return time.time() - self.t0

    def log(self, step: int, loss: float, lr: float, tokens: int, extra: dict | None = None) -> None:
        now = time.time()
        tps = tokens / max(now - self.window_t, 1e-9)
        self.window_t, self.window_tokens = now, 0
        # the window's seconds per step: after a resume or an evaluation it is not log_every steps
        remaining_steps = (self.tc.steps - step) * (tokens / max(tps, 1e-9)) / max(step - self.logged_step, 1)
        eta = remaining_steps
        if self.tc.max_minutes > 0:
            eta = min(eta, self.tc.max_minutes * 60 - self.elapsed)
        rec = {"step": step, "loss": round(loss, 4), "lr": lr, "tokens_per_s": round(tps, 1),
               "elapsed_s": round(self.elapsed, 1), "eta_s": round(max(eta, 0), 1)} | (extra or {})
        self._append(rec)
        self.logged_step = step
        msg = (f"step {step:>5}/{self.tc.steps} | loss {loss:.3f} | lr {lr:.2e} | {tps:,.0f} tok/s"
               f" | {_hms(self.elapsed)} elapsed | ETA {_hms(max(eta, 0))}")
        if extra:
            msg += " | " + " ".join(f"{k} {v:.3f}" for k, v in extra.items())
        print(msg, file=sys.stderr, flush=True)


    def log_end(self, step: int, loss: float, lr: float, tokens: int, heldout: float | None) -> None:
        """The run's last step in the curve, with the final held-out loss: a run stopped by its
        time budget ends between two logged steps, and the final evaluation follows the last."""
        extra = None if heldout is None else {"heldout_loss": heldout}
        if step != self.logged_step:
            self.log(step, loss, lr, tokens, extra)
        elif extra:  # that step's line is written: this adds to it (summarize merges them)
            self._append({"step": step} | extra)

    def _append(self, rec: dict) -> None:
        with open(self.out / "log.jsonl", "a") as fh:
            fh.write(json.dumps(rec) + "\n")


def _hms(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


@torch.no_grad()
def heldout_loss(model: HopeLM, stream: data.MixtureStream, tc: TrainConfig, device: torch.device,
                 autocast) -> float:
    g = torch.Generator().manual_seed(0)  # the same batches every time: a comparable curve
    total, n = 0.0, 0
    for _ in range(tc.eval_batches):
        batch = stream.sample_batch(tc.batch_size, tc.seq_len, g).to(device)
        with autocast():
            nll = model(batch[:, :-1], batch[:, 1:])
        total += float(nll.sum())
        n += nll.numel()
    return total / n


def train(cfg: HopeConfig, tc: TrainConfig, resume: bool = False) -> Path:
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    tc.device = check_device(tc.device)  # before the data loads: a bad one is a one-line error
    rank = 0
    if distributed:
        dist.init_process_group("nccl" if tc.device == "cuda" else "gloo")
        rank = dist.get_rank()
        if tc.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device(tc.device, torch.cuda.current_device()) if tc.device == "cuda" else torch.device(tc.device)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    out = Path(tc.out_dir)
    check_run_dir(out, cfg, resume)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = HopeTokenizer.from_file(tc.tokenizer)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but vocab_size is {cfg.vocab_size}")
    if rank == 0:  # reading and cleaning the sources takes a while on the first run
        print(f"loading training data ({', '.join(n for n, w in tc.sources.items() if w)})",
              file=sys.stderr, flush=True)
    loading = time.perf_counter()
    train_stream = build_streams(tc, tokenizer, "train", window=cfg.window)
    heldout_stream = build_streams(tc, tokenizer, "heldout", window=cfg.window)
    if rank == 0:
        print(f"data loaded in {time.perf_counter() - loading:.0f} s", file=sys.stderr, flush=True)
    if tc.eval_every:  # a held-out stream too short for one sequence: found out now, not at the run's end
        heldout_stream.sample_batch(1, tc.seq_len, torch.Generator().manual_seed(0))

    model = HopeLM(cfg).to(device)
    graphed = tc.cuda_graph and device.type == "cuda" and not distributed
    opt = make_optimizer(model, tc, capturable=graphed)
    step, tokens_seen, elapsed, warmup_s = 0, 0, 0.0, None
    gen = torch.Generator().manual_seed(tc.seed * 1000 + rank)
    best = float("inf")
    if resume:
        model.load_state_dict(load_file(str(out / "checkpoint" / "model.safetensors")))
        prog = load_trainer_state(out, opt)
        step, tokens_seen, elapsed = prog["step"], prog["tokens_seen"], prog["elapsed_s"]
        warmup_s = prog.get("warmup_s", 0.0 if step > tc.warmup_steps else None)
        sampler = out / "sampler.safetensors"
        if rank == 0 and sampler.is_file():  # the batches an uninterrupted run would have drawn
            gen.set_state(load_file(str(sampler))["state"])
        else:  # (other ranks, or a run saved before the sampler was)
            gen.manual_seed(tc.seed * 1000 + rank + step)
        log = out / "log.jsonl"
        if rank == 0 and log.is_file():  # steps logged after the last save are run again: logged once
            rows = [line for line in log.read_text().splitlines() if json.loads(line)["step"] <= step]
            log.write_text("".join(row + "\n" for row in rows))
        best_meta = out / "best" / "config.json"
        if best_meta.is_file():  # the best point so far stays the one to beat
            best = json.loads(best_meta.read_text()).get("training", {}).get("heldout_loss", best)
        if rank == 0:
            print(f"resumed {out} at step {step} ({tokens_seen:,} tokens)", file=sys.stderr)
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if distributed else model

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda",
                              cache_enabled=not graphed)

    n_params = sum(p.numel() for p in model.parameters())
    if rank == 0:
        print(f"training {n_params / 1e6:.2f}M parameters on {device}"
              f"{' x' + str(dist.get_world_size()) if distributed else ''}; "
              f"{tc.batch_size}x{tc.seq_len} tokens per step", file=sys.stderr, flush=True)
    progress = Progress(tc, out, step, elapsed)
    world = dist.get_world_size() if distributed else 1
    last_loss, window_tokens = None, 0

    def save(heldout: float | None = None) -> None:
        nonlocal best
        if rank != 0:
            return
        meta = {"steps": step, "tokens_seen": tokens_seen, "elapsed_s": round(progress.elapsed, 1),
                "train_config": asdict(tc), "params": n_params, "last_loss": last_loss}
        if heldout is not None:
            meta["heldout_loss"] = heldout
        # one save is several files, each replaced atomically and tagged with its step (resume
        # refuses a set that disagrees); a signal waits for the whole set
        with signals_deferred():
            save_checkpoint(out / "checkpoint", model, tokenizer, training=meta)
            save_file({"state": gen.get_state()}, str(out / ".sampler.tmp"), metadata={"step": str(step)})
            os.replace(out / ".sampler.tmp", out / "sampler.safetensors")
            save_trainer_state(out, opt, {"step": step, "tokens_seen": tokens_seen, "elapsed_s": progress.elapsed,
                                          "last_loss": last_loss, "warmup_s": warmup_s})
            if heldout is not None and heldout < best:  # the run may overshoot: keep its best point
                best = heldout
                save_checkpoint(out / "best", model, tokenizer, training=meta)

    batch_buf = torch.zeros(tc.batch_size, tc.seq_len + 1, dtype=torch.long, device=device)

    def train_step() -> torch.Tensor:
        with autocast():
            loss = ddp_model(batch_buf[:, :-1], batch_buf[:, 1:]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        return loss.detach()

    graph: torch.cuda.CUDAGraph | None = None
    graph_loss: torch.Tensor | None = None
    with StopRequest() as stop:  # its handlers leave with the loop, however it ends
        while step < tc.steps and not stop.signum:
            if tc.max_minutes > 0 and progress.elapsed >= tc.max_minutes * 60:
                break
            if warmup_s is None and step >= tc.warmup_steps:
                warmup_s = progress.elapsed
            lr = lr_at(tc, step, progress.elapsed, warmup_s or 0.0)
            set_lr(opt, lr)
            batch_buf.copy_(train_stream.sample_batch(tc.batch_size, tc.seq_len, gen), non_blocking=True)
            model.train()
            if graph is not None:
                graph.replay()
                loss = graph_loss
            else:
                opt.zero_grad(set_to_none=True)
                loss = train_step()
            step += 1
            if graphed and graph is None and step >= 3:
                graph, graph_loss = capture_step(train_step, opt, rank)
            tokens_seen += tc.batch_size * tc.seq_len * world
            window_tokens += tc.batch_size * tc.seq_len * world
            evaluate = bool(tc.eval_every) and step % tc.eval_every == 0  # whatever log_every is
            if step % tc.log_every == 0 or step == tc.steps or evaluate:
                last_loss = float(loss)
                extra = None
                if evaluate:
                    model.eval()
                    extra = {"heldout_loss": heldout_loss(model, heldout_stream, tc, device, autocast)}
                    save(extra["heldout_loss"])
                if rank == 0:
                    progress.log(step, last_loss, lr, window_tokens, extra)
                window_tokens = 0
    if stop.signum:  # between two steps: save where the run is, and say how to go on
        save()
        if distributed:
            dist.destroy_process_group()
        raise Interrupted(stop.signum, step, out)
    final = None
    if tc.eval_every:  # the end of the run competes for "best" too
        model.eval()
        final = heldout_loss(model, heldout_stream, tc, device, autocast)
        if rank == 0:
            print(f"final held-out loss {final:.4f}", file=sys.stderr, flush=True)
    if step > progress.start_step:
        last_loss = float(loss)
        if rank == 0:
            progress.log_end(step, last_loss, lr, window_tokens, final)
    save(final)
    if distributed:
        dist.destroy_process_group()
    if rank == 0:
        print(f"done: {step} steps, {tokens_seen:,} tokens, {_hms(progress.elapsed)}; "
              f"checkpoint in {out / 'checkpoint'}", file=sys.stderr)
    return out / "checkpoint"


def check_run_dir(out: Path, cfg: HopeConfig, resume: bool) -> None:
    """A run directory holds one run: a new run never writes over another, and `--resume`
    continues only a run of the same model whose last save is whole. A run stopped before its
    first save left only its log: a new run starts over in its place."""
    saved = out / "checkpoint" / "config.json"
    never_saved = out.is_dir() and {p.name for p in out.iterdir()} <= {"log.jsonl"}
    if not resume:
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not never_saved:
            raise ValueError(f"{out} is not empty: --resume continues the run in it; or choose another --out")
        if never_saved and (out / "log.jsonl").exists():
            (out / "log.jsonl").unlink()
        return
    if not (out / "progress.json").is_file() or not saved.is_file():
        raise ValueError(f"there is no run to resume in {out}" + (
            ": it stopped before its first save; run again without --resume to start over" if never_saved else ""))
    model, want = json.loads(saved.read_text()).get("model") or {}, cfg.to_dict()
    if model != want:
        changed = sorted(k for k in want if model.get(k) != want[k])
        raise ValueError(f"{out} holds a run of another model (differs in {changed}); resume it with its config")
    steps = saved_steps(out)
    if len(set(steps.values())) > 1:
        at = ", ".join(f"{name} at step {n}" for name, n in steps.items())
        raise ValueError(f"{out}: its last save was cut short ({at}), so it cannot continue as an "
                         f"uninterrupted run would; {out / 'checkpoint'} still loads, and a new run can start "
                         "from scratch")


def saved_steps(out: Path) -> dict[str, int]:
    """The step at which each file of a run's last save was written (files saved before they
    were tagged say nothing)."""
    steps = {"progress.json": json.loads((out / "progress.json").read_text())["step"]}
    training = json.loads((out / "checkpoint" / "config.json").read_text()).get("training") or {}
    if "steps" in training:
        steps["checkpoint"] = training["steps"]
    for name in ("trainer.safetensors", "sampler.safetensors"):
        if (out / name).is_file():
            with safe_open(str(out / name), "pt") as f:
                tag = (f.metadata() or {}).get("step")
            if tag is not None:
                steps[name] = int(tag)
    return steps


@contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive during the block are delivered after it, to the handlers
    of before (a save is made whole, then the run stops)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    old = {sig: signal.signal(sig, lambda signum, frame: arrived.append(signum))
           for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for signum in arrived:
            signal.raise_signal(signum)


# Settings of where a run trains, not of what it computes: a resumed run takes this machine's.
MACHINE_SETTINGS = ("out_dir", "device", "threads", "cuda_graph", "tokenizer", "cache_dir", "token_dir")


def resumed_settings(out: Path, cfg: HopeConfig, tc: TrainConfig, config_given: bool,
                     given: Collection[str] = ()) -> tuple[HopeConfig, TrainConfig]:
    """A resumed run continues with the settings it was started with (saved in its checkpoint),
    so that it takes the steps an uninterrupted run would: without --config, those; with one, its
    [model] and [train] must match them, except where the run trains (MACHINE_SETTINGS). The
    command line's --steps and --max-minutes still lengthen or shorten it."""
    saved = out / "checkpoint" / "config.json"
    if not saved.is_file():
        return cfg, tc  # check_run_dir says there is nothing to resume
    meta = json.loads(saved.read_text())
    kept = (meta.get("training") or {}).get("train_config")
    if not config_given:
        cfg = HopeConfig.from_dict(meta["model"])
        return cfg, TrainConfig(**kept) if kept else tc
    if kept:
        differ = sorted(k for k, v in kept.items()
                        if k not in (*MACHINE_SETTINGS, *given) and asdict(tc).get(k) != v)
        if differ:
            raise ValueError(f"{out} was started with other [train] settings ({', '.join(differ)}): a resumed "
                             "run keeps its own (leave out --config to use them), or start a new run")
    return cfg, tc


class StopRequest:
    """SIGINT or SIGTERM during training asks the loop to stop after the step under way, which
    then saves the run: a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._request)

    def __enter__(self) -> StopRequest:
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    def _request(self, signum: int, frame) -> None:
        if self.signum == signal.SIGINT == signum:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step to save the run "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)


class Interrupted(Exception):
    def __init__(self, signum: int, step: int, out: Path) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; the run is saved in {out}: "
                         f"`hope train --out {out} --resume` continues it")
        self.signum = signum


def capture_step(train_step, opt: torch.optim.Optimizer, rank: int
                 ) -> tuple[torch.cuda.CUDAGraph | None, torch.Tensor | None]:
    """Capture one whole training step (PyTorch's whole-network recipe: gradients set to None
    before capture are allocated inside the graph). After three eager steps have warmed the
    optimiser state (plus one on a side stream). Falls back to eager steps (returns None) if
    capture fails. Either way the weights and optimiser state are left as they were."""
    # The warm-up is a real optimiser step the loop does not count: left in, the first counted
    # step would start from moved weights, and a run would end elsewhere than its eager twin or
    # itself stopped and resumed (which captures at another step). So it is undone, in place:
    # the graph reads and writes these very tensors. The optimiser holds every parameter.
    tensors = [p for group in opt.param_groups for p in group["params"]]
    tensors += [v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    saved = [t.detach().clone() for t in tensors]
    try:
        side = torch.cuda.Stream()  # warm up on a side stream, as capture will run there too
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            opt.zero_grad(set_to_none=True)
            train_step()
        torch.cuda.current_stream().wait_stream(side)
        opt.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss = train_step()
        if rank == 0:
            print("training step captured as a CUDA graph", file=sys.stderr, flush=True)
    except Exception as e:  # e.g. an op that syncs with the host: train eagerly
        print(f"CUDA graph capture failed ({type(e).__name__}: {e}); training eagerly",
              file=sys.stderr, flush=True)
        torch.cuda.synchronize()
        opt.zero_grad(set_to_none=True)
        graph, loss = None, None
    with torch.no_grad():
        for t, before in zip(tensors, saved):
            t.copy_(before)
    return graph, loss


def summarize(run_dir: str | Path, every: int = 50) -> str:
    """The loss curve of a run (its log.jsonl) as a markdown table, for docs/: every `every`
    steps, and the run's last step, with its final held-out loss."""
    by_step: dict[int, dict] = {}
    for line in (Path(run_dir) / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        by_step[rec["step"]] = by_step.get(rec["step"], {}) | rec  # the end's held-out joins its line
    rows = [r for r in by_step.values() if "loss" in r]
    progress = json.loads((Path(run_dir) / "progress.json").read_text())
    lines = ["| step | tokens seen | train loss (mean of 5 logged steps) | held-out loss | tokens/s | elapsed |",
             "|---|---|---|---|---|---|"]
    tokens_per_step = progress["tokens_seen"] / max(progress["step"], 1)
    for i, r in enumerate(rows):
        if r["step"] % every and i != len(rows) - 1:
            continue
        recent = [x["loss"] for x in rows[max(0, i - 4):i + 1]]
        held = f"{r['heldout_loss']:.3f}" if "heldout_loss" in r else ""
        end = " (end)" if r["step"] == progress["step"] else ""
        lines.append(f"| {r['step']}{end} | {r['step'] * tokens_per_step:,.0f} | {sum(recent) / len(recent):.3f} | "
                     f"{held} | {r['tokens_per_s']:,.0f} | {_hms(r['elapsed_s'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="hope train", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="TOML file with [model] and [train] tables")
    p.add_argument("--out", help="run directory (overrides train.out_dir)")
    p.add_argument("--steps", type=int)
    p.add_argument("--max-minutes", type=float)
    p.add_argument("--device")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--summary", metavar="RUN_DIR", help="print a run's loss curve as markdown and exit")
    p.add_argument("--summary-every", type=int, default=50, metavar="N", help="--summary's rows: every N steps")
    p.add_argument("--export-tokens", metavar="DIR", help="write the config's packed token streams to DIR and exit")
    p.add_argument("--token-dir", help="read packed token streams from DIR (overrides train.token_dir)")
    a = p.parse_args(argv)
    if a.summary:
        if a.summary_every < 1:
            raise ValueError(f"--summary-every must be at least 1, not {a.summary_every}")
        print(summarize(a.summary, a.summary_every), end="")
        return
    cfg, tc = load_config(a.config)
    if a.token_dir:
        tc.token_dir = a.token_dir
    if a.export_tokens:
        tokenizer = HopeTokenizer.from_file(tc.tokenizer)
        for path in export_tokens(tc, tokenizer, Path(a.export_tokens)):
            print(f"{path} ({path.stat().st_size:,} bytes)")
        return
    if a.out:
        tc.out_dir = a.out
    if a.steps is not None and a.steps < 1:
        raise ValueError(f"--steps must be at least 1, not {a.steps}")
    given = {name: value for name, value in (("out_dir", a.out), ("steps", a.steps), ("max_minutes", a.max_minutes),
                                              ("device", a.device), ("token_dir", a.token_dir))
             if value is not None and value != ""}
    if a.resume:
        cfg, tc = resumed_settings(Path(tc.out_dir), cfg, tc, a.config is not None, set(given))
    tc = TrainConfig(**(asdict(tc) | given))  # checked again, with the command line's values
    try:
        train(cfg, tc, resume=a.resume)
    except Interrupted as e:
        print(e, file=sys.stderr)
        sys.exit(128 + e.signum)


if __name__ == "__main__":
    main()
