"""Sampling edge cases that reach the engine from untrusted requests."""

from __future__ import annotations

import random

import pytest
import torch

from hope_core.sampling import SamplingParams, StopMatcher, sample


@pytest.mark.parametrize("params", [SamplingParams(temperature=1e-203), SamplingParams(top_p=5e-324),
                                    SamplingParams(temperature=0.0)])
def test_vanishing_temperature_or_nucleus_is_greedy(params: SamplingParams) -> None:
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0)) * 30
    assert sample(logits, params, random.Random(1)) == int(logits.argmax())


def test_top_k_and_top_p_keep_only_the_head() -> None:
    logits = torch.tensor([5.0, 4.0, 0.0, -1.0, -2.0])
    seen = {sample(logits, SamplingParams(top_k=2), random.Random(i)) for i in range(200)}
    assert seen == {0, 1}
    seen = {sample(logits, SamplingParams(top_p=0.5), random.Random(i)) for i in range(50)}
    assert seen == {0}


def test_stop_matcher_holds_back_a_possible_stop_and_cuts_at_it() -> None:
    m = StopMatcher(["END"])
    assert m.push("abcE") == ("ab", False)  # "cE" could begin "END"
    assert m.push("N") == ("c", False)  # "EN" still could
    assert m.push("Dxyz") == ("", True)  # the stop string and all after it are dropped
