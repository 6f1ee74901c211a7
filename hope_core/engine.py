"""The engine the server calls: absorb tokens into a session while learning, and generate.

It knows nothing of HTTP or storage. A call works on the `SessionState` it is given, replacing
its `state` as tokens are absorbed (the tensors themselves are never modified in place), so a
caller that wants a transaction passes a copy (`session.copy()` is cheap) and keeps or drops it.

A session is one endless token stream (HOPE.md section 3). `absorb` appends tokens and returns
each one's log-probability given everything before it; `generate` samples tokens one at a time
and absorbs each as it is produced. Both learn unless told not to: then every memory stays as it
was and only the working copy's attention window moves on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from hope_core.checkpoint import Checkpoint, load_checkpoint
from hope_core.model import LEVELS, ChunkMetrics, HopeLM, Learning, State
from hope_core.sampling import Alternatives, SamplingParams, StopMatcher, sample, top_alternatives
from hope_core.state import SessionState, StateError


@dataclass
class UpdateRecord:
    """One memory update of one session: what the server exports as metrics."""

    level: str  # "titans", "fast" or "mid"
    surprise: float  # titans: mean ||M(k) - v||^2; fast/mid: mean next-token loss of the chunk
    update_norm: float  # ||delta W|| / ||W||


@dataclass
class AbsorbResult:
    logprobs: list[float]  # log p(token_i | everything before it), one per absorbed token
    updates: list[UpdateRecord] = field(default_factory=list)
    top: list[Alternatives] = field(default_factory=list)  # per token, when asked for


@dataclass
class PromptAbsorbed:
    """A request's prompt is in the session: its tokens and each one's log-probability."""

    token_ids: list[int]
    logprobs: list[float]
    top: list[Alternatives] = field(default_factory=list)  # per token, when the job asked for them


@dataclass
class TokenEvent:
    token_id: int
    text: str  # text that became final with this token (may be empty: held back or partial UTF-8)
    logprob: float
    top: Alternatives = field(default_factory=list)  # `params.top_logprobs` most likely tokens


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" or "length"
    logprobs: list[float]
    updates: list[UpdateRecord]
    top_logprobs: list[Alternatives] = field(default_factory=list)  # per token, when asked for


class Generation:
    """Iterate for `TokenEvent`s as tokens are produced; `result` is set once it is exhausted.

    Stopping the iteration early (`close()`, or just dropping it) stops generation at once.
    """

    def __init__(self, it: Iterator[TokenEvent], holder: list[GenerationResult]) -> None:
        self._it, self._holder = it, holder

    def __iter__(self) -> Iterator[TokenEvent]:
        return self._it

    def __next__(self) -> TokenEvent:
        return next(self._it)

    def close(self) -> None:
        self._it.close()  # type: ignore[attr-defined]

    @property
    def result(self) -> GenerationResult:
        if not self._holder:
            raise RuntimeError("generation has not finished")
        return self._holder[0]


class TextStream:
    """A generation's tokens turned into text as they come: stop tokens and strings, held-back
    text, max_tokens. Shared by `Engine.generate` and the scheduler, so both end a generation
    at the same token with the same text."""

    def __init__(self, tokenizer, params: SamplingParams) -> None:
        self.params = params
        self.stop_ids = set(params.stop_token_ids)
        self.decoder = tokenizer.stream_decoder(skip_special=True)
        self.stops = StopMatcher(params.stop)
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.top: list[Alternatives] = []
        self.text = ""
        self.finish = "length"
        self.finished = params.max_tokens == 0

    def push(self, tok: int, lp: float, top: Alternatives | None = None) -> TokenEvent:
        """Account for one generated (and already absorbed) token; returns its event."""
        self.ids.append(tok)
        self.logprobs.append(lp)
        top = top or []
        self.top.append(top)
        if tok in self.stop_ids:
            out = self.stops.push(self.decoder.flush())[0] + self.stops.flush()
            self.finish, self.finished = "stop", True
        else:
            out, hit = self.stops.push(self.decoder.push(tok))
            if not hit and len(self.ids) == self.params.max_tokens:  # the last token: release held text
                more, hit = self.stops.push(self.decoder.flush())
                out += more if hit else more + self.stops.flush()
            if hit:
                self.finish = "stop"
            self.finished = hit or len(self.ids) >= self.params.max_tokens
        self.text += out
        return TokenEvent(tok, out, lp, top)

    def result(self, updates: list[UpdateRecord]) -> GenerationResult:
        top = self.top if self.params.top_logprobs else []
        return GenerationResult(self.ids, self.text, self.finish, self.logprobs, updates, top)


Scored = tuple[list[list[float]], list[list[Alternatives]]]  # per row: logprobs, alternatives


def _learning(learn: bool | Learning) -> Learning:
    if isinstance(learn, Learning):
        return learn
    return Learning() if learn else Learning.off()


def _records(m: ChunkMetrics, row: int) -> list[UpdateRecord]:
    out = []
    for lvl in LEVELS:
        norm = float(m.update_norm[lvl][row])
        if not math.isnan(norm):
            out.append(UpdateRecord(lvl, float(m.surprise[lvl][row]), norm))
    return out


class Engine:
    def __init__(self, checkpoint: Checkpoint | None = None, device: str | torch.device = "cpu",
                 bf16: bool | None = None) -> None:
        """On CUDA (or with `bf16`) the slow weights are kept in bfloat16 and the forward runs
        under autocast; the session's memories stay float32, the precision their small
        updates need."""
        self.device = torch.device(device)
        self.checkpoint = checkpoint or load_checkpoint(device=self.device)
        self.autocast = self.device.type == "cuda" if bf16 is None else bf16
        model = self.checkpoint.model.to(self.device)
        if self.autocast:
            model = model.to(torch.bfloat16)
        self.model: HopeLM = model.eval().requires_grad_(False)
        self.tokenizer = self.checkpoint.tokenizer
        self.fingerprint = self.checkpoint.fingerprint
        self.cfg = self.model.cfg
        self._fresh: State | None = None

    def amp(self):
        """The autocast context every forward runs in (a no-op in float32)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast,
                              cache_enabled=False)

    # ---- sessions ------------------------------------------------------------------------

    def new_session(self) -> SessionState:
        """A fresh session: memories at their initial values, the stream begun with BOS."""
        if self._fresh is None:
            session = SessionState(self.model.init_state(1), self.fingerprint)
            self.absorb(session, [self.tokenizer.bos_id])
            self._fresh = session.state
        return SessionState(self._fresh, self.fingerprint)

    def load_session(self, blob: bytes) -> SessionState:
        return SessionState.from_bytes(blob, self.model, self.fingerprint, self.device)

    def check_usable(self, session: SessionState) -> None:
        """Raise StateError if using the session overflows. A state made elsewhere can hold
        finite values too large for the model, which every later turn would fail on: on a copy,
        the open chunk is filled and learned, as a turn would."""
        probe = session.copy()
        res = self.absorb(probe, [self.tokenizer.eot_id] * (self.cfg.chunk - int(probe.state.n_open[0])))
        finite = all(math.isfinite(lp) for lp in res.logprobs) and all(
            bool(torch.isfinite(t).all()) for t in probe.state.tensors().values() if t.is_floating_point())
        if not finite:
            raise StateError("using it overflows: its values are too large for this model")

    # ---- absorbing -----------------------------------------------------------------------

    def absorb(self, session: SessionState, tokens: Sequence[int],
               learn: bool | Learning = True, score: bool = True, alternatives: int = 0) -> AbsorbResult:
        """Append tokens to the session's stream; chunks that close on the way are learned.

        With `score=False` no log-probabilities are computed (generation already has the
        sampled token's from the logits it sampled from); with `alternatives` each token also
        gets that many of the most likely tokens at its position."""
        learning = _learning(learn)
        C, vocab = self.cfg.chunk, self.cfg.vocab_size
        tokens = list(tokens)
        if any(t < 0 or t >= vocab for t in tokens):
            raise ValueError("token id out of the vocabulary")
        toks = torch.tensor([tokens], dtype=torch.long, device=self.device)
        state = session.state
        logprobs: list[float] = []
        top: list[Alternatives] = []
        updates: list[UpdateRecord] = []
        n_open = int(state.n_open[0])  # tracked here: one device read per call, not per piece
        pos = 0
        while pos < len(tokens):
            take = min(C - n_open, len(tokens) - pos)
            state, recs, scored = self._absorb_piece(state, toks[:, pos:pos + take], learning,
                                                     closes=n_open + take == C, score=score,
                                                     alternatives=alternatives)
            updates += recs.get(0, [])
            if scored is not None:
                logprobs += scored[0][0]
                top += scored[1][0]
            n_open = (n_open + take) % C
            pos += take
        session.state = state
        return AbsorbResult(logprobs, updates, top)

    def absorb_batch(self, sessions: Sequence[SessionState], pieces: Sequence[Sequence[int]],
                     learn: bool | Learning = True, alternatives: int = 0) -> list[AbsorbResult]:
        """`absorb(sessions[i], pieces[i], alternatives=...)` for every i in one batched forward
        (batched prefill).

        The pieces have one length and none crosses a chunk boundary (each session's open
        tokens plus its piece fit in one chunk); pieces that close a chunk are learned together.
        Each session's new state is its row of the batch's result, a view: a batch of sessions
        moves on (the next piece, the decode batch) without a copy per session, and
        `State.compact` gives a session that is kept for long its own memory."""
        learning = _learning(learn)
        C = self.cfg.chunk
        T = len(pieces[0]) if pieces else 0
        if not T or any(len(p) != T for p in pieces):
            raise ValueError("absorb_batch takes non-empty pieces of one length")
        toks = torch.tensor([list(p) for p in pieces], dtype=torch.long, device=self.device)
        if bool(((toks < 0) | (toks >= self.cfg.vocab_size)).any()):
            raise ValueError("token id out of the vocabulary")
        batch = State.cat([s.state for s in sessions])
        if bool((batch.n_open + T > C).any()):
            raise ValueError("a piece crosses a chunk boundary")
        done, recs, scored = self._absorb_piece(batch, toks, learning, closes=bool((batch.n_open + T == C).any()),
                                                alternatives=alternatives)
        assert scored is not None
        results = []
        for i, (session, row) in enumerate(zip(sessions, done.rows())):
            session.state = row
            results.append(AbsorbResult(scored[0][i], recs.get(i, []), scored[1][i]))
        return results

    def _absorb_piece(self, state: State, toks: Tensor, learning: Learning, closes: bool, score: bool = True,
                      alternatives: int = 0) -> tuple[State, dict[int, list[UpdateRecord]], Scored | None]:
        """Tokens [B, T] into every row, none crossing a chunk boundary; `closes`: whether some
        row's chunk closes (the caller knows). Returns the new state, each committed row's
        updates and, with `score`, each row's log-probabilities (and alternatives)."""
        prev = state.last_hidden[:, None]
        T, C = toks.shape[1], self.cfg.chunk
        with torch.no_grad(), self.amp():
            if T == C:  # whole chunks from a boundary: compute and learn at once
                hidden, state, metrics = self.model.learn_chunk(toks, state, learning)
                recs = {i: _records(metrics, i) for i in range(toks.shape[0])}
            elif closes and T > 1 and learning.any and bool((state.n_open + T == C).all()):
                # a prompt piece closes every row's chunk: learning re-computes the whole chunk
                # from its start anyway, and that forward gives the piece's hidden states as
                # well. (One sampled token keeps its own forward: as in the decode batch, the
                # next token is sampled from the decode step's hidden state, not the commit's.)
                tokens = torch.cat([state.open_tokens[:, :C - T], toks], 1)
                start = replace(state, n_open=torch.zeros_like(state.n_open))
                hidden, state, metrics = self.model.learn_chunk(tokens, start, learning)
                hidden = hidden[:, C - T:]
                recs = {i: _records(metrics, i) for i in range(toks.shape[0])}
            else:
                hidden, state, _ = self.model.forward_open(toks, state)
                recs = {}
                if closes:
                    state, recs = self._commit(state, learning)
            scored = self._logprobs(torch.cat([prev, hidden[:, :-1]], 1), toks, alternatives) if score else None
        return state, recs, scored

    def _commit(self, state: State, learning: Learning
                ) -> tuple[State, dict[int, list[UpdateRecord]]]:
        """Close full open chunks (rows with n_open == chunk), learning as `learning` says.

        Returns the new state and the updates of each committed row."""
        full = (state.n_open == self.cfg.chunk).nonzero(as_tuple=True)[0]
        every = len(full) == state.batch_size  # then no row needs copying out and back
        done, metrics = self.model.close_chunk(state if every else state.select(full), learning)
        recs = {} if metrics is None else {row: _records(metrics, i) for i, row in enumerate(full.tolist())}
        return (done if every else state.scatter(full, done)), recs

    def _logprobs(self, hidden: Tensor, targets: Tensor, alternatives: int = 0) -> Scored:
        """Each row's log-probabilities of `targets` [B, T] and, per token, its alternatives."""
        logp = F.log_softmax(self.model.logits(hidden).float(), -1)
        lps = logp.gather(-1, targets[..., None])[..., 0].tolist()
        if not alternatives:
            return lps, [[] for _ in lps]
        ids, values = top_alternatives(logp, alternatives)  # [B, T, k] each
        return lps, [[list(zip(t_ids, t_lps)) for t_ids, t_lps in zip(row_ids, row_lps)]
                     for row_ids, row_lps in zip(ids.tolist(), values.tolist())]

    # ---- generating ----------------------------------------------------------------------

    def next_logits(self, session: SessionState) -> Tensor:
        with torch.no_grad(), self.amp():
            return self.model.logits(session.state.last_hidden)[0].float()

    def generate(self, session: SessionState, prompt: Sequence[int], params: SamplingParams,
                 learn: bool | Learning = True) -> Generation:
        """Absorb `prompt`, then sample up to `params.max_tokens` tokens, absorbing each one.

        Generation stops at a stop token (absorbed: it closes the turn in the stream), at a stop
        string (its text is not returned), or at max_tokens. The result's log-probabilities are
        the generated tokens'; its updates include those made while absorbing the prompt.
        Nothing happens until the first event is asked for.
        """
        holder: list[GenerationResult] = []
        return Generation(self._generate(session, list(prompt), params, _learning(learn), holder),
                          holder)

    def _generate(self, session: SessionState, prompt: list[int], params: SamplingParams,
                  learning: Learning, holder: list[GenerationResult]) -> Iterator[TokenEvent]:
        updates = self.absorb(session, prompt, learning).updates if prompt else []
        gen = params.generator()
        text = TextStream(self.tokenizer, params)
        k = params.top_logprobs
        while not text.finished:
            logits = self.next_logits(session)
            tok = sample(logits, params, gen)
            logp = F.log_softmax(logits, -1)
            top: Alternatives = []
            if k:
                ids, values = top_alternatives(logp, k)
                top = list(zip(ids.tolist(), values.tolist(), strict=True))
            updates += self.absorb(session, [tok], learning, score=False).updates
            yield text.push(tok, float(logp[tok]), top)
        holder.append(text.result(updates))

    # ---- several sessions in one step --------------------------------------------------------

    def decode_batch(self, batch: State, tokens: Tensor, learn: bool | Learning = True
                     ) -> tuple[Tensor, State, list[list[UpdateRecord]]]:
        """Absorb one token per session [B] in one batched forward (per-session memories as
        stacked weights); sessions whose chunk closes are learned together. Returns the next
        token logits [B, V], the new batch state, and each row's updates."""
        learning = _learning(learn)
        if bool((batch.n_open >= self.cfg.chunk).any()):
            raise ValueError("a session in the batch has an uncommitted full chunk")
        with torch.no_grad(), self.amp():
            tokens = tokens.view(-1, 1).to(self.device, torch.long)
            _, state, _ = self.model.forward_open(tokens, batch)
            recs: dict[int, list[UpdateRecord]] = {}
            if bool((state.n_open == self.cfg.chunk).any()):
                state, recs = self._commit(state, learning)
            per_row = [recs.get(i, []) for i in range(state.batch_size)]
            logits = self.model.logits(state.last_hidden).float()
        return logits, state, per_row

    @staticmethod
    def stack(sessions: Sequence[SessionState]) -> State:
        return State.cat([s.state for s in sessions])

    @staticmethod
    def unstack(batch: State, sessions: Sequence[SessionState]) -> None:
        for i, s in enumerate(sessions):
            s.state = batch.select(torch.tensor([i], device=batch.n_open.device))
