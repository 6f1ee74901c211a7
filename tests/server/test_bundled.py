"""Measurements with the trained, bundled checkpoint (skipped while it does not exist).

* Re-read gain through the API (HOPE.md invariant 6): a passage scored with /v1/completions
  (`max_tokens=0`, `echo`, `logprobs`) in a session that read it once before, with a distractor
  longer than the attention window in between, has a lower loss than in a fresh session.
* State load and store latency through Redis and SQLite.

Run with `-s` to see the numbers: pytest tests/server/test_bundled.py -s
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import textwrap

import pytest

from hope_core.checkpoint import DEFAULT_CHECKPOINT
from hope_core.engine import Engine
from server.app import load_engine
from server.settings import Settings
from tests.server.support import Api, running_app

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not (DEFAULT_CHECKPOINT / "model.safetensors").is_file(),
                       reason="the bundled checkpoint is not trained yet"),
]

PASSAGE = (
    "The lighthouse keeper of Varna Point kept a ledger of every ship that passed. On the ninth of "
    "March the schooner Aurelia came through the strait at dawn, carrying copper wire and forty "
    "barrels of salted herring. Her captain, a woman named Ilse Brandt, signalled twice with a green "
    "lantern, which meant that she would anchor in the bay and come ashore for water. The keeper wrote "
    "her name in the ledger, and beside it the word 'green', and beside that the number forty."
)


def distractor() -> str:
    """English prose that pushes the passage out of the attention window: stdlib docstrings."""
    return "\n\n".join(inspect.getdoc(m) or "" for m in (argparse, textwrap, inspect))[:6000]


@pytest.fixture(scope="module")
def bundled() -> Engine:
    return load_engine(Settings(device="cpu"))


async def score(api: Api, text: str, session: str | None) -> tuple[float, int]:
    """Mean loss of `text`'s tokens given what the session read before, and their number."""
    body = {"model": api.model, "prompt": text, "max_tokens": 0, "echo": True, "logprobs": 0}
    if session:
        body["session_id"] = session
    r = await api.client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    lps = r.json()["choices"][0]["logprobs"]["token_logprobs"]
    return -statistics.fmean(lps), len(lps)


async def test_reread_gain_through_the_api(bundled: Engine) -> None:
    async with running_app(bundled) as api:
        fresh, _ = await score(api, PASSAGE, session=None)
        first, _ = await score(api, PASSAGE, session="reader")
        _, n_distractor = await score(api, distractor(), session="reader")
        assert n_distractor > bundled.cfg.window  # the passage has left the attention window
        again, _ = await score(api, PASSAGE, session="reader")
        # control: the same distractor without the passage before it
        await score(api, distractor(), session="control")
        control, _ = await score(api, PASSAGE, session="control")
    print(f"\nre-read loss (nats/token): fresh {fresh:.4f}, first read {first:.4f}, after the distractor "
          f"{again:.4f} (control without the first read: {control:.4f}); gain vs fresh {fresh - again:.4f}, "
          f"vs control {control - again:.4f}; distractor {n_distractor} tokens, window {bundled.cfg.window}")
    assert first == pytest.approx(fresh, abs=1e-4)  # a fresh stored session is a fresh session
    # the session remembers the passage: it scores lower than after the same text without it
    assert again < control


@pytest.mark.parametrize("store", ["sqlite", "redis"])
async def test_state_io_latency(bundled: Engine, store: str, tmp_path, request) -> None:
    url = f"sqlite:///{tmp_path}/s.db" if store == "sqlite" else request.getfixturevalue("redis_store_url")
    async with running_app(bundled, url, session_cache_size=0) as api:  # no cache: every turn loads
        for i in range(12):
            await api.chat(f"turn {i}", session="io", max_tokens=4)
        metrics = api.app.state.ctx.metrics
        load = metrics.state_load.collect()[0].samples
        save = metrics.state_store.collect()[0].samples
    def mean(samples) -> float:
        total = {s.name: s.value for s in samples}
        return next(v for k, v in total.items() if k.endswith("_sum")) / next(
            v for k, v in total.items() if k.endswith("_count"))
    state_bytes = bundled.new_session().nbytes("float32")
    print(f"\n{store}: state {state_bytes / 1e6:.2f} MB, load (read + decode) {mean(load) * 1e3:.1f} ms, "
          f"store (encode + commit) {mean(save) * 1e3:.1f} ms, mean of 11 loads / 12 commits")
