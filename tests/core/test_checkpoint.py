"""Checkpoints: save/load round trip, fingerprint, refusals."""

from __future__ import annotations

import json
import os
import pickle
import re
import stat

import pytest
import safetensors.torch
import torch
from hope_testkit import (
    assert_states_equal,
    make_model,
    random_tokens,
    tiny_config,
    tokenizer,
)

from hope_core.checkpoint import (
    CONFIG,
    TOKENIZER,
    WEIGHTS,
    Checkpoint,
    check_device,
    load_checkpoint,
    save_checkpoint,
)
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


# ---- files anyone may read, and one-line refusals of what is not a checkpoint ------------------

@pytest.fixture
def umask():
    """`umask(value)` sets the process's umask for the test; the old one is put back after."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


def test_checkpoint_files_get_the_usual_mode(model, tmp_path, umask):
    """Not the 0o600 of safetensors' `save_file`: a checkpoint one user trained (or that was
    copied into the image, whose runtime user is another) must be readable by the others."""
    umask(0o022)
    save_checkpoint(tmp_path / "ck", model, tokenizer())
    save_checkpoint(tmp_path / "ck", model, tokenizer())  # replacing files gives them the mode too
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "ck").iterdir()}
    assert modes == {WEIGHTS: 0o644, CONFIG: 0o644, TOKENIZER: 0o644}
    umask(0o077)  # the umask is honoured, as `open()` honours it
    save_checkpoint(tmp_path / "private", model, tokenizer())
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "private").iterdir()} == {0o600}


def _rewrite_weights(d, edit) -> None:
    tensors = safetensors.torch.load_file(d / WEIGHTS)
    edit(tensors)
    safetensors.torch.save_file(tensors, d / WEIGHTS)


def _drop_and_add(tensors) -> None:
    for k in sorted(tensors)[:3]:
        del tensors[k]
    tensors["bogus.weight"] = torch.zeros(2)


def _other_weights(d, cfg) -> None:
    """The weights of a model of `cfg`, under the config (and tokenizer) that was there."""
    save_checkpoint(d / "other", make_model(cfg), tokenizer())
    (d / "other" / WEIGHTS).replace(d / WEIGHTS)


def _config_field(d, **fields) -> None:
    meta = json.loads((d / CONFIG).read_text())
    meta["model"] |= fields
    (d / CONFIG).write_text(json.dumps(meta))


BAD_CHECKPOINTS = {
    # case: (how to spoil a good checkpoint directory, what the reason must say)
    "truncated weights": (lambda d: (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes()[:1000]), WEIGHTS),
    "weights cut short at the end": (lambda d: (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes()[:-64]), WEIGHTS),
    "pickle renamed": (lambda d: (d / WEIGHTS).write_bytes(pickle.dumps({"w": torch.zeros(2)})), WEIGHTS),
    "empty weights": (lambda d: (d / WEIGHTS).write_bytes(b""), "empty"),
    "another model's weights": (lambda d: _other_weights(d, tiny_config(d_model=48)), "embed.weight"),
    "plain Titans weights": (lambda d: _other_weights(d, tiny_config(self_modifying=False)), "missing"),
    "missing and unexpected tensors": (lambda d: _rewrite_weights(d, _drop_and_add), "3 missing"),
    "config without model": (lambda d: (d / CONFIG).write_text('{"training": {}}'), '"model"'),
    "config not JSON": (lambda d: (d / CONFIG).write_text("{model: nope"), CONFIG),
    "config not UTF-8": (lambda d: (d / CONFIG).write_bytes(b"\xff\xfe\x00"), CONFIG),
    "config of the wrong type": (lambda d: _config_field(d, d_model="wide"), "d_model"),
    "config with an unknown field": (lambda d: _config_field(d, d_modle=32), "d_modle"),
    "config that cannot be": (lambda d: _config_field(d, chunk=3), "chunk"),
    "tokenizer garbage": (lambda d: (d / TOKENIZER).write_text("garbage"), TOKENIZER),
    "tokenizer of another kind": (lambda d: (d / TOKENIZER).write_text('{"version": "1.0"}'), TOKENIZER),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_a_bad_checkpoint_is_one_short_value_error(model, tmp_path, case):
    spoil, reason = BAD_CHECKPOINTS[case]
    d = tmp_path / "ck"
    save_checkpoint(d, model, tokenizer())
    spoil(d)
    with pytest.raises(ValueError) as info:
        load_checkpoint(d)
    message = str(info.value)
    assert message.startswith(f"{d}: not a HOPE checkpoint: "), message
    assert reason in message, message
    assert "\n" not in message and len(message) < 300, message


def test_a_missing_file_names_it(model, tmp_path):
    save_checkpoint(tmp_path / "ck", model, tokenizer())
    (tmp_path / "ck" / TOKENIZER).unlink()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'ck'}: .*{TOKENIZER} is missing"):
        load_checkpoint(tmp_path / "ck")


def test_an_override_that_changes_the_shape_is_refused_as_such(model, tmp_path):
    save_checkpoint(tmp_path / "a", model, tokenizer())
    with pytest.raises(ValueError, match=r"overrides \['d_model'\] change the shape") as info:
        load_checkpoint(tmp_path / "a", overrides={"d_model": 64})
    assert len(str(info.value)) < 300


def test_check_device(monkeypatch):
    assert check_device("cpu") == "cpu"
    for bad, says in [("bogus", "not a device"), ("cuda:x", "not a device"), ("meta", "HOPE runs on cpu or cuda")]:
        with pytest.raises(ValueError, match=f"--device {re.escape(bad)}: {says}"):
            check_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check_device("auto") == "cpu"
    for name in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match=f"--device {name}: CUDA is not available on this machine"):
            check_device(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("auto") == "cuda"
    assert check_device("cuda:1") == "cuda:1"
    with pytest.raises(ValueError, match="--device cuda:2: this machine has 2 CUDA devices"):
        check_device("cuda:2")
