"""`hope train` end to end on a tiny config: it learns, saves a servable checkpoint, resumes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from hope_core import data, train
from hope_core.checkpoint import load_checkpoint, save_checkpoint
from hope_core.engine import Engine
from hope_core.model import HopeConfig, HopeLM
from hope_core.state import SessionState
from hope_core.tokenizer import HopeTokenizer

TINY = HopeConfig(d_model=32, n_layers=2, n_heads=2, window=32, chunk=16, mid_period=32, mem_hidden=8,
                  slow_hidden=64, mid_hidden=16, fast_hidden=8)


@pytest.fixture
def tiny_streams(monkeypatch: pytest.MonkeyPatch):
    """Replace the corpus with a small repetitive token stream (no system packages needed)."""
    rng = np.random.default_rng(0)
    phrases = [rng.integers(5, 400, size=24) for _ in range(8)]
    tokens = np.concatenate([np.concatenate([[0], phrases[i % 8]]) for i in range(600)]).astype(np.uint16)
    stream = data.TokenStream.from_tokens(tokens)

    def fake(tc: train.TrainConfig, tokenizer: HopeTokenizer, split: str, window: int | None = None
             ) -> data.MixtureStream:
        return data.MixtureStream({"toy": stream}, {"toy": 1.0})

    monkeypatch.setattr(train, "build_streams", fake)


def test_train_learns_saves_and_resumes(tmp_path: Path, tiny_streams: None) -> None:
    tc = train.TrainConfig(out_dir=str(tmp_path / "run"), seq_len=64, batch_size=4, steps=12, lr=3e-3,
                           warmup_steps=2, eval_every=6, eval_batches=1, log_every=3, device="cpu")
    torch.manual_seed(0)
    ckpt_dir = train.train(TINY, tc)
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    log = [r for r in lines if "loss" in r]
    assert [r["step"] for r in log] == [3, 6, 9, 12]
    assert lines[-1].keys() == {"step", "heldout_loss"}  # the final evaluation, added to step 12's line
    assert log[-1]["loss"] < log[0]["loss"]  # a repetitive stream is learnable in 12 steps
    assert all(r["tokens_per_s"] > 0 and "eta_s" in r for r in log)

    ckpt = load_checkpoint(ckpt_dir)
    assert ckpt.meta["training"]["steps"] == 12
    engine = Engine(ckpt)
    session = engine.new_session()
    assert len(engine.absorb(session, [5, 6, 7]).logprobs) == 3

    # resume continues from step 12 with the optimizer state, it does not start over
    before = {k: v.clone() for k, v in ckpt.model.state_dict().items()}
    tc.steps = 15
    train.train(TINY, tc, resume=True)
    progress = json.loads((tmp_path / "run" / "progress.json").read_text())
    assert progress["step"] == 15
    after = load_checkpoint(ckpt_dir).model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_a_run_stopped_by_its_time_budget_ends_its_curve(tmp_path: Path, tiny_streams: None) -> None:
    """The budget stops a run between two logged steps: its last step and final held-out loss
    still end the log, so that --summary prints the run's end."""
    tc = train.TrainConfig(out_dir=str(tmp_path / "run"), seq_len=64, batch_size=4, steps=10_000,
                           max_minutes=0.002, eval_every=5000, eval_batches=1, log_every=5000, device="cpu")
    train.train(TINY, tc)
    steps = json.loads((tmp_path / "run" / "progress.json").read_text())["step"]
    assert 0 < steps < 5000
    table = train.summarize(tmp_path / "run", every=5000).splitlines()
    assert len(table) == 3 and table[-1].startswith(f"| {steps} (end) |")
    best = json.loads((tmp_path / "run" / "best" / "config.json").read_text())["training"]
    assert float(table[-1].split("|")[4]) == pytest.approx(best["heldout_loss"], abs=1e-3)
    assert best["last_loss"] is not None


def test_lr_schedule_warms_up_then_decays_by_steps_or_time() -> None:
    tc = train.TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert train.lr_at(tc, 0, 0) == pytest.approx(0.1)
    assert train.lr_at(tc, 10, 0) == pytest.approx(1.0)
    assert train.lr_at(tc, 100, 0) == pytest.approx(0.1)
    tc.max_minutes = 1.0  # half the time gone is half the schedule, whatever the step
    assert train.lr_at(tc, 20, 30) == pytest.approx(0.55)  # time says half, steps say 1/9
    # the time budget's decay counts from the end of the warm-up, as the steps' does: no drop there
    assert train.lr_at(tc, 10, 12, warmup_s=12) == pytest.approx(1.0)
    assert train.lr_at(tc, 20, 36, warmup_s=12) == pytest.approx(0.55)  # half of the 48 s left


def test_config_file_rejects_unknown_keys(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("[model]\nd_model = 64\n[train]\nsteps = 3\n")
    cfg, tc = train.load_config(p)
    assert cfg.d_model == 64 and tc.steps == 3
    p.write_text("[train]\nstepz = 3\n")
    with pytest.raises(ValueError, match="stepz"):
        train.load_config(p)
    p.write_text("[model]\nwidth = 3\n")
    with pytest.raises(ValueError, match="width"):
        train.load_config(p)


def test_pretraining_forward_matches_serving(tmp_path: Path) -> None:
    """The loss pre-training optimises is the loss the engine sees when absorbing the same text."""
    torch.manual_seed(0)
    model = HopeLM(TINY)
    x = torch.randint(5, 400, (1, 65))
    nll = model(x[:, :-1], x[:, 1:]).detach()
    save_checkpoint(tmp_path, model, HopeTokenizer.default())
    engine = Engine(load_checkpoint(tmp_path))
    session = SessionState(engine.model.init_state(1), engine.fingerprint)
    engine.absorb(session, [int(x[0, 0])])
    lps = engine.absorb(session, x[0, 1:].tolist()).logprobs
    assert torch.allclose(-torch.tensor(lps), nll[0], atol=1e-4)


def test_packed_token_streams_train_without_the_sources(tmp_path: Path) -> None:
    """`--export-tokens` writes `{source}-{split}.npy`; `token_dir` trains from them alone (a GPU
    machine without the Debian sources or network), and the run keeps its best checkpoint."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(5, 400, size=20_000).astype(np.uint16)
    tokens[::50] = 0
    for split in ("train", "heldout"):
        for source in ("toy", "synthetic"):
            data.TokenStream.from_tokens(tokens).save(tmp_path / "tokens" / f"{source}-{split}.npy")
    tc = train.TrainConfig(out_dir=str(tmp_path / "run"), seq_len=384, batch_size=2, steps=4, warmup_steps=1,
                           eval_every=2, eval_batches=1, log_every=2, device="cpu",
                           sources={"toy": 0.5, "synthetic": 0.3, "reread": 0.2},
                           token_dir=str(tmp_path / "tokens"))
    train.train(TINY, tc)
    best = load_checkpoint(tmp_path / "run" / "best")
    assert best.meta["training"]["heldout_loss"] > 0
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert min(r["heldout_loss"] for r in log if "heldout_loss" in r) >= best.meta["training"]["heldout_loss"] - 1e-9


def test_session_level_initial_weights_get_their_own_learning_rate() -> None:
    model = HopeLM(TINY)
    tc = train.TrainConfig(lr=1e-3, session_init_lr_scale=0.1)
    opt = train.make_optimizer(model, tc)
    train.set_lr(opt, 2e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        init = [train.session_init(names[id(p)]) for p in group["params"]]
        assert all(init) or not any(init)
        assert group["lr"] == pytest.approx(2e-4 if init[0] else 2e-3)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert any(train.session_init(n) for n in names.values())


def _tiny_run(tmp_path: Path, name: str = "run", **overrides) -> train.TrainConfig:
    return train.TrainConfig(**({"out_dir": str(tmp_path / name), "seq_len": 64, "batch_size": 4, "steps": 6,
                                 "lr": 3e-3, "warmup_steps": 2, "eval_every": 3, "eval_batches": 1, "log_every": 1,
                                 "device": "cpu"} | overrides))


def test_a_run_directory_is_never_written_over(tmp_path: Path, tiny_streams: None) -> None:
    tc = _tiny_run(tmp_path, steps=3)
    train.train(TINY, tc)
    weights = (tmp_path / "run" / "checkpoint" / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="not empty"):
        train.train(TINY, tc)  # a new run, no --resume
    with pytest.raises(ValueError, match="another model"):
        train.train(HopeConfig(**(TINY.to_dict() | {"mid_hidden": 8})), tc, resume=True)
    with pytest.raises(ValueError, match="no run to resume"):
        train.train(TINY, _tiny_run(tmp_path, "empty"), resume=True)
    assert (tmp_path / "run" / "checkpoint" / "model.safetensors").read_bytes() == weights


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path: Path, tiny_streams: None) -> None:
    """The same batches and optimizer state: stopping at step 3 and resuming to 6 ends in the
    weights of 6 steps in one go; the best point so far is kept, not reset."""
    torch.manual_seed(0)
    train.train(TINY, _tiny_run(tmp_path, "whole"))
    torch.manual_seed(0)
    tc = _tiny_run(tmp_path, "halves", steps=3)
    train.train(TINY, tc)
    best = json.loads((tmp_path / "halves" / "best" / "config.json").read_text())["training"]["heldout_loss"]
    tc.steps = 6
    train.train(TINY, tc, resume=True)
    whole = load_checkpoint(tmp_path / "whole" / "checkpoint").model.state_dict()
    halves = load_checkpoint(tmp_path / "halves" / "checkpoint").model.state_dict()
    assert all(torch.equal(whole[k], halves[k]) for k in whole)
    kept = json.loads((tmp_path / "halves" / "best" / "config.json").read_text())["training"]["heldout_loss"]
    assert kept <= best


def test_sigint_stops_after_the_step_and_saves_the_run(tmp_path: Path, tiny_streams: None) -> None:
    tc = _tiny_run(tmp_path, steps=100000, eval_every=0)
    log = tmp_path / "run" / "log.jsonl"

    def interrupt_once_training() -> None:
        deadline = time.monotonic() + 60
        while not log.is_file() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_once_training, daemon=True).start()
    with pytest.raises(train.Interrupted, match="--resume") as info:
        train.train(TINY, tc)
    assert info.value.signum == signal.SIGINT
    progress = json.loads((tmp_path / "run" / "progress.json").read_text())
    assert 1 <= progress["step"] < 100000
    assert load_checkpoint(tmp_path / "run" / "checkpoint").meta["training"]["steps"] == progress["step"]


def test_a_save_cut_short_is_not_resumed(tmp_path: Path, tiny_streams: None,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A save is several files: a process killed between them leaves weights of one step beside
    the optimizer state of another. Resuming that would silently train a different run."""
    real = train.save_trainer_state

    def die_at_step_6(path: Path, opt, progress: dict) -> None:
        if progress["step"] == 6:
            raise SystemExit("killed between the checkpoint and the trainer state")
        real(path, opt, progress)

    monkeypatch.setattr(train, "save_trainer_state", die_at_step_6)
    with pytest.raises(SystemExit):
        train.train(TINY, _tiny_run(tmp_path, steps=9))
    monkeypatch.setattr(train, "save_trainer_state", real)
    with pytest.raises(ValueError, match=r"cut short .*checkpoint at step 6.*trainer\.safetensors at step 3"):
        train.train(TINY, _tiny_run(tmp_path, steps=9), resume=True)


def test_a_signal_during_a_save_waits_for_the_whole_save(tmp_path: Path, tiny_streams: None,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while the final save is being written (the loop's handlers are gone by then)
    stops the run once every file of the save is written."""
    real = train.save_checkpoint

    def save_then_interrupt(path: Path, *args, **kwargs):
        fingerprint = real(path, *args, **kwargs)
        if path.name == "checkpoint":
            os.kill(os.getpid(), signal.SIGINT)
        return fingerprint

    monkeypatch.setattr(train, "save_checkpoint", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train.train(TINY, _tiny_run(tmp_path, steps=3, eval_every=0))
    steps = train.saved_steps(tmp_path / "run")
    assert set(steps) == {"progress.json", "checkpoint", "trainer.safetensors", "sampler.safetensors"}
    assert set(steps.values()) == {3}


def test_a_resumed_run_keeps_its_own_settings(tmp_path: Path, tiny_streams: None) -> None:
    """`hope train --out X --resume` (the command an interrupted run prints) continues with the
    settings the run was started with, the command line's --steps included; a --config whose
    [train] differs is refused rather than silently changing the run."""
    config = tmp_path / "tiny.toml"
    model = "\n".join(f"{k} = {json.dumps(v)}" for k, v in TINY.to_dict().items())
    train_table = 'seq_len = 64\nbatch_size = 2\nsteps = 40\nwarmup_steps = 1\neval_every = 0\nlog_every = 1\n'
    config.write_text(f"[model]\n{model}\n[train]\n{train_table}device = \"cpu\"\n")
    run = tmp_path / "run"
    train.main(["--config", str(config), "--out", str(run), "--steps", "3"])
    train.main(["--out", str(run), "--resume"])  # at its 3 steps already: nothing more to do
    assert json.loads((run / "progress.json").read_text())["step"] == 3
    with pytest.raises(ValueError, match=r"other \[train\] settings \(steps\)"):
        train.main(["--config", str(config), "--out", str(run), "--resume"])
    train.main(["--out", str(run), "--resume", "--steps", "5"])  # a longer run, asked for
    assert json.loads((run / "progress.json").read_text())["step"] == 5
    kept = load_checkpoint(run / "checkpoint").meta["training"]["train_config"]
    assert (kept["steps"], kept["batch_size"], kept["out_dir"]) == (5, 2, str(run))


def test_a_run_stopped_before_its_first_save_starts_over(tmp_path: Path, tiny_streams: None) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    with pytest.raises(ValueError, match="before its first save"):
        train.train(TINY, _tiny_run(tmp_path, steps=2), resume=True)
    train.train(TINY, _tiny_run(tmp_path, steps=2))
    first = json.loads((run / "log.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["loss"] != 9.0  # the old log went with the run that never saved
    assert json.loads((run / "progress.json").read_text())["step"] == 2


def test_config_values_of_the_wrong_type_or_range_are_refused(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    for text, match in (('[model]\nself_modifying = "false"\n', "self_modifying"),
                        ("[model]\nd_model = 32.0\n", "d_model"),
                        ('[train]\nsteps = "ten"\n', "steps"),
                        ("[train]\nbatch_size = 0\n", "batch_size"),
                        ("[train]\nseq_len = 60\n", "multiple"),
                        ("[trian]\nsteps = 3\n", "unknown tables"),
                        ("[model]\nd_model = 30\nn_heads = 2\n", "even"),  # rotary pairs
                        ("[model]\nchunk = 1\nwindow = 16\nmid_period = 16\n", "at least 2"),
                        ("[model]\nmid_period = 0\n", "at least one chunk"),
                        ("[train.sources]\nshakespear = 1.0\n", "unknown sources"),
                        ("[train]\ngrad_clip = 0\n", "no clipping"),  # 0 would zero every gradient
                        ("[train]\ngrad_clip = -1.0\n", "grad_clip"),  # -1 would flip them
                        ("[train]\nlr = nan\n", "lr"),
                        ("[train]\nmin_lr_ratio = 5.0\n", "min_lr_ratio"),
                        ("[train]\nweight_decay = -1.0\n", "weight_decay"),
                        ("[train]\nsession_init_lr_scale = -0.5\n", "session_init_lr_scale"),
                        ("[train.sources]\nfortunes = nan\n", "non-negative")):
        p.write_text(text)
        with pytest.raises(ValueError, match=match):
            train.load_config(p)
    with pytest.raises(ValueError, match="steps"):
        train.main(["--steps", "0", "--out", str(tmp_path / "zero")])
    for minutes in ("-1", "nan"):  # the command line is checked as the config is
        with pytest.raises(ValueError, match="max_minutes"):
            train.main(["--max-minutes", minutes, "--out", str(tmp_path / "zero")])
    assert not (tmp_path / "zero").exists()


def test_bad_arguments_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from hope import cli

    (tmp_path / "bad.toml").write_text("[model]\nd_model = 32.0\n")
    for argv in (["train", "--config", str(tmp_path / "missing.toml")],
                 ["train", "--config", str(tmp_path / "bad.toml")],
                 ["train", "--device", "bogus", "--out", str(tmp_path / "dev")],
                 ["eval", "--set", "key_shift=ture"], ["bench", "--levels", "a,b"]):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"hope {argv[0]}: error: ") and "\n" not in err, err



def test_eval_every_need_not_be_a_multiple_of_log_every(tmp_path: Path, tiny_streams: None) -> None:
    tc = train.TrainConfig(out_dir=str(tmp_path / "run"), seq_len=64, batch_size=2, steps=12, warmup_steps=1,
                           eval_every=3, eval_batches=1, log_every=2, device="cpu")
    train.train(TINY, tc)
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in lines if "heldout_loss" in r}) == [3, 6, 9, 12]


def test_reread_rows_keep_the_first_reading_out_of_the_window() -> None:
    """A token of the second reading must not attend to its copy in the first: passages are at
    most seq_len - window tokens, and a sequence with no room for one is refused up front."""
    rng = np.random.default_rng(0)
    stream = data.TokenStream.from_tokens(rng.integers(5, 400, size=5000).astype(np.uint16))
    reread = data.RereadStream([stream], window=256)
    assert reread.passage_range(384) == (64, 128)
    rows = reread.sample_batch(20, 384, torch.Generator().manual_seed(0))
    for row in rows:  # the passage p is the row's prefix repeated at its end
        p = next(n for n in range(64, 129) if torch.equal(row[:n], row[-n:]) and n <= 128)
        assert 385 - p > 256
    with pytest.raises(ValueError, match="seq_len"):
        data.RereadStream([stream], window=256).passage_range(300)


class _CpuCudaGraph:
    """Stand-ins for the CUDA calls of `train.capture_step`, so that its warm-up and capture run
    on the CPU: streams order nothing, and "capturing" runs the step eagerly (the worst case: a
    real capture records the step without running it). `fail` makes the capture raise."""

    def __init__(self, fail: bool) -> None:
        self.fail = fail

    def wait_stream(self, other: object) -> None:
        pass

    @contextlib.contextmanager
    def capture(self, graph: object) -> Iterator[None]:
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        yield

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(torch.cuda, "Stream", lambda: self)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda: self)
        monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
        monkeypatch.setattr(torch.cuda, "graph", self.capture)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)


@pytest.mark.parametrize("how", ["captured", "capture fails", "resumed, then captured"])
def test_capturing_the_training_step_moves_no_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      how: str) -> None:
    """The warm-up before a CUDA graph capture takes a real optimizer step that the loop does
    not count: the weights and the optimizer state (its step counts too) must be as they were,
    or a `cuda_graph` run ends elsewhere than its eager twin and than itself stopped and resumed."""
    torch.manual_seed(0)
    tc = train.TrainConfig(lr=3e-3)
    model = HopeLM(TINY)
    opt = train.make_optimizer(model, tc)
    batch = torch.randint(5, 400, (2, 33))

    def train_step() -> torch.Tensor:  # as `train.train` builds it
        loss = model(batch[:, :-1], batch[:, 1:]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        return loss.detach()

    for _ in range(3):  # the eager steps before the capture
        opt.zero_grad(set_to_none=True)
        train_step()
    if how == "resumed, then captured":  # the resume point's weights and state, then one step
        train.save_trainer_state(tmp_path, opt, {"step": 3})
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        model = HopeLM(TINY)
        model.load_state_dict(weights)
        opt = train.make_optimizer(model, tc)
        train.load_trainer_state(tmp_path, opt)
        opt.zero_grad(set_to_none=True)
        train_step()
    before = [p.detach().clone() for p in model.parameters()]
    state_before = {i: {k: v.clone() for k, v in st.items()} for i, st in opt.state_dict()["state"].items()}
    _CpuCudaGraph(fail=how == "capture fails").install(monkeypatch)
    graph, _ = train.capture_step(train_step, opt, rank=0)
    assert (graph is None) == (how == "capture fails")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    state_after = opt.state_dict()["state"]
    assert state_after.keys() == state_before.keys()
    for i, st in state_before.items():
        assert all(torch.equal(v, state_after[i][k]) for k, v in st.items()), i
