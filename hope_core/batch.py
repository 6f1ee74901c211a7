"""`DecodeBatch`: the states of the sessions being decoded, stacked in buffers that stay put.

Continuous batching moves sessions in and out between steps. Re-stacking every session's state
at every step would copy megabytes per session per token, so the batch keeps one buffer per
state tensor with a row per slot: a session joining writes its row once, leaving reads it back
once (the last row moves into the hole, so the active rows are always the prefix `[:n]`), and a
step updates the rows in place: the decode step writes only the open-chunk buffers and counters,
and a commit rewrites only the rows whose chunk closed.

A step computes exactly what `Engine.decode_batch` computes (the batched forward of
`HopeLM.forward_open` on one token per row, then `learn_chunk` on the rows whose chunk closed,
grouped by their learning switches), so session independence and split invariance carry over.

On CUDA the decode step can be captured as a CUDA graph per power-of-two batch size: the rows
past `n` up to the bucket are padding (valid states whose results are thrown away), and the
whole step replays with one launch (rows waiting to commit that fall among the padding keep
their contents: `_hold`). Commits are captured too, per power-of-two number
of committing rows (padded with repeats of a row, which write the same values twice): the host
knows which rows commit (it counts each row's open tokens), so no step waits on the device
except to read the sampled tokens and the commits' metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

from hope_core.model import ChunkMetrics, HopeLM, Learning, State, adjacent_join

log = logging.getLogger("hope.batch")


JOINED = (("attn_k", "open_k"), ("attn_v", "open_v"), ("conv_tail", "open_conv"))
# what a decode step writes of a row (the names end so, per layer where they are layer tensors)
STEP_WRITES = ("n_open", "open_tokens", "last_hidden", "open_k", "open_v", "open_conv")


def _bucket(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class DecodeBatch:
    def __init__(self, model: HopeLM, template: State, capacity: int = 8, graphs: bool = False,
                 autocast: bool = False, pad: bool | None = None, commit_wait: int = 0) -> None:
        """`template` is a batch-of-one state (a fresh session) that fills unused slots. With
        `graphs` (CUDA only) each power-of-two batch size is captured once and replayed; `pad`
        runs those padded shapes without capturing (the default follows `graphs`).

        `commit_wait`: a row whose chunk is full may wait up to this many steps, out of the
        decode step, for other rows to fill theirs, so that they commit together (see
        `step`). 0 commits every full row in the step that fills it."""
        self.model, self.cfg = model, model.cfg
        self.template = template
        self.n = 0  # active rows: the decoding ones, then the waiting ones
        self.n_waiting = 0  # rows with a full chunk waiting to commit: the last rows of the n
        self.open_counts: list[int] = []  # per active row: tokens in its open chunk (host copy)
        self.owners: list[object] = []  # per active row: whatever the caller joined it with
        self.learns: list[Learning] = []  # per active row: its switches, as of its last step
        self.waits: list[float] = []  # per active row: steps it has waited to commit (see `waited`)
        self.graphs = graphs and template.n_open.is_cuda
        self.pad = self.graphs if pad is None else pad
        self.commit_wait = commit_wait
        self.autocast = autocast
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._commit_graphs: dict[tuple[int, Learning], tuple[torch.cuda.CUDAGraph, ChunkMetrics | None]] = {}
        self._alloc(capacity)

    # ---- slots -------------------------------------------------------------------------------

    def _alloc(self, capacity: int) -> None:
        old = getattr(self, "slots", None)
        self.capacity = capacity
        self.slots = self.template.map(lambda v: v.expand(capacity, *v.shape[1:]).clone())
        for layer in self.slots.layers:
            # the open chunk's buffers directly follow the committed history in memory, so a
            # decode step attends over both as one view instead of copying the window every token
            for committed, open_ in JOINED:
                joint = torch.cat([layer[committed], layer[open_]], dim=1)
                layer[committed], layer[open_] = joint.split(
                    [layer[committed].shape[1], layer[open_].shape[1]], dim=1)
        if old is not None:
            for name, buf in self.slots.tensors().items():
                buf[:self.n].copy_(old.tensors()[name][:self.n])
        dev = self.template.n_open.device
        self.tokens = torch.zeros(capacity, 1, dtype=torch.long, device=dev)
        self.commit_rows = torch.zeros(capacity, dtype=torch.long, device=dev)
        self._graphs.clear()  # they point at the old buffers
        self._commit_graphs.clear()

    def view(self, n: int | None = None) -> State:
        """The first n rows (default: the active ones), as views of the slot buffers."""
        n = self.n if n is None else n
        return self.slots.map(lambda v: v[:n])

    @property
    def n_decoding(self) -> int:
        """Rows that take a token this step: the first `n - n_waiting`."""
        return self.n - self.n_waiting

    def join(self, state: State, owner: object = None) -> int:
        """Copy a batch-of-one state into a decoding row; returns the row (see `join_many`)."""
        return self.join_many(state, [owner])

    def join_many(self, state: State, owners: Sequence[object]) -> int:
        """Copy the k rows of `state` into k decoding rows, with one copy per buffer: after the
        decoding rows, before the waiting ones (the waiting rows in the way move to the end).
        `owners` has one entry per row. Returns the first row."""
        k = state.batch_size
        if len(owners) != k:
            raise ValueError(f"{k} rows joining with {len(owners)} owners")
        src = state.tensors()
        for name, buf in self.slots.tensors().items():  # before anything moves: a join fails whole
            if name not in src or src[name].shape[1:] != buf.shape[1:]:
                raise ValueError(f"a joining state does not fit the batch: {name}")
        capacity = self.capacity
        while self.n + k > capacity:
            capacity *= 2
        if capacity != self.capacity:
            self._alloc(capacity)
        row = self.n_decoding
        for host in (self.open_counts, self.owners, self.learns, self.waits):
            host.extend([None] * k)  # type: ignore[list-item]  # filled below
        past = max(self.n, row + k)
        for j in range(min(self.n_waiting, k)):
            self._move(row + j, past + j)
        for name, buf in self.slots.tensors().items():
            buf[row:row + k].copy_(src[name])
        for j, (count, owner) in enumerate(zip(state.n_open.tolist(), owners)):
            self._put(row + j, count, owner, Learning(), 0)
        self.n += k
        return row

    def leave(self, row: int) -> State:
        """Take a decoding row out (a copy of its state, batch of one). The last decoding row
        moves into its place, and the last waiting row into the last decoding one's: `owners`
        says who is where."""
        if row >= self.n_decoding:
            raise ValueError("a waiting row leaves only after its commit (commit_waiting)")
        out = self.slots.map(lambda v: v[row:row + 1].clone())
        last_decoding, last = self.n_decoding - 1, self.n - 1
        if row != last_decoding:
            self._move(last_decoding, row)
        if last != last_decoding:
            self._move(last, last_decoding)
        for host in (self.open_counts, self.owners, self.learns, self.waits):
            host.pop()
        self.n -= 1
        return out

    def clear(self) -> None:
        """Drop every row (their contents stay as padding)."""
        self.n = self.n_waiting = 0
        self.open_counts, self.owners, self.learns, self.waits = [], [], [], []

    def _put(self, row: int, count: int, owner: object, learn: Learning, wait: int) -> None:
        self.open_counts[row], self.owners[row], self.learns[row], self.waits[row] = count, owner, learn, wait

    def _move(self, src: int, dst: int) -> None:
        """Copy row src over row dst (dst may be the first free row)."""
        for buf in self.slots.tensors().values():
            buf[dst].copy_(buf[src])
        self._put(dst, self.open_counts[src], self.owners[src], self.learns[src], self.waits[src])

    def _permute(self, order: list[int]) -> None:
        """Row r takes what row order[r] held, for every r (a permutation of the active rows):
        one gather and one scatter per buffer for all the rows that move, however many."""
        moved = [r for r, src in enumerate(order) if r != src]
        if not moved:
            return
        dev = self.template.n_open.device
        dst = torch.tensor(moved, device=dev)
        src = torch.tensor([order[r] for r in moved], device=dev)
        for buf in self.slots.tensors().values():
            buf.index_copy_(0, dst, buf.index_select(0, src))
        for host in (self.open_counts, self.owners, self.learns, self.waits):
            host[:] = [host[order[r]] for r in range(len(order))]

    def row_state(self, row: int) -> State:
        return self.slots.map(lambda v: v[row:row + 1].clone())

    # ---- the step ------------------------------------------------------------------------------

    def step(self, tokens: Sequence[int] | Tensor, learning: Sequence[Learning]):
        """Absorb one token per decoding row (a list, or a tensor on any device), each row
        learning as its switches in `learning` say; commit the rows whose chunk closes. Returns
        each commit's (rows, ChunkMetrics or None if only rolled).

        With `commit_wait`, a row whose chunk fills moves behind the decoding rows and waits
        there while another row will fill its chunk within `commit_wait` steps of the longest
        waiting one's fill; then they commit together. Each commit costs a re-forward whose
        fixed part (thousands of small ops on the CPU) does not grow with its rows, and rows
        that committed together stay in phase afterwards: sessions that arrived at different
        times fall into step once, and from then on commit as one."""
        n = self.n_decoding
        if not isinstance(tokens, Tensor):
            tokens = torch.tensor(list(tokens), dtype=torch.long)
        self.tokens[:n, 0] = tokens.to(self.tokens.device, non_blocking=True)
        with torch.no_grad(), self._autocast():
            self._forward(n)
        full = [i for i in range(n) if self.open_counts[i] + 1 == self.cfg.chunk]
        for i in range(n):
            self.open_counts[i] = (self.open_counts[i] + 1) % self.cfg.chunk
            self.learns[i] = learning[i]
        if not self.commit_wait:
            return self._commit_groups(full)
        for i in range(n, self.n):  # the rows that were waiting already
            self.waits[i] += 1
        if full:
            order = list(range(self.n))
            for i in reversed(full):  # each full row trades places with the last decoding row
                last = self.n_decoding - 1
                order[i], order[last] = order[last], order[i]
                self.n_waiting += 1
            self._permute(order)
            for i in range(self.n_decoding, self.n_decoding + len(full)):
                self.waits[i] = 0
        if self.n_waiting and self.commit_due():
            return self.commit_waiting()
        return []

    def commit_due(self) -> bool:
        """Whether the waiting rows commit now: they wait only while another row that would
        commit with them (one that learns as one of them does) will fill its chunk (the host
        knows when: it counts each row's open tokens) before the longest waiting of them would
        have waited `commit_wait` steps. A wait that nobody joins is never taken."""
        n = self.n_decoding
        kinds = set(self.learns[n:])
        soon = [self.cfg.chunk - c for c, learn in zip(self.open_counts[:n], self.learns[:n]) if learn in kinds]
        return not soon or max(self.waits[n:]) + min(soon) > self.commit_wait

    def waited(self, steps: float) -> None:
        """The waiting rows waited `steps` more decode steps than the steps counted them: a step
        that also absorbed prompt tokens takes longer (the scheduler counts a chunk of them as
        one step), and a session sitting out eight of those would stall for seconds."""
        for i in range(self.n_decoding, self.n):
            self.waits[i] += steps

    def commit_waiting(self):
        """Commit every waiting row now (they decode again from the next step). Returns what
        `step` returns."""
        rows = list(range(self.n_decoding, self.n))
        self.n_waiting = 0
        return self._commit_groups(rows)

    def _commit_groups(self, rows: list[int]):
        groups: dict[Learning, list[int]] = {}
        for i in rows:
            groups.setdefault(self.learns[i], []).append(i)
        commits = []
        with torch.no_grad(), self._autocast():
            for learn, group in groups.items():
                commits.append((group, self._commit(group, learn)))
        return commits

    def logits(self) -> Tensor:
        """Next-token logits [n_decoding, V] (float32) of the decoding rows."""
        with torch.no_grad(), self._autocast():
            return self.model.logits(self.slots.last_hidden[:self.n_decoding]).float()

    def _autocast(self):
        dev = self.template.n_open.device.type
        return torch.autocast(dev, dtype=torch.bfloat16, enabled=self.autocast, cache_enabled=False)

    def _forward(self, n: int) -> None:
        if not self.pad:
            self._decode_inplace(n)
            return
        b = min(_bucket(n), self.capacity)
        held = self._hold(n, min(b, self.n))
        # every row past the decoding ones is computed as padding, and none may stand on a full
        # chunk, where a step has no slot to write: a waiting row (held, restored below), or a
        # slot a waiting row moved out of
        self.slots.n_open[n:b].zero_()
        if not self.graphs:
            self._decode_inplace(b)
        else:
            if b not in self._graphs:
                self._graphs[b] = self._capture(b)
            self._graphs[b].replay()
        # padding rows advanced too: keep their open chunk from filling up
        if b > n:
            self.slots.n_open[n:b].zero_()
        self._put_back(n, held)

    def _hold(self, lo: int, hi: int) -> dict[str, Tensor]:
        """Rows lo..hi-1 wait to commit but fall among a padded step's rows: keep what the step
        will write of them, for `_put_back` to restore them as they were."""
        if hi <= lo:
            return {}
        return {name: t[lo:hi].clone() for name, t in self.slots.tensors().items()
                if name.rsplit(".", 1)[-1] in STEP_WRITES}

    def _put_back(self, lo: int, held: dict[str, Tensor]) -> None:
        if not held:
            return
        tensors = self.slots.tensors()
        for name, t in held.items():
            tensors[name][lo:lo + t.shape[0]].copy_(t)

    def _decode_inplace(self, n: int) -> None:
        view = self.view(n)
        _, new, _ = self.model.forward_open(self.tokens[:n], view, inplace=True)
        old_t, new_t = view.tensors(), new.tensors()
        for name, t in new_t.items():
            if t is not old_t[name]:
                old_t[name].copy_(t)

    def _capture(self, b: int) -> torch.cuda.CUDAGraph:
        # the step is idempotent per call only up to the open counters: capture on a copy of
        # the counters and restore them, so warm-up and capture leave the sessions as they were
        saved = {k: v[:b].clone() for k, v in (("n_open", self.slots.n_open),
                                                ("open_tokens", self.slots.open_tokens))}
        layers_saved = [{k: layer[k][:b].clone() for k in ("open_k", "open_v", "open_conv")}
                        for layer in self.slots.layers]
        last_hidden = self.slots.last_hidden[:b].clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad(), self._autocast():
            for _ in range(2):
                self._decode_inplace(b)
                self._restore(b, saved, layers_saved, last_hidden)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad(), self._autocast():
            self._decode_inplace(b)
        self._restore(b, saved, layers_saved, last_hidden)
        log.info("captured the decode step for %d rows", b)
        return graph

    def _restore(self, b: int, saved: dict, layers_saved: list[dict], last_hidden: Tensor) -> None:
        self.slots.n_open[:b].copy_(saved["n_open"])
        self.slots.open_tokens[:b].copy_(saved["open_tokens"])
        self.slots.last_hidden[:b].copy_(last_hidden)
        for layer, s in zip(self.slots.layers, layers_saved):
            for k, v in s.items():
                layer[k][:b].copy_(v)

    def _commit(self, rows: list[int], learning: Learning) -> ChunkMetrics | None:
        """Close the full open chunk of `rows`: re-forward it and learn (or only roll it).
        Returns the commit's metrics (on the CPU, one row per entry of `rows`)."""
        k = min(_bucket(len(rows)), self.capacity) if self.pad else len(rows)
        if not self.graphs and rows == list(range(rows[0], rows[0] + k)):
            metrics = self._commit_span(rows[0], rows[0] + k, learning)
            return None if metrics is None else _to_cpu(metrics, len(rows))
        # padded with repeats of the last row: they compute and write the same values twice
        self.commit_rows[:k] = torch.tensor(rows + rows[-1:] * (k - len(rows))).to(self.commit_rows.device)
        if not self.graphs:
            metrics = self._commit_rows(k, learning)
        elif (k, learning) in self._commit_graphs:
            graph, metrics = self._commit_graphs[(k, learning)]
            graph.replay()
        else:  # the first commit of this shape runs for real, then is captured for the next ones
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                metrics = self._commit_rows(k, learning)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = self._commit_rows(k, learning)
            self._commit_graphs[(k, learning)] = (graph, captured)
            log.info("captured the commit of %d rows", k)
        return None if metrics is None else _to_cpu(metrics, len(rows))

    def _commit_span(self, lo: int, hi: int, learning: Learning) -> ChunkMetrics | None:
        """`_commit_rows` for the consecutive rows lo..hi-1 (sessions whose chunks close in the
        same step sit together): the commit reads the slot buffers as views, with no gather."""
        view = self.slots.map(lambda v: v[lo:hi])
        with torch.no_grad(), self._autocast():
            done, metrics = self.model.close_chunk(view, learning, roll=False)
        mine = view.tensors()
        for name, t in done.tensors().items():
            if t.data_ptr() != mine[name].data_ptr():
                mine[name].copy_(t)
        self._roll(view)
        return metrics

    def _roll(self, view: State) -> None:
        """`HopeLM.roll` of rows of the slot buffers, in place: the open chunk becomes the newest
        history. Each history buffer and the open one after it are one buffer (`_alloc`), so the
        roll is a shift left by a chunk, and only of the slots that hold history: a young
        session's window is mostly empty, and building a new window for every commit was the
        largest allocation of a many-row commit."""
        C = self.cfg.chunk
        # history slots after the roll, at most (on CUDA the whole window: reading the counters
        # would wait on the device)
        history = None if view.n_committed.is_cuda else int(view.n_committed.max()) + C
        for layer in view.layers:
            for committed, open_ in JOINED:
                W = layer[committed].shape[1]
                keep = W if history is None else min(W, history)
                joint = adjacent_join((layer[committed], layer[open_]), 1)
                assert joint is not None, "the slot buffers are joint (_alloc)"
                # chunk by chunk from the oldest, so no block is overwritten before it is read
                for dst in range(W - keep, W, C):
                    n = min(C, W - dst)
                    joint[:, dst:dst + n].copy_(joint[:, dst + C:dst + C + n])
                layer[open_].zero_()
        view.n_committed.add_(C)
        view.n_open.zero_()
        view.open_tokens.zero_()

    def _commit_rows(self, k: int, learning: Learning) -> ChunkMetrics | None:
        idx = self.commit_rows[:k]
        with torch.no_grad(), self._autocast():
            done, metrics = self.model.close_chunk(self.slots.map(lambda v: v.index_select(0, idx)), learning)
        for name, t in done.tensors().items():
            buf = self.slots.tensors()[name]
            buf.index_copy_(0, idx, t.to(buf.dtype))
        return metrics


def _to_cpu(m: ChunkMetrics, n: int) -> ChunkMetrics:
    """The first n rows of each metric, read from the device in one transfer."""
    keys = list(m.surprise)
    flat = torch.stack([m.surprise[k][:n] for k in keys] + [m.update_norm[k][:n] for k in keys]).float().cpu()
    return ChunkMetrics(dict(zip(keys, flat[:len(keys)])), dict(zip(keys, flat[len(keys):])))
