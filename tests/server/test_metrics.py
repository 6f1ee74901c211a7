"""/metrics: every metric of the issue is there, lints clean, and moves with traffic."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hope_core.engine import Engine
from tests.server.support import Api, ServerProcess, running_app

pytestmark = pytest.mark.anyio

COUNTERS = ["hope_prompt_tokens", "hope_generation_tokens", "hope_memory_updates", "hope_request_success",
            "hope_request_failure", "hope_session_version_conflicts", "hope_session_cache_hits",
            "hope_session_cache_misses", "hope_session_cache_evictions", "hope_scheduler_steps",
            "hope_engine_process_exits"]
HISTOGRAMS = ["hope_surprise", "hope_update_norm", "hope_time_to_first_token_seconds",
              "hope_inter_token_latency_seconds", "hope_e2e_request_latency_seconds", "hope_session_state_bytes",
              "hope_session_state_load_seconds", "hope_session_state_store_seconds", "hope_batch_size",
              "hope_scheduler_step_seconds"]
GAUGES = ["hope_requests_running", "hope_requests_waiting", "hope_sessions_cached", "hope_session_cache_bytes"]


async def scrape(api: Api) -> dict[tuple[str, tuple], float]:
    text = await api.metrics()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_present_and_moving(engine: Engine) -> None:
    async with running_app(engine, session_cache_size=0) as api:
        families = {f.name: f.type for f in text_string_to_metric_families(await api.metrics())}
        for name in COUNTERS:
            assert families.get(name) == "counter", name
        for name in HISTOGRAMS:
            assert families.get(name) == "histogram", name
        for name in GAUGES:
            assert families.get(name) == "gauge", name
        assert families.get("hope_model_info") == "gauge"  # an Info is exposed as a gauge of 1
        before = await scrape(api)
        info = _info_labels(before)
        assert info["fingerprint"] == engine.fingerprint and info["name"] == api.model

        outs = [await api.chat("a message long enough to close a chunk of sixteen tokens or more", session="m",
                               max_tokens=20, ignore_eos=True),
                await api.chat("and a second turn, read back from the store", session="m", max_tokens=20,
                               ignore_eos=True)]
        await api.chat("x", model="nope", expect=404)
        after = await scrape(api)

        def grew(name: str, **labels: str) -> bool:
            return value(after, name, **labels) > value(before, name, **labels)

        for name, key in (("hope_prompt_tokens_total", "prompt_tokens"),
                          ("hope_generation_tokens_total", "completion_tokens")):
            assert value(after, name) - value(before, name) == sum(o["usage"][key] for o in outs), name
        for level in ("titans", "fast", "mid"):
            assert grew("hope_memory_updates_total", level=level), level
            assert grew("hope_surprise_count", level=level) and grew("hope_update_norm_count", level=level)
        assert value(after, "hope_surprise_sum", level="fast") > 0
        assert grew("hope_request_success_total", finished_reason="length")
        assert grew("hope_request_failure_total", reason="not_found")
        for name in ("hope_time_to_first_token_seconds", "hope_inter_token_latency_seconds",
                     "hope_e2e_request_latency_seconds", "hope_session_state_bytes",
                     "hope_session_state_store_seconds", "hope_session_state_load_seconds"):
            assert grew(f"{name}_count"), name
        assert value(after, "hope_requests_running") == 0 and value(after, "hope_requests_waiting") == 0
        assert value(after, "hope_session_version_conflicts_total") == 0
        assert grew("hope_session_cache_misses_total", reason="absent")  # no cache here: every turn loads
        assert value(after, "hope_session_cache_hits_total") == 0 and value(after, "hope_session_cache_bytes") == 0


def _info_labels(samples: dict) -> dict[str, str]:
    for (name, labels), _ in samples.items():
        if name == "hope_model_info":
            return dict(labels)
    raise AssertionError("no hope_model_info")


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
async def test_promtool_check_metrics(engine: Engine) -> None:
    async with running_app(engine) as api:
        await api.chat("traffic", session="p", max_tokens=20, ignore_eos=True)
        text = await api.metrics()
    result = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def request_gauges(server: ServerProcess) -> tuple[float, float]:
    text = httpx.get(f"{server.base_url}/metrics").text
    samples = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
    return samples["hope_requests_running"], samples["hope_requests_waiting"]


@pytest.mark.parametrize("engine_process", ["false", "true"])
def test_requests_queued_for_a_row_of_the_batch_count_as_waiting(start_server, engine_process: str) -> None:
    """Three engine slots and a batch of one row: of three long requests one decodes and two wait
    in the scheduler's queue. They are waiting (the autoscaler reads that gauge), not running."""
    server = start_server("memory://", HOPE_MAX_BATCH_SIZE="1", HOPE_MAX_CONCURRENT_REQUESTS="3",
                          HOPE_MAX_TOKENS_LIMIT="100000", HOPE_ENGINE_PROCESS=engine_process)
    body = {"model": "hope", "messages": [{"role": "user", "content": "a very long answer"}],
            "max_tokens": 100000, "ignore_eos": True, "stream": True}
    streaming = [threading.Event() for _ in range(3)]
    leave = [threading.Event() for _ in range(3)]

    def stream(i: int) -> None:  # reads until told to leave, then closes the connection
        with httpx.Client(timeout=60) as client, \
                client.stream("POST", f"{server.base_url}/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if '"content"' in line:
                    streaming[i].set()
                if leave[i].is_set():
                    break

    def wait_for(gauges: tuple[float, float]) -> None:
        deadline = time.monotonic() + 10
        while (seen := request_gauges(server)) != gauges:
            assert time.monotonic() < deadline, f"(running, waiting) is {seen}, expected {gauges}"
            time.sleep(0.05)

    clients = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
    clients[0].start()
    assert streaming[0].wait(30)  # the first one holds the batch's row
    for client in clients[1:]:
        client.start()
    try:
        wait_for((1, 2))
        leave[0].set()  # the first one leaves: one of the others takes the row
        wait_for((1, 1))
    finally:
        for e in leave:
            e.set()  # each one leaves at its first line, giving the row to the next
        for client in clients:
            client.join(timeout=60)
    wait_for((0, 0))
