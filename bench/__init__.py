"""`hope bench`: how fast HOPE serves while it learns, against the frozen models a user would pick.

One module per measurement (see docs/benchmarks.md for the latest table and the command that made it):

* `engine_speed`: single-session decode with learning on and off, and aggregate tokens/s as the
  number of concurrent sessions grows, through the engine's scheduler (no HTTP);
* `http_load`: a `vllm bench serve`-style load generator against `hope serve` (Poisson arrivals,
  streaming, TTFT and inter-token latency);
* `state_io`: session state load and store latency against state size, for every store;
* `baselines`: a frozen GPT-2-style transformer of the same parameter count, decoded by a
  hand-written KV-cache loop and by Hugging Face `generate`;
* `gpu`: measured memory bandwidth and the roofline fraction of a batched decode step (CUDA);
* `report` and `cli`: the tables, the targets of issue #4, and `docs/benchmarks.md`.
"""
