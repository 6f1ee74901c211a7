"""`hope bench`: the baselines are the right size and decode correctly, every part produces numbers on
the real thing (stores, Redis, a `hope serve` process), and the report has its tables."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import redis
import torch

from bench import arithmetic, baselines, gpu, http_load, state_io
from bench.timing import percentile
from hope_core.checkpoint import load_checkpoint
from hope_core.engine import Engine
from hope_core.sampling import SamplingParams
from tests.server.support import REDIS_URL, make_checkpoint, redis_available


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("bench-tiny"))


def test_percentile() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 99) == pytest.approx(9.9)
    assert math.isnan(percentile([], 50))


def test_baseline_has_hopes_parameter_count() -> None:
    hope = load_checkpoint().model
    target = sum(p.numel() for p in hope.parameters())
    cfg = baselines.matching_config(target, hope.cfg.vocab_size, hope.cfg.d_model, hope.cfg.n_heads)
    model = baselines.build_model(cfg, "cpu")
    n = sum(p.numel() for p in model.parameters())
    assert n == cfg.n_params()
    assert abs(n - target) / target < 0.05
    assert (cfg.vocab_size, cfg.d_model) == (hope.cfg.vocab_size, hope.cfg.d_model)
    if baselines.hf_available():  # the transformers model is the same size: same architecture
        hf = baselines.build_hf_model(cfg, "cpu")
        assert sum(p.numel() for p in hf.parameters()) == n


def test_kv_cache_loop_decodes_like_full_recompute() -> None:
    cfg = baselines.GPTConfig(vocab_size=512, d_model=64, n_layers=3, n_heads=4, n_positions=128)
    model = baselines.build_model(cfg, "cpu", seed=1)
    prompt = baselines.random_prompt(cfg, batch=3, length=16, seed=2)
    cached = baselines.kv_generate(model, prompt, 24, greedy=True)
    full = baselines.full_generate(model, prompt, 24)
    assert cached.shape == (3, 24)
    assert torch.equal(cached, full)
    # the cache's logits are those of the full sequence, not only their argmax
    dec = baselines.KVDecoder(model, prompt, 4)
    dec.prefill()
    toks = dec.decode(4)
    with torch.inference_mode():
        ref = model(torch.cat([prompt, toks], 1))[:, -1]
    torch.testing.assert_close(dec.logits, ref, rtol=1e-4, atol=1e-5)
    assert baselines.kv_loop_speed(model, 2, 8, 8) > 0


def test_flops_of_products_and_attention_forward_and_backward() -> None:
    x = torch.randn(3, 8, 32, requires_grad=True)
    w = torch.randn(64, 32, requires_grad=True)
    product = 2 * 3 * 8 * 32 * 64
    with arithmetic.MatmulFlops() as counter:
        y = torch.nn.functional.linear(x, w)
    assert counter.total == product
    with arithmetic.MatmulFlops() as counter:
        y.sum().backward()  # the input's gradient and the weight's: a product each
    assert counter.total == 2 * product
    with torch.inference_mode(), arithmetic.MatmulFlops() as counter:  # composite ops arrive whole here
        torch.nn.functional.linear(x, w, torch.zeros(64))
        (x[0] * 2).exp()  # element-wise: not counted
    assert counter.total == product
    q, k, v = (torch.randn(1, 2, n, 8, requires_grad=True) for n in (5, 7, 7))
    attention = 2 * 2 * 5 * 7 * (8 + 8)  # q k^T and p v, per head
    with arithmetic.MatmulFlops() as counter:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert counter.total == attention
    with arithmetic.MatmulFlops() as counter:
        out.sum().backward()
    assert counter.total == 2 * attention


def test_a_token_of_the_kv_loop_costs_twice_its_weights_and_its_attention() -> None:
    cfg = baselines.GPTConfig(vocab_size=512, d_model=64, n_layers=3, n_heads=4, n_positions=128)
    prompt, new = 16, 8
    weights = cfg.n_layers * (4 * cfg.d_model**2 + 2 * cfg.mlp_ratio * cfg.d_model**2) + cfg.vocab_size * cfg.d_model
    keys = sum(prompt + 1 + i for i in range(new)) / new  # a token attends to the prompt, the tokens before and itself
    per_token = 2 * weights + cfg.n_layers * 4 * keys * cfg.d_model
    assert arithmetic.kv_loop_flops(cfg, prompt, new) == pytest.approx(per_token, rel=0.02)


def test_learning_adds_the_commits_arithmetic_to_hopes_tokens(tiny: Path) -> None:
    engine = Engine(load_checkpoint(tiny))
    off, on = arithmetic.hope_flops(engine, learn=False), arithmetic.hope_flops(engine, learn=True)
    cfg = engine.cfg
    # the decode step multiplies by every slow weight at least once (the logits' included)
    assert off > 2 * cfg.vocab_size * cfg.d_model
    # a commit re-runs the forward of its chunk and goes backward through it
    assert on > 2 * off
    rates = arithmetic.matmul_rates("cpu", torch.float32, [(16, 32, 64)], seconds=0.05)
    assert rates[0].shape == "[16, 32] x [32, 64]" and rates[0].flops_per_s > 0


def test_narrow_models_keep_the_ops_and_shrink_the_arithmetic(tiny: Path) -> None:
    from bench.engine_speed import narrow_engine

    engine = Engine(load_checkpoint(tiny))
    narrow = narrow_engine(engine)
    keep = ("n_layers", "n_heads", "chunk", "window", "mid_period", "vocab_size", "self_modifying")
    assert all(getattr(narrow.cfg, k) == getattr(engine.cfg, k) for k in keep)
    assert narrow.cfg.d_model * baselines.NARROW == engine.cfg.d_model
    assert narrow.cfg.head_dim % 2 == 0
    n_full = sum(p.numel() for p in engine.model.parameters())
    assert sum(p.numel() for p in narrow.model.parameters()) < n_full / 4
    # it serves like any engine: a chunk closes and learns
    gen = narrow.generate(narrow.new_session(), [5] * 20, SamplingParams(max_tokens=8, seed=0))
    list(gen)
    out = gen.result
    assert 1 <= len(out.token_ids) <= 8 and out.updates
    gpt = baselines.narrow_config(baselines.GPTConfig(d_model=256, n_heads=4))
    assert (gpt.d_model, gpt.n_heads, gpt.n_layers) == (32, 4, 6)
    assert baselines.narrow_d_model(16, 4) == 8  # at least one even-width head each


def test_state_io_measures_every_store(tiny: Path) -> None:
    stores = ["memory", "sqlite"] + (["redis"] if redis_available() else [])
    res = state_io.run(load_checkpoint(tiny), d_models=[32], reps=2, stores=stores, redis_url=REDIS_URL,
                       log=lambda _: None)
    assert {r.store for r in res.rows} == set(stores)
    assert len(res.rows) == 3 * len(stores)  # fp32, bf16, and the d32 state, per store
    for row in res.rows:
        assert row.nbytes > 0 and not row.note
        for v in (row.load_p50_ms, row.load_p99_ms, row.store_p50_ms, row.store_p99_ms):
            assert v is not None and v > 0
    sizes = {r.case: r.nbytes for r in res.rows}
    fp32, bf16 = (next(v for k, v in sizes.items() if k.endswith(s) and "d64" in k) for s in ("fp32", "bf16"))
    assert bf16 < fp32
    if redis_available():  # nothing left behind
        assert not list(redis.Redis.from_url(REDIS_URL).scan_iter(match="hopebench-*"))


def test_step_bytes_add_up(tiny: Path) -> None:
    engine = Engine(load_checkpoint(tiny))
    one, eight = gpu.step_bytes(engine, 1), gpu.step_bytes(engine, 8)
    read, total = gpu.state_bytes(engine.new_session().state, engine.cfg)
    assert 0 < read < total
    assert one.weights == eight.weights == sum(p.numel() * 4 for p in engine.model.parameters())
    assert eight.total - one.total == pytest.approx(7 * one.per_session)
    assert one.commit == pytest.approx(2 * total / engine.cfg.chunk)
    assert gpu.step_bytes(engine, 1, learn=False).commit == 0
    r = gpu.roofline(engine, 8, step_s=0.01, bandwidth=1e12)
    assert r.fraction == pytest.approx(eight.total / 0.01 / 1e12)
    with pytest.raises(ValueError):
        gpu.measure_bandwidth("cpu")


def test_http_load_against_a_real_server(tiny: Path) -> None:
    cfg = http_load.LoadConfig(levels=[2], max_tokens=8, min_requests=4, sweeps=2)
    res = http_load.run(cfg, checkpoint=str(tiny), threads=1, log=lambda _: None)
    assert [[r.concurrency for r in sweep] for sweep in res.sweeps] == [[2], [2]]
    # the same requests on the engine alone, in a process of its own, first
    assert [(r.concurrency, r.requests, r.output_tokens) for r in res.engine_alone] == [(2, 4, 4 * 8)]
    (level,) = res.levels
    assert res.engine_process == "false"  # read off the server's hope_model_info
    assert (level.concurrency, level.requests, level.errors) == (2, 4, 0), level.first_error
    assert level.output_tokens == 4 * 8
    assert level.tokens_per_s > 0
    assert 0 < level.ttft_p50 <= level.ttft_p99
    assert 0 < level.itl_p50 <= level.itl_p99
    # the server decoded: it used CPU time, as the load generator did
    assert level.server_cpu_s is not None and level.server_cpu_s > 0
    assert level.client_cpu_s is not None and level.client_cpu_s > 0
    assert 0 < level.cores(level.server_cpu_s) < os.cpu_count() + 1


def test_the_http_requests_on_the_engine_alone(tiny: Path) -> None:
    engine = Engine(load_checkpoint(tiny))
    cfg = http_load.LoadConfig(levels=[1, 3], max_tokens=5, min_requests=4)
    rows = http_load.engine_alone(engine, cfg, threads=1, log=lambda _: None)
    assert [(r.concurrency, r.requests) for r in rows] == [(1, 4), (3, 6)]
    assert [r.output_tokens for r in rows] == [4 * 5, 6 * 5]  # as `ignore_eos`: never an early stop
    assert all(r.tokens_per_s > 0 for r in rows)

    from bench import report

    def level(n: int, tokens_per_s: float, errors: int = 0) -> http_load.LevelResult:
        return http_load.LevelResult(n, 4.0 * n, 4, errors, 1.0, int(tokens_per_s), 0.1, 0.2, 0.01, 0.02)

    alone = [http_load.EngineAloneLevel(1, 4, 100, 1.0), http_load.EngineAloneLevel(3, 6, 250, 1.0)]
    # three sweeps: each level reports its best run and all its errors, the speedup the median
    # of the ratios within a sweep (2.0, 1.5, 1.2), not the ratio of the bests (150 / 80)
    sweeps = [[level(1, 50), level(3, 100)], [level(1, 80), level(3, 120, errors=1)], [level(1, 75), level(3, 90)]]
    served = http_load.HttpResults("http://x", "cpu", 5, sweeps, engine_alone=alone)
    assert [r.tokens_per_s for r in served.levels] == [80, 120]
    assert served.errors(3) == 1 and served.errors(1) == 0
    assert served.speedup(3) == pytest.approx(1.5)
    text = "\n".join(report._http(served))
    assert "best of 3 sweeps" in text
    assert "| 3 | 12 | 4 | 1 | 120.0 | 1.50x |" in text
    assert "### The same requests on the engine alone" in text
    assert "| 1 | 4 | 100.0 | 1.00x | 0.80 |" in text
    assert "| 3 | 6 | 250.0 | 2.50x | 0.48 |" in text


def test_the_engine_alone_run_is_stopped_when_it_outlasts_its_time() -> None:
    cfg = http_load.LoadConfig(levels=[1], max_tokens=4, min_requests=2, timeout_s=0.05)
    with pytest.raises(RuntimeError, match="exited -9"):  # importing torch alone takes longer
        http_load.engine_alone_process(cfg, None, "cpu", 1, log=lambda _: None)


def test_cpu_seconds_reads_a_process() -> None:
    busy = http_load.cpu_seconds(os.getpid())
    assert busy is not None and busy > 0
    assert http_load.cpu_seconds(None) is None
    assert http_load.cpu_seconds(2**22 + 12345) is None  # no such process


def test_quick_run_writes_the_report(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench import cli

    md, js = tmp_path / "benchmarks.md", tmp_path / "bench.json"
    cli.main(["--quick", "--device", "cpu", "--checkpoint", str(tiny), "--only", "engine,baselines,arithmetic,state_io",
              "--levels", "1,2", "--no-hf", "--write", str(md), "--json", str(js)])
    text = md.read_text()
    assert text == capsys.readouterr().out.rstrip("\n") + "\n"
    for heading in ("# Benchmarks", "## Targets (issue #4)", "## Single-session decode", "## Frozen baselines",
                    "## Arithmetic per token", "## Session state load and store"):
        assert heading in text
    assert "command: `hope bench --quick --device cpu" in text
    assert f"torch {torch.__version__}" in text
    assert "| learning on >= 0.7 x learning off, one session |" in text
    assert "| 1 | " in text and "| memory | " in text and "| sqlite | " in text
    data = json.loads(js.read_text())
    assert data["engine"]["single"]["learn_on"] > 0
    assert data["baselines"]["rows"][0]["tokens_per_s"] > 0
    assert any(r["method"] == "kv_loop_narrow" and r["tokens_per_s"] > 0 for r in data["baselines"]["rows"])
    assert data["arithmetic"]["hope_on"] > data["arithmetic"]["hope_off"] > 0
    assert "| plain KV loop | " in text and "| 1 | " in text.split("## Arithmetic per token")[1]
    assert data["failed"] == {}
    if data["engine"]["concurrency"]:  # the scheduler is there
        assert "## Concurrent sessions" in text
        assert [r["sessions"] for r in data["engine"]["concurrency"]] == [1, 2]
        assert data["engine"]["narrow_one"]["step_s"] > 0
        assert "### Batch 1 before any arithmetic" in text


def test_quick_http_run_reports_the_engine_alone_beside_the_server(tiny: Path, tmp_path: Path) -> None:
    from bench import cli

    md, js = tmp_path / "benchmarks.md", tmp_path / "bench.json"
    cli.main(["--quick", "--device", "cpu", "--checkpoint", str(tiny), "--only", "http", "--levels", "1,2",
              "--threads", "1", "--write", str(md), "--json", str(js)])
    text = md.read_text()
    assert "## HTTP serving with Poisson arrivals" in text
    assert "### The same requests on the engine alone" in text
    data = json.loads(js.read_text())
    assert data["failed"] == {}
    assert [r["concurrency"] for r in data["http"]["levels"]] == [1, 2]
    assert [r["concurrency"] for r in data["http"]["engine_alone"]] == [1, 2]
    # quick: 16 tokens a request, at least 4 requests a level, every one of them served
    assert all(r["output_tokens"] == r["requests"] * 16 for r in data["http"]["engine_alone"])
    assert all(r["output_tokens"] == r["requests"] * 16 and r["errors"] == 0 for r in data["http"]["levels"])


def test_a_relative_checkpoint_is_found_from_where_the_command_runs(tiny: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The HTTP part's processes run from the repository's root: a relative --checkpoint must
    still name the directory below where `hope bench` was started."""
    from bench import cli

    monkeypatch.chdir(tmp_path)
    relative = os.path.relpath(tiny, tmp_path)
    assert not Path(relative).is_absolute() and not (http_load.ROOT / relative).exists()
    cli.main(["--quick", "--device", "cpu", "--checkpoint", relative, "--only", "http", "--levels", "1",
              "--threads", "1", "--json", "bench.json"])
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["failed"] == {}
    assert [r["concurrency"] for r in data["http"]["engine_alone"]] == [1]
    assert [(r["concurrency"], r["errors"]) for r in data["http"]["levels"]] == [(1, 0)]


@pytest.mark.parametrize("only", ["state_io", "http"])
def test_a_bad_checkpoint_is_one_line_before_any_part(only: str, tiny: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Not the same failure reported by every part, exit 1: `hope bench: error: ...`, exit 2."""
    from hope import cli

    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (bad / name).write_bytes((tiny / name).read_bytes())
    (bad / "model.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "--quick", "--device", "cpu", "--checkpoint", str(bad), "--only", only,
                  "--json", str(tmp_path / "bench.json")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"hope bench: error: {bad}: not a HOPE checkpoint: model.safetensors is empty"
    assert not (tmp_path / "bench.json").exists()


@pytest.mark.parametrize("device, says", [("bogus", "not a device; use cpu, cuda or cuda:N"),
                                          ("cuda", "CUDA is not available on this machine")])
def test_a_device_this_machine_lacks_is_one_line(device: str, says: str, tiny: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from hope import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "--quick", "--device", device, "--checkpoint", str(tiny), "--only", "state_io",
                  "--json", str(tmp_path / "bench.json")])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == f"hope bench: error: --device {device}: {says}"
