"""Prometheus metrics, in a registry of their own (one per app, so tests can build many apps).

Names are the contract of the issue and of `promtool check metrics`; prometheus_client adds the
`_total` suffix to counters and the `_info` suffix to the model info.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics

from hope_core.engine import UpdateRecord

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
_IO = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# 4 KiB .. 1 GiB by factors of 2, and 48 MiB: HopeSessionStateNearLimit asks for the p99 above
# 48 MiB, and a quantile inside a wide bucket is read as near its top (a 20 MiB state in a
# 16-64 MiB bucket read as 63 MiB)
_BYTES = tuple(sorted({float(2**k) for k in range(12, 31)} | {48.0 * 2**20}))
# titans surprise is a squared error near 0..10; fast/mid surprise is a next-token loss (nats)
_SURPRISE = (0.01, 0.03, 0.1, 0.3, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 15.0, 25.0)
_NORM = (1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self) -> None:
        disable_created_metrics()  # no `*_created` series: they double the output and nobody reads them
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.prompt_tokens = Counter("hope_prompt_tokens", "Prompt tokens the engine absorbed", registry=r)
        self.generation_tokens = Counter("hope_generation_tokens", "Tokens the engine generated", registry=r)
        self.memory_updates = Counter("hope_memory_updates", "Memory updates of sessions, per level",
                                      ["level"], registry=r)
        self.request_success = Counter("hope_request_success", "Generation requests that completed",
                                       ["finished_reason"], registry=r)
        self.request_failure = Counter("hope_request_failure", "Requests answered with an error, by reason",
                                       ["reason"], registry=r)
        self.version_conflicts = Counter("hope_session_version_conflicts",
                                         "Commits refused because the session changed meanwhile", registry=r)
        self.surprise = Histogram("hope_surprise", "Surprise of each memory update (titans: ||M(k)-v||^2, "
                                  "fast/mid: mean next-token loss of the chunk)", ["level"],
                                  buckets=_SURPRISE, registry=r)
        self.update_norm = Histogram("hope_update_norm", "Relative size ||dW||/||W|| of each memory update",
                                     ["level"], buckets=_NORM, registry=r)
        self.ttft = Histogram("hope_time_to_first_token_seconds", "Request arrival to first generated token",
                              buckets=_LATENCY, registry=r)
        self.itl = Histogram("hope_inter_token_latency_seconds", "Time between generated tokens",
                             buckets=_TOKEN_LATENCY, registry=r)
        self.e2e = Histogram("hope_e2e_request_latency_seconds", "Request arrival to completion",
                             buckets=_LATENCY, registry=r)
        self.state_bytes = Histogram("hope_session_state_bytes", "Size of stored session states",
                                     buckets=_BYTES, registry=r)
        self.state_load = Histogram("hope_session_state_load_seconds",
                                    "Reading a session state from the store and decoding it",
                                    buckets=_IO, registry=r)
        self.state_store = Histogram("hope_session_state_store_seconds",
                                     "Encoding a session state and committing it to the store",
                                     buckets=_IO, registry=r)
        # read when scraped (`read_requests_from`)
        self.running = Gauge("hope_requests_running", "Requests whose engine work is running", registry=r)
        self.waiting = Gauge("hope_requests_waiting",
                             "Requests queued for an engine slot, a busy session or a row of the batch", registry=r)
        self.sessions_cached = Gauge("hope_sessions_cached", "Decoded session states held in memory",
                                     registry=r)
        self.cache_bytes = Gauge("hope_session_cache_bytes",
                                 "In-memory bytes of the decoded session states held in the cache", registry=r)
        self.cache_hits = Counter("hope_session_cache_hits",
                                  "Session states served from the cache (the store still held that version)",
                                  registry=r)
        self.cache_misses = Counter("hope_session_cache_misses",
                                    "Stored session states the cache could not serve, by reason (absent: "
                                    "not cached; stale: the store holds another version)", ["reason"],
                                    registry=r)
        self.cache_evictions = Counter("hope_session_cache_evictions",
                                       "Session states evicted from the cache to respect its bounds", registry=r)
        self.batch_size = Histogram("hope_batch_size", "Sessions in each batched decode step",
                                    buckets=_BATCH, registry=r)
        self.scheduler_steps = Counter("hope_scheduler_steps", "Steps run by the engine's scheduler", registry=r)
        self.step_seconds = Histogram("hope_scheduler_step_seconds",
                                      "Wall time of one scheduler step (prefill slice, batched decode, commits)",
                                      buckets=_TOKEN_LATENCY, registry=r)
        self.engine_exits = Counter("hope_engine_process_exits",
                                    "Engine processes that exited unexpectedly (HOPE_ENGINE_PROCESS); each is "
                                    "restarted", registry=r)
        self.model_info = Info("hope_model", "The checkpoint being served", registry=r)
        for level in ("titans", "fast", "mid"):  # present from the start, at zero
            self.memory_updates.labels(level)
            self.surprise.labels(level)
            self.update_norm.labels(level)
        for reason in ("stop", "length"):
            self.request_success.labels(reason)
        for reason in ("absent", "stale"):
            self.cache_misses.labels(reason)

    def read_requests_from(self, holding: Callable[[], int], waiting: Callable[[], int],
                           queued: Callable[[], int]) -> None:
        """The request gauges, read when scraped from the requests `holding` an engine slot, those
        `waiting` for one or for a busy session, and the slot holders' jobs `queued` in the
        scheduler for a row of the batch. Those count as waiting, not running: with
        HOPE_MAX_BATCH_SIZE below HOPE_MAX_CONCURRENT_REQUESTS they wait as the others do, and the
        autoscaler reads hope_requests_waiting."""
        self.running.set_function(lambda: holding() - queued())
        self.waiting.set_function(lambda: waiting() + queued())

    def observe_updates(self, updates: Iterable[UpdateRecord]) -> None:
        for u in updates:
            self.memory_updates.labels(u.level).inc()
            self.surprise.labels(u.level).observe(u.surprise)
            self.update_norm.labels(u.level).observe(u.update_norm)
