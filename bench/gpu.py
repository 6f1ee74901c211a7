"""The roofline of HOPE's batched decode step on a GPU: bytes a step must move over the time it
took, as a fraction of the card's measured memory bandwidth.

A decode step at batch B must at least read:
* the slow weights, once for the whole batch, in the dtype they are served in;
* per session, the part of its state the step reads: the attention window's and the open chunk's
  keys and values (every slot is read, masked rather than skipped), the convolution's inputs, the
  main Titans memory of each head (the read uses 1 of the `n_memories` memories), both session
  CMS levels, and the last hidden state and counters;
* with learning on, every `chunk` tokens a commit reads the whole state and writes it back (the
  momentum and the open mid gradient too): 2 x state bytes / chunk per session per step, amortised.

Writes of the step itself (one slot of the open chunk per tensor) and activations are left out: the
figure is a lower bound on the traffic, so the fraction is an upper bound on how close the step is to
the memory roofline. The functions take (engine, batch size, step time) so any caller with a measured
step time can use them; `measure_bandwidth` is the device-to-device copy rate (bytes read + written).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bench.timing import median
from hope_core.engine import Engine
from hope_core.model import HopeConfig, State

# per-layer state tensors a decode step reads in full
_READ_FULL = {"attn_k", "attn_v", "open_k", "open_v", "conv_tail", "open_conv",
              "fast_up", "fast_down", "mid_up", "mid_down"}
_READ_MAIN_MEMORY = {"mem_a", "mem_b"}  # [B, H, N, ...]: the read uses memory 0 of the N
_READ_SESSION = {"last_hidden", "n_committed", "n_open", "open_tokens"}


def decode_read_fraction(name: str, cfg: HopeConfig) -> float:
    """Fraction of state tensor `name` (as in `State.tensors()`) that one decode step reads."""
    key = name.rsplit(".", 1)[-1]
    if key in _READ_FULL or key in _READ_SESSION:
        return 1.0
    if key in _READ_MAIN_MEMORY:
        return 1.0 / cfg.n_memories
    return 0.0  # momentum, the open mid gradient, update counters: only a commit touches them


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class StepBytes:
    batch: int
    weights: int  # slow weights, read once per step
    state_read: int  # per session, read by every decode step
    commit: float  # per session per step with learning on: 2 x state / chunk (0 with learning off)

    @property
    def per_session(self) -> float:
        return self.state_read + self.commit

    @property
    def total(self) -> float:
        return self.weights + self.batch * self.per_session


def weight_bytes(engine: Engine) -> int:
    return sum(_nbytes(p) for p in engine.model.parameters())


def state_bytes(state: State, cfg: HopeConfig) -> tuple[int, int]:
    """(bytes a decode step reads, bytes of the whole state) of one session (a State of batch 1)."""
    read, total = 0.0, 0
    for name, t in state.tensors().items():
        n = _nbytes(t) // max(1, state.batch_size)
        read += n * decode_read_fraction(name, cfg)
        total += n
    return int(read), total


def step_bytes(engine: Engine, batch: int, learn: bool = True, state: State | None = None) -> StepBytes:
    """Bytes one batched decode step of `batch` sessions must move (see the module's docstring).
    `state`: a session's state as the serving path holds it (default: a fresh one of the engine)."""
    state = state if state is not None else engine.new_session().state
    read, total = state_bytes(state, engine.cfg)
    commit = 2 * total / engine.cfg.chunk if learn else 0.0
    return StepBytes(batch, weight_bytes(engine), read, commit)


@dataclass
class Roofline:
    batch: int
    step_s: float
    bytes_per_step: float
    bandwidth: float  # measured, bytes/s

    @property
    def achieved(self) -> float:
        return self.bytes_per_step / self.step_s

    @property
    def fraction(self) -> float:
        return self.achieved / self.bandwidth


def roofline(engine: Engine, batch: int, step_s: float, bandwidth: float, learn: bool = True) -> Roofline:
    return Roofline(batch, step_s, step_bytes(engine, batch, learn).total, bandwidth)


def measure_bandwidth(device: str | torch.device = "cuda", nbytes: int = 2 << 30, reps: int = 10) -> float:
    """Device memory bandwidth in bytes/s: a device-to-device copy of `nbytes`, counting the bytes
    read and written, timed with CUDA events, the median of `reps` after warm-up."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError("measure_bandwidth needs a CUDA device")
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / median(times)


@dataclass
class GpuResults:
    device_name: str
    bandwidth: float  # bytes/s
    weights_bytes: int
    state_read_bytes: int
    commit_bytes: float
    rows: list[Roofline] = field(default_factory=list)


def run(engine: Engine, step_times: dict[int, float], learn: bool = True, log=print, publish=None) -> GpuResults:
    """Roofline rows for measured step times {batch: seconds} (from the engine benchmark)."""
    bw = measure_bandwidth(engine.device)
    one = step_bytes(engine, 1, learn)
    res = GpuResults(torch.cuda.get_device_name(engine.device), bw, one.weights, one.state_read, one.commit)
    if publish:
        publish(res)
    log(f"gpu: {res.device_name}, measured bandwidth {bw / 1e12:.2f} TB/s; weights {one.weights / 2**20:.1f} MiB, "
        f"per session {one.state_read / 2**20:.2f} MiB read + {one.commit / 2**20:.2f} MiB commit per step")
    for b, t in sorted(step_times.items()):
        r = roofline(engine, b, t, bw, learn)
        res.rows.append(r)
        log(f"gpu roofline batch {b:>3}: step {t * 1e3:.3f} ms, {r.bytes_per_step / 2**20:.1f} MiB, "
            f"{r.achieved / 1e9:.1f} GB/s = {r.fraction:.2%} of measured bandwidth")
    return res
