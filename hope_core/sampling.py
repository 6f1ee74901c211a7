"""Sampling parameters and next-token sampling (temperature, top-k, top-p, seed) and stop strings."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch
from torch import Tensor

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat


@dataclass
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 1.0  # 0 is greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    top_logprobs: int = 0  # alternatives reported with each generated token (most likely first)

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        if not 0 <= self.temperature < math.inf:
            raise ValueError("temperature must be >= 0 and finite")
        if not 0 <= self.top_p <= 1:
            raise ValueError("top_p must be in [0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]")

    def generator(self) -> random.Random | None:
        """The request's own random numbers (one uniform per sampled token), or None: unseeded."""
        return None if self.seed is None else random.Random(self.seed)


GREEDY_BELOW = 1e-6  # a temperature or top_p this small is the greedy choice


def is_greedy(params: SamplingParams) -> bool:
    """Vanishing values would break float32 sampling (logits / 1e-200 overflow; a top_p that
    rounds to 0 drops every token): sampling that cold, or from a nucleus that small, is greedy."""
    return params.temperature < GREEDY_BELOW or params.top_p < GREEDY_BELOW


_UNSEEDED = random.Random()  # draws for requests without a seed


def sample(logits: Tensor, params: SamplingParams, generator: random.Random | None) -> int:
    """One token id from logits [V]: `sample_rows` on a batch of one."""
    return sample_rows(logits[None], [params], [generator])[0]


def sample_rows(logits: Tensor, params: list[SamplingParams],
                generators: list[random.Random | None]) -> list[int]:
    """One token id per row of logits [B, V] (any device), each row with its own parameters."""
    return pick_tokens(logits, params, generators).tolist()


def pick_tokens(logits: Tensor, params: list[SamplingParams],
                generators: list[random.Random | None]) -> Tensor:
    """`sample_rows` as a tensor [B] on the logits' device, read by nobody yet.

    Rows are sampled together by inverse CDF: row i takes the first token whose cumulative
    probability reaches u_i, where u_i is drawn from that row's own generator. A seeded
    request therefore gets the same tokens alone and inside any batch."""
    V = logits.shape[1]
    greedy = torch.tensor([is_greedy(p) for p in params])
    if bool(greedy.all()):
        return logits.argmax(-1)
    dev = logits.device
    u = torch.tensor([(g or _UNSEEDED).random() for g in generators]).to(dev, non_blocking=True)
    temp = torch.tensor([1.0 if is_greedy(p) else p.temperature for p in params], device=dev)
    top_k = torch.tensor([min(p.top_k, V) or V for p in params], device=dev)  # any k >= V: no limit
    top_p = torch.tensor([p.top_p for p in params], device=dev)
    scaled = logits.float() / temp[:, None]
    if bool((top_k < V).any() or (top_p < 1).any()):
        # the nucleus is found in sorted order but applied in vocabulary order: the cumulative
        # distribution sampled from must not depend on which other rows share the batch
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        rank = torch.arange(V, device=dev)
        sorted_logits = sorted_logits.masked_fill(rank[None] >= top_k[:, None], float("-inf"))
        probs = torch.softmax(sorted_logits, -1)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop = (torch.cumsum(probs, -1) - probs >= top_p[:, None]) | (rank[None] >= top_k[:, None])
        scaled = scaled.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    cdf = torch.cumsum(torch.softmax(scaled, -1), -1)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_max(V - 1)[:, 0]
    return torch.where(greedy.to(dev), logits.argmax(-1), pick)


Alternatives = list[tuple[int, float]]  # (token id, log-probability), most likely first


def top_alternatives(logp: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k most likely tokens of each row of log-probabilities [..., V]: (ids, logprobs),
    most likely first. Ties go to the lower id, so the list does not depend on the batch."""
    k = min(k, logp.shape[-1])
    values, ids = logp.topk(k, dim=-1)  # (a sort of the whole vocabulary costs 30 times as much)
    # topk's order among equal values is unspecified: order the k by id, then stably by value
    by_id = ids.argsort(dim=-1)
    ids, values = ids.gather(-1, by_id), values.gather(-1, by_id)
    by_value = values.sort(dim=-1, descending=True, stable=True).indices
    return ids.gather(-1, by_value), values.gather(-1, by_value)


class StopMatcher:
    """Streams text while holding back anything that might be the start of a stop string."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buffer = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit). After a hit the text
        up to (not including) the stop string is returned and the rest is dropped."""
        self.buffer += text
        hits = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buffer = self.buffer[:min(hits)], ""
            return out, True
        cut = max(len(self.buffer) - self.hold, 0) if self.stops else len(self.buffer)
        out, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return out, False

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out
