"""Checkpoints: save/load round trip, fingerprint, refusals."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from hope_testkit import (
    assert_states_equal,
    make_model,
    random_tokens,
    tiny_config,
    tokenizer,
)

from hope_core.checkpoint import CONFIG, TOKENIZER, WEIGHTS, Checkpoint, load_checkpoint, save_checkpoint
from hope_core.engine import Engine
from hope_core.model import HopeLM
from hope_core.state import StateError


@pytest.fixture
def model() -> HopeLM:
    return make_model(tiny_config(), seed=3)


def _outputs(engine: Engine):
    s = engine.new_session()
    r = engine.absorb(s, random_tokens(2 * engine.cfg.mid_period + 3, 4))
    return r.logprobs, s.state, engine.next_logits(s)


def test_round_trip_reproduces_weights_and_outputs(model, tmp_path):
    fp = save_checkpoint(tmp_path / "ck", model, tokenizer(), training={"steps": 5})
    ck = load_checkpoint(tmp_path / "ck")
    assert ck.fingerprint == fp
    assert ck.model.cfg == model.cfg
    assert ck.meta["training"] == {"steps": 5}
    assert ck.tokenizer.to_str() == tokenizer().to_str()
    loaded = ck.model.state_dict()
    assert loaded.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded[k], v), k
    assert not ck.model.training and not any(p.requires_grad for p in ck.model.parameters())

    # the served outputs equal those of the in-memory model
    direct = Engine(Checkpoint(model, tokenizer(), fp, tmp_path / "ck"))
    lp_a, st_a, logits_a = _outputs(direct)
    lp_b, st_b, logits_b = _outputs(Engine(ck))
    assert lp_a == lp_b
    assert torch.equal(logits_a, logits_b)
    assert_states_equal(st_a, st_b, what="same weights, same state")


def test_checkpoint_directory_layout(model, tmp_path):
    save_checkpoint(tmp_path / "ck", model, tokenizer())
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == sorted([WEIGHTS, CONFIG, TOKENIZER])
    meta = json.loads((tmp_path / "ck" / CONFIG).read_text())
    assert meta["model"] == model.cfg.to_dict()
    ck = load_checkpoint(tmp_path / "ck")
    assert ck.name == f"hope-ck-{ck.fingerprint[:8]}"


def test_fingerprint_is_stable_and_tracks_weights_and_config(model, tmp_path):
    fp1 = save_checkpoint(tmp_path / "a", model, tokenizer())
    fp2 = save_checkpoint(tmp_path / "b", model, tokenizer())
    assert fp1 == fp2, "the same weights and config must have the same fingerprint"
    assert load_checkpoint(tmp_path / "a").fingerprint == load_checkpoint(tmp_path / "b").fingerprint

    with torch.no_grad():
        model.blocks[1].titans.a0.view(-1)[7] += 1e-6  # one element, barely
    fp3 = save_checkpoint(tmp_path / "c", model, tokenizer())
    assert fp3 != fp1

    other = make_model(tiny_config(), seed=4)
    assert save_checkpoint(tmp_path / "d", other, tokenizer()) != fp1

    # a serving-time config override is another model: another fingerprint
    base = load_checkpoint(tmp_path / "a")
    faster = load_checkpoint(tmp_path / "a", overrides={"lr_fast": 0.5})
    assert faster.model.cfg.lr_fast == 0.5
    assert faster.fingerprint != base.fingerprint
    same = load_checkpoint(tmp_path / "a", overrides={"lr_fast": base.model.cfg.lr_fast})
    assert same.fingerprint == base.fingerprint


def test_state_of_an_overridden_config_is_refused(model, tmp_path):
    save_checkpoint(tmp_path / "a", model, tokenizer())
    base = Engine(load_checkpoint(tmp_path / "a"))
    faster = Engine(load_checkpoint(tmp_path / "a", overrides={"lr_fast": 0.5}))
    blob = base.new_session().to_bytes()
    with pytest.raises(StateError):
        faster.load_session(blob)


def test_missing_checkpoint_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "does-not-exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "empty")


def test_unknown_config_keys_are_refused(model, tmp_path):
    save_checkpoint(tmp_path / "a", model, tokenizer())
    with pytest.raises(ValueError):
        load_checkpoint(tmp_path / "a", overrides={"no_such_field": 1})


def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    small = make_model(tiny_config(vocab_size=64), seed=0)
    save_checkpoint(tmp_path / "s", small, tokenizer())
    with pytest.raises(ValueError, match="tokenizer"):
        load_checkpoint(tmp_path / "s")


class _Boom:
    executed = False

    def __reduce__(self):
        return (_mark, ())


def _mark():
    _Boom.executed = True
    return {}


def test_weights_are_never_unpickled(model, tmp_path):
    save_checkpoint(tmp_path / "a", model, tokenizer())
    (tmp_path / "a" / WEIGHTS).write_bytes(pickle.dumps({"x": _Boom()}))
    with pytest.raises(Exception):  # noqa: B017 - any refusal will do, as long as nothing runs
        load_checkpoint(tmp_path / "a")
    assert not _Boom.executed
