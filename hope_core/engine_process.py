"""The scheduler in a process of its own: vLLM V1's split of engine core and API server.

`EngineProcess` runs the `Scheduler` in a child process and gives the caller the scheduler's
own interface: `submit(job) -> Future[JobResult]`, `cancel(job)`, `stop()`, with `job.emit`
called for each item as it is made. The server uses it with `HOPE_ENGINE_PROCESS=true`: an
engine that crashes then fails only the jobs in flight and is restarted, while the HTTP side
stays up, and the scheduler's steps never wait for the GIL behind the HTTP side's Python. On 2
CPU cores it is slower than the scheduler in a thread (docs/architecture.md, "The scheduler
beside the HTTP side"), so it is not the default.

What crosses the process boundary:

* sessions' states, through `StateSlots`: one shared memory file with a slot per job in flight
  (the slots' pages are mapped by both processes, so a state is copied once in and once out,
  and nothing is serialised);
* everything else as JSON messages over a socket pair (never pickle): jobs and cancellations
  one way; the other way one message per scheduler step with every item emitted during it, the
  jobs that ended and the step's statistics, so a step costs the child one write.

The child runs its loop on its main thread: it reads what arrived (without waiting while it has
work), runs one step, and sends what the step produced. If it dies, every job in flight fails
with `EngineDied` (a request fails as a whole: nothing is committed) and a new child starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import mmap
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from hope_core.engine import GenerationResult, PromptAbsorbed, TokenEvent, UpdateRecord
from hope_core.model import Learning, State
from hope_core.sampling import Alternatives, SamplingParams
from hope_core.scheduler import Cancelled, Job, JobResult, NotAdmitted, StepStats
from hope_core.state import SessionState

log = logging.getLogger("hope.engine_process")

ALIGN = 64  # bytes: each tensor of a slot starts on a cache line


class EngineDied(RuntimeError):
    """The engine process exited while the job was in flight."""


# ---- shared state slots ---------------------------------------------------------------------

@dataclass(frozen=True)
class Field:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name, e.g. "float32"
    offset: int  # bytes into the slot

    @property
    def nbytes(self) -> int:
        return _dtype(self.dtype).itemsize * math.prod(self.shape)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"not a torch dtype: {name!r}")
    return dtype


def slot_layout(template: State) -> list[Field]:
    """Where each of a one-session state's tensors lies in a slot."""
    fields, offset = [], 0
    for name, t in template.tensors().items():
        f = Field(name, tuple(t.shape), str(t.dtype).removeprefix("torch."), offset)
        fields.append(f)
        offset += -(-f.nbytes // ALIGN) * ALIGN
    return fields


class StateSlots:
    """`n` slots of one session state each, in a file both processes map.

    The file is a memfd where there is one (Linux): its pages exist only once touched and count
    against the process's memory, not against a /dev/shm mount, whose default in a container is
    64 MB. Elsewhere an unlinked temporary file."""

    def __init__(self, fields: list[Field], n: int, fd: int | None = None) -> None:
        self.fields, self.n = fields, n
        self.n_layers = 1 + max(int(f.name.split(".")[1]) for f in fields if f.name.startswith("layers."))
        last = fields[-1]
        self.slot_bytes = -(-(last.offset + last.nbytes) // ALIGN) * ALIGN
        size = self.slot_bytes * n
        if fd is None:
            if hasattr(os, "memfd_create"):
                fd = os.memfd_create("hope-state-slots")
            else:
                tmp = tempfile.TemporaryFile()
                fd = os.dup(tmp.fileno())
                tmp.close()
            os.ftruncate(fd, size)
        self.fd = fd
        self._mmap = mmap.mmap(fd, size)
        self._bytes = torch.frombuffer(self._mmap, dtype=torch.uint8)

    def view(self, slot: int) -> State:
        """Slot `slot` as a state whose tensors are views of the shared pages."""
        base = slot * self.slot_bytes
        out = {}
        for f in self.fields:
            raw = self._bytes[base + f.offset: base + f.offset + f.nbytes]
            out[f.name] = raw.view(_dtype(f.dtype)).view(f.shape)
        return State.from_tensors(out, self.n_layers)

    def write(self, slot: int, state: State) -> None:
        dst = self.view(slot).tensors()
        for name, t in state.tensors().items():
            if t.shape != dst[name].shape:
                raise ValueError(f"{name}: shape {tuple(t.shape)} does not fit the slot's {tuple(dst[name].shape)}")
            dst[name].copy_(t)

    def read(self, slot: int) -> State:
        """A copy of slot `slot` that owns its memory (the slot may be reused at once)."""
        return self.view(slot).map(torch.clone)

    def close(self) -> None:
        del self._bytes
        self._mmap.close()
        os.close(self.fd)


# ---- the wire -------------------------------------------------------------------------------------

def _send(conn: Connection, msg: dict[str, Any]) -> None:
    conn.send_bytes(json.dumps(msg, separators=(",", ":")).encode())


def _recv(conn: Connection) -> dict[str, Any]:
    return json.loads(conn.recv_bytes())  # bytes from our own child or parent; JSON, never pickle


def _learning_to_wire(learn: bool | Learning) -> bool | dict[str, bool]:
    return learn if isinstance(learn, bool) else asdict(learn)


def _learning_from_wire(learn: bool | dict[str, bool]) -> bool | Learning:
    return learn if isinstance(learn, bool) else Learning(**learn)


def _item_to_wire(item: object) -> list[Any]:
    if isinstance(item, TokenEvent):
        return ["token", item.token_id, item.text, item.logprob, item.top]
    if isinstance(item, PromptAbsorbed):
        return ["prompt", item.token_ids, item.logprobs, item.top]
    raise TypeError(f"cannot send {type(item).__name__}")


def _alternatives(rows: list[list[list[Any]]]) -> list[Alternatives]:
    """Alternatives as JSON gave them back: each (id, logprob) pair a list."""
    return [[(int(t), float(lp)) for t, lp in row] for row in rows]


def _item_from_wire(item: list[Any]) -> object:
    if item[0] == "token":
        return TokenEvent(*item[1:4], top=_alternatives([item[4]])[0])
    return PromptAbsorbed(*item[1:3], top=_alternatives(item[3]))


def _result_from_wire(d: dict[str, Any]) -> JobResult:
    gen = d["generation"]
    if gen is not None:
        gen = GenerationResult(**{**gen, "updates": [UpdateRecord(**u) for u in gen["updates"]],
                                  "top_logprobs": _alternatives(gen["top_logprobs"])})
    return JobResult(d["prompt_logprobs"], gen, [UpdateRecord(**u) for u in d["updates"]],
                     _alternatives(d["prompt_top"]))


# ---- the parent's side ----------------------------------------------------------------------------

@dataclass
class _InFlight:
    job: Job
    future: Future
    slot: int
    consumer_gone: bool = False  # its emit raised: nothing more is handed to it


class EngineProcess:
    """A `Scheduler` in a child process, with the scheduler's interface.

    `checkpoint`: the directory the child loads; `template`: the state of a fresh session of
    that checkpoint (`Engine.new_session().state`, shared by every fresh session): it fixes the
    slots' layout, and a job on it is not copied in (the child keeps it in a slot of its own);
    `slots`: the most jobs in flight at once."""

    def __init__(self, checkpoint: str | Path, template: State, device: str = "cpu", *, slots: int,
                 max_batch: int = 64, prefill_tokens: int = 256, threads: int | None = None,
                 commit_wait: int | None = None, vocab_size: int,
                 on_step: Callable[[StepStats], None] | None = None, start_timeout_s: float = 300.0,
                 restart_delays_s: tuple[float, ...] = (1.0, 5.0, 25.0),
                 on_exit: Callable[[int | None], None] | None = None) -> None:
        self.on_step = on_step
        self.on_exit = on_exit  # called with the exit code of a child that died (for metrics)
        self.vocab_size = vocab_size
        self.start_timeout_s = start_timeout_s
        self.restart_delays_s = restart_delays_s  # waits between failed restarts; then it gives up
        self._template = template
        self.slots = StateSlots(slot_layout(template), slots + 1)  # the last one: the template
        self.slots.write(slots, template)
        self._config = {"checkpoint": str(checkpoint), "device": device, "max_batch": max_batch,
                        "prefill_tokens": prefill_tokens, "threads": threads, "commit_wait": commit_wait,
                        "slots": slots, "fields": [asdict(f) for f in self.slots.fields]}
        self._lock = threading.Lock()  # guards the in-flight table, the free slots and the connection
        self._jobs: dict[int, _InFlight] = {}
        self._free = list(range(slots))[::-1]
        self._next_id = 0
        self._stopping = False
        self._stopped = threading.Event()  # set with `_stopping`, for the restarts' back-off
        self._proc: subprocess.Popen | None = None
        # sends go through a queue and a thread of their own: a caller never blocks on a full
        # socket, so the reader can always drain the child, and the child can always finish a step
        self._outbox: queue.SimpleQueue | None = None
        self._reader: threading.Thread | None = None
        self.restarts = 0  # children started after the first one died
        self.failed = False  # the child died and could not be restarted

    # ---- life cycle ---------------------------------------------------------------------------

    def start(self) -> EngineProcess:
        ours, theirs = socket.socketpair()
        cmd = [sys.executable, "-m", "hope_core.engine_process", "--conn-fd", str(theirs.fileno()),
               "--slots-fd", str(self.slots.fd)]
        level = logging.getLevelName(logging.getLogger("hope").getEffectiveLevel())
        env = {**os.environ, "HOPE_ENGINE_LOG_LEVEL": level}  # the child logs as we do
        self._proc = subprocess.Popen(cmd, pass_fds=(theirs.fileno(), self.slots.fd), env=env)
        theirs.close()
        conn = Connection(ours.detach())
        _send(conn, {"op": "init", **self._config})
        deadline = time.monotonic() + self.start_timeout_s
        while not conn.poll(0.5):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                conn.close()
                self._kill()
                raise RuntimeError(f"the engine process did not start (exit code {self._proc.returncode})")
        msg = _recv(conn)
        if msg.get("op") != "ready":
            conn.close()
            self._kill()
            raise RuntimeError(f"the engine process failed to start: {msg.get('error', msg)}")
        outbox: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._write, args=(conn, outbox), name="hope-engine-writer", daemon=True).start()
        with self._lock:
            self._outbox = outbox
            if self._stopping:  # stopped while this child started (a restart)
                outbox.put({"op": "stop"})
        self._reader = threading.Thread(target=self._read, args=(conn,), name="hope-engine-reader", daemon=True)
        self._reader.start()
        log.info("engine process started", extra={"pid": self._proc.pid})
        return self

    def stop(self) -> None:
        """Finish nothing more: jobs in flight fail with RuntimeError."""
        with self._lock:
            self._stopping = True
            self._stopped.set()
            if self._outbox is not None:
                self._outbox.put({"op": "stop"})
        if self._proc is not None:
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._kill()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout=10)
        self._fail_all(RuntimeError("the scheduler stopped"))

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        """Whether a child is up and taking jobs (false while one restarts)."""
        return self._outbox is not None and self._proc is not None and self._proc.poll() is None

    @property
    def busy(self) -> int:
        """Jobs in flight."""
        return len(self._jobs)

    @property
    def queued(self) -> int:
        """Jobs waiting for a row in the child's batch. The child's queue is not seen from here:
        those beyond its `max_batch` wait (it admits from the queue whenever a row is free)."""
        return max(len(self._jobs) - self._config["max_batch"], 0)

    # ---- jobs -------------------------------------------------------------------------------------

    def submit(self, job: Job) -> Future[JobResult]:
        if any(t < 0 or t >= self.vocab_size for t in job.prompt):
            raise ValueError("token id out of the vocabulary")
        future: Future[JobResult] = Future()
        with self._lock:
            if self._stopping:
                raise RuntimeError("the scheduler is stopped")
            if self._outbox is None:
                raise EngineDied("the engine process is restarting")
            if not self._free:
                raise RuntimeError("no free state slot: more jobs in flight than the engine process was sized for")
            jid, slot = self._next_id, self._free.pop()
            self._next_id += 1
            self._jobs[jid] = _InFlight(job, future, slot)
        fresh = job.session.state is self._template
        try:
            if not fresh:
                self.slots.write(slot, job.session.state)
        except BaseException as e:
            self._finish(jid, error=e)
            return future
        # if the child dies before it reads this, the reader fails the job (it is in the table)
        self._post({"op": "submit", "id": jid, "slot": slot, "fresh": fresh, "prompt": list(job.prompt),
                    "params": asdict(job.params), "learn": _learning_to_wire(job.learn),
                    "close_turn": job.close_turn, "prompt_alternatives": job.prompt_alternatives,
                    "admit_within_s": job.admit_within_s,
                    "fingerprint": job.session.fingerprint,
                    "version": job.session.version})
        return future

    def cancel(self, job: Job) -> None:
        """Drop `job` before its next piece of work."""
        if job.cancel is not None:
            job.cancel.set()
        jid = next((i for i, f in list(self._jobs.items()) if f.job is job), None)
        if jid is not None:
            self._post({"op": "cancel", "id": jid})

    def _post(self, msg: dict[str, Any]) -> None:
        with self._lock:
            if self._outbox is not None:
                self._outbox.put(msg)

    @staticmethod
    def _write(conn: Connection, outbox: queue.SimpleQueue) -> None:
        """Sends until the reader posts None; then closes the connection (only this thread
        does, so no send can reach a descriptor number that was closed and reused)."""
        alive = True
        while (msg := outbox.get()) is not None:
            if alive:
                try:
                    _send(conn, msg)
                except OSError:  # the child is gone: the reader fails its jobs
                    alive = False
        conn.close()

    # ---- what comes back (the reader thread) ------------------------------------------------------

    def _read(self, conn: Connection) -> None:
        # it copies states out of the slots: one torch thread, no OpenMP team of its own spinning
        # beside the child's (see hope_core.scheduler)
        torch.set_num_threads(1)
        while True:
            try:
                msg = _recv(conn)
            except (EOFError, OSError):
                break
            for item in msg.get("items", []):
                if item[0] == "emit":
                    self._emit(item[1], _item_from_wire(item[2]))
                else:
                    self._done(item[1], item[2])
            stats = msg.get("stats")
            if stats is not None and self.on_step is not None:
                self.on_step(StepStats(*stats))
        with self._lock:
            stopping = self._stopping
            if self._outbox is not None:
                self._outbox.put(None)  # the writer closes the connection
            self._outbox = None
        code = self._proc.wait() if self._proc is not None else None
        if stopping:
            return
        log.error("engine process exited; restarting it", extra={"exit_code": code, "jobs_failed": len(self._jobs)})
        self._fail_all(EngineDied(f"the engine process exited (code {code})"))
        if self.on_exit is not None:
            self.on_exit(code)
        for delay in (*self.restart_delays_s, None):
            if self._stopping:  # stopped during the back-off: no child to start, nothing to fail
                return
            self.restarts += 1
            try:
                self.start()
                return
            except Exception:
                log.exception("could not restart the engine process")
            # `stop` wakes the back-off, so that a server told to stop does not wait it out
            if delay is None or self._stopped.wait(delay):
                break
        # for good: /healthz fails, so that the orchestrator restarts the whole server
        self.failed = True

    def _emit(self, jid: int, item: object) -> None:
        f = self._jobs.get(jid)
        if f is None or f.job.emit is None or f.consumer_gone:
            return
        try:
            f.job.emit(item)
        except BaseException:  # the consumer is gone: the job stops there, as in the scheduler
            f.consumer_gone = True
            self.cancel(f.job)

    def _done(self, jid: int, out: dict[str, Any]) -> None:
        f = self._jobs.get(jid)
        if f is None:
            return
        if "error" in out:
            kind, message = out["error"]
            error = {"Cancelled": Cancelled, "NotAdmitted": NotAdmitted}.get(kind, RuntimeError)
            self._finish(jid, error=error(message))
            return
        f.job.session.state = self.slots.read(f.slot)
        self._finish(jid, result=_result_from_wire(out["result"]))

    def _finish(self, jid: int, result: JobResult | None = None, error: BaseException | None = None) -> None:
        with self._lock:
            f = self._jobs.pop(jid, None)
            if f is None:
                return
            self._free.append(f.slot)
        if f.future.done():
            return
        if error is not None:
            f.future.set_exception(error)
        else:
            f.future.set_result(result)

    def _fail_all(self, error: BaseException) -> None:
        for jid in list(self._jobs):
            self._finish(jid, error=error)


# ---- the child's side -----------------------------------------------------------------------------

class _Core:
    """The child: a scheduler stepped on the main thread, fed and drained between steps."""

    def __init__(self, conn: Connection, config: dict[str, Any], slots_fd: int) -> None:
        from hope_core.checkpoint import load_checkpoint
        from hope_core.engine import Engine
        from hope_core.scheduler import Scheduler

        self.conn = conn
        if config["threads"]:
            torch.set_num_threads(config["threads"])
        device = torch.device(config["device"])
        self.engine = Engine(load_checkpoint(config["checkpoint"], device=device), device=device)
        fields = [Field(f["name"], tuple(f["shape"]), f["dtype"], f["offset"]) for f in config["fields"]]
        if slot_layout(self.engine.new_session().state) != fields:
            raise RuntimeError("the parent's state layout is not this checkpoint's")
        self.slots = StateSlots(fields, config["slots"] + 1, fd=slots_fd)
        self.fresh = self.slots.view(config["slots"])  # the parent's fresh session, bit for bit
        self.engine.absorb(self.engine.new_session(), [self.engine.tokenizer.bos_id] * self.engine.cfg.chunk)
        self.scheduler = Scheduler(self.engine, max_batch=config["max_batch"],
                                   prefill_tokens=config["prefill_tokens"], commit_wait=config["commit_wait"])
        self.jobs: dict[int, Job] = {}
        self.items: list[list[Any]] = []  # what this step produced, sent after it

    def run(self) -> None:
        trace = log.isEnabledFor(logging.DEBUG)
        while True:
            wait = None if self.scheduler.busy == 0 else 0.0
            t0 = time.perf_counter()
            while self.conn.poll(wait):
                msg = _recv(self.conn)
                if msg["op"] == "stop":
                    return
                self._handle(msg)
                wait = 0.0
            t1 = time.perf_counter()
            stats = self.scheduler.run_step() if self.scheduler.busy else None
            if trace and stats is not None:  # HOPE_LOG_LEVEL=debug: one line per step
                log.debug("step", extra={"batch": stats.batch_size, "prefill_tokens": stats.prefill_tokens,
                                         "step_ms": round(stats.seconds * 1e3, 2), "idle_ms": round((t1 - t0) * 1e3, 2),
                                         "jobs": self.scheduler.busy})
            if self.items or stats is not None:
                out = {"items": self.items,
                       "stats": None if stats is None else [stats.batch_size, stats.prefill_tokens, stats.seconds,
                                                          stats.decoded]}
                self.items = []
                _send(self.conn, out)

    def _handle(self, msg: dict[str, Any]) -> None:
        jid = msg["id"]
        if msg["op"] == "cancel":
            job = self.jobs.get(jid)
            if job is not None and job.cancel is not None:
                job.cancel.set()
            return
        state = self.fresh if msg["fresh"] else self.slots.view(msg["slot"])
        if self.engine.device.type != "cpu":
            state = state.map(lambda t: t.to(self.engine.device))
        job = Job(SessionState(state, msg["fingerprint"], msg["version"]), msg["prompt"],
                  SamplingParams(**msg["params"]), _learning_from_wire(msg["learn"]), msg["close_turn"],
                  emit=lambda item: self.items.append(["emit", jid, _item_to_wire(item)]),
                  cancel=threading.Event(), prompt_alternatives=msg["prompt_alternatives"],
                  admit_within_s=msg["admit_within_s"])
        try:
            future = self.scheduler.submit(job)
        except Exception as e:
            self.items.append(["done", jid, {"error": [type(e).__name__, str(e)]}])
            return
        self.jobs[jid] = job
        future.add_done_callback(lambda f: self._ended(jid, msg["slot"], f))

    def _ended(self, jid: int, slot: int, future: Future) -> None:
        job = self.jobs.pop(jid)
        error = future.exception()
        if error is not None:
            self.items.append(["done", jid, {"error": [type(error).__name__, str(error)]}])
            return
        self.slots.write(slot, job.session.state)
        self.items.append(["done", jid, {"result": asdict(future.result())}])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="The engine process of `hope serve` (started by it, not by hand).")
    p.add_argument("--conn-fd", type=int, required=True)
    p.add_argument("--slots-fd", type=int, required=True)
    args = p.parse_args(argv)
    from hope_core.logs import configure_logging

    configure_logging(os.environ.get("HOPE_ENGINE_LOG_LEVEL", "WARNING"))
    # the parent stops this process; a Ctrl-C meant for `hope serve` (sent to the whole process
    # group) must not kill requests that the server is still finishing. If the parent dies, the
    # socket closes and the loop ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)  # until the config says how many the scheduler takes
    conn = Connection(args.conn_fd)
    config = _recv(conn)
    try:
        core = _Core(conn, config, args.slots_fd)
    except Exception as e:
        log.exception("engine process could not start")
        _send(conn, {"op": "failed", "error": f"{type(e).__name__}: {e}"})
        return
    _send(conn, {"op": "ready"})
    try:
        core.run()
    except (EOFError, OSError):  # the parent is gone
        pass


if __name__ == "__main__":
    main()
