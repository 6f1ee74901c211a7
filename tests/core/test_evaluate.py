"""`hope eval` at its edges: data it cannot use is a one-line error, not a crash after the work."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hope_testkit import make_engine, make_model, tiny_config

from hope import cli
from hope_core import data
from hope_core.checkpoint import WEIGHTS, load_checkpoint, save_checkpoint
from hope_core.engine import Engine
from hope_core.evaluate import ABLATIONS, EvalConfig, evaluate, markdown
from hope_core.tokenizer import train_tokenizer


def test_eval_on_held_out_text_too_short_for_a_window_says_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for source in EvalConfig().sources:
        data.TokenStream.from_tokens(np.arange(5, 300, dtype=np.uint16)).save(tmp_path / f"{source}-heldout.npy")
    with pytest.raises(SystemExit) as info:
        cli.main(["eval", "--token-dir", str(tmp_path), "--quick", "--no-ablations"])
    assert info.value.code == 2
    assert "no window of" in capsys.readouterr().err


# ---- a bad checkpoint, device or data source: one line, exit 2 ---------------------------------

ROOT = Path(__file__).resolve().parents[2]


def test_eval_of_a_bad_checkpoint_is_one_line(engine_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(engine_dir, bad)
    (bad / WEIGHTS).write_bytes((bad / WEIGHTS).read_bytes()[:1000])  # a copy cut short
    r = subprocess.run([sys.executable, "-m", "hope.cli", "eval", "--quick", "--checkpoint", str(bad)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "HOPE_DEBUG": ""})
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"hope eval: error: {bad}: not a HOPE checkpoint: "), r.stderr


@pytest.mark.parametrize("device, says", [("bogus", "not a device"), ("cuda", "CUDA is not available")])
def test_eval_on_a_device_this_machine_lacks_is_one_line(device: str, says: str, engine_dir: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as info:
        cli.main(["eval", "--quick", "--checkpoint", str(engine_dir), "--device", device])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == f"hope eval: error: --device {device}: {says}" + \
        (" on this machine" if device == "cuda" else "; use cpu, cuda or cuda:N")


def test_eval_without_the_data_packages_says_how_to_install_them(engine_dir: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """What a new machine hits first: the Debian docs package is not installed."""
    monkeypatch.setattr(data, "python_docs", functools.partial(data.python_docs, tmp_path / "no-docs"))
    with pytest.raises(SystemExit) as info:
        cli.main(["eval", "--quick", "--checkpoint", str(engine_dir), "--cache-dir", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hope eval: error: no Python docs under") and "\n" not in err
    assert "apt-get install python3.11-doc" in err


# ---- --compare and --set ---------------------------------------------------------------------

SMALL = EvalConfig(window_tokens=48, windows_per_source=1, passage_tokens=8, distractor_tokens=24, passages=2,
                   decode_tokens=4)
TWO = {k: ABLATIONS[k] for k in ("full", "slow_only")}


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokens")
    for source in EvalConfig().sources:
        data.TokenStream.from_tokens(np.arange(5, 300, dtype=np.uint16)).save(path / f"{source}-heldout.npy")
    return path


def _evaluate(engine: Engine, compare: Engine | None, token_dir: Path, **kw) -> dict:
    return evaluate(engine, SMALL, token_dir, compare, log=lambda *a: None, token_dir=token_dir,
                    ablations_to_run=TWO, **kw)


def test_compare_row_is_labelled_by_what_it_is(engine: Engine, tmp_path: Path, token_dir: Path) -> None:
    plain = make_engine(tmp_path / "plain", tiny_config(self_modifying=False))
    other = make_engine(tmp_path / "sibling", tiny_config(), seed=5)  # self-modifying too: not "plain"
    r = _evaluate(engine, plain, token_dir)
    assert list(r["ablations"]) == ["full", "slow_only", "plain_titans"]
    assert r["ablations"]["plain_titans"]["checkpoint"] == str(tmp_path / "plain")
    r = _evaluate(engine, other, token_dir)
    assert list(r["ablations"]) == ["full", "slow_only", "compare: sibling"]
    row = r["ablations"]["compare: sibling"]
    assert row["fingerprint"] == other.fingerprint
    assert f"| compare: sibling (`{tmp_path / 'sibling'}`, `{other.fingerprint[:16]}`) | " in markdown(r)


def test_compare_with_another_tokenizer_is_refused(engine_dir: Path, tmp_path: Path, token_dir: Path,
                                                   engine: Engine, capsys: pytest.CaptureFixture) -> None:
    texts = ["the quick brown fox jumps over the lazy dog"] * 20
    save_checkpoint(tmp_path / "foreign", make_model(tiny_config()), train_tokenizer(texts, vocab_size=300))
    with pytest.raises(ValueError, match="tokenizer differs"):
        _evaluate(engine, Engine(load_checkpoint(tmp_path / "foreign")), token_dir)
    with pytest.raises(SystemExit) as info:  # the command says so before any evaluation
        cli.main(["eval", "--checkpoint", str(engine_dir), "--compare", str(tmp_path / "foreign"),
                  "--token-dir", str(token_dir)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hope eval: error: --compare {tmp_path / 'foreign'}: its tokenizer differs")


def test_set_overrides_are_recorded(engine_dir: Path, token_dir: Path) -> None:
    engine = Engine(load_checkpoint(engine_dir, overrides={"lr_fast": 0.05}))
    r = _evaluate(engine, None, token_dir, overrides={"lr_fast": 0.05})
    assert json.loads(json.dumps(r))["overrides"] == {"lr_fast": 0.05}
    assert "Config overrides (`--set`, this checkpoint only): `lr_fast=0.05`." in markdown(r)
    plain = _evaluate(engine, None, token_dir)
    assert plain["overrides"] == {} and "overrides" not in markdown(plain)


def test_set_of_an_unknown_field_is_one_line(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["eval", "--set", "lr_fats=0.05"])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == "hope eval: error: --set lr_fats=0.05: HopeConfig has no field 'lr_fats'"
