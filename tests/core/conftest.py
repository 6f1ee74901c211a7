"""Fixtures for the hope_core model/engine/state tests.

The tiny models here are far too small to profit from intra-op threads; with a training job
on the same two cores, extra threads make every op spin against it (a chunk commit goes from
~4 ms to ~400 ms). One thread keeps the suite fast and its numbers deterministic.
"""

from __future__ import annotations

import pytest
import torch
from hope_testkit import TINY_ODD, make_engine, tiny_config

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def engine_dir(tmp_path_factory):
    """A tiny checkpoint directory (chunk 4, window 16, mid period 8) with the shipped tokenizer."""
    path = tmp_path_factory.mktemp("ckpt_tiny")
    make_engine(path, tiny_config())
    return path


@pytest.fixture(scope="session")
def engine(engine_dir):
    return make_engine(engine_dir)


@pytest.fixture(scope="session", params=["c4w16m8", "c2w8m6", "c4w16m8-plain"])
def any_engine(request, tmp_path_factory):
    """The invariants are checked on two shapes (see hope_testkit.TINY_ODD), and on the plain
    Titans variant (static k/v/eta/alpha projections instead of adaptive memories)."""
    cfg = {"c4w16m8": tiny_config(), "c2w8m6": tiny_config(**TINY_ODD),
           "c4w16m8-plain": tiny_config(self_modifying=False)}[request.param]
    path = tmp_path_factory.mktemp(f"ckpt_{request.param}")
    return make_engine(path, cfg)
