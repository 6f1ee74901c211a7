"""SessionState: bytes round trips, size accounting, and refusal of anything foreign or broken.

Every refusal must be a `StateError` (never another exception, never a silently accepted
state), and loading must never unpickle.
"""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from hope_testkit import (
    assert_states_equal,
    make_engine,
    make_model,
    random_tokens,
    state_diffs,
    tiny_config,
)
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from hope_core.state import FORMAT, SessionState, StateError


@pytest.fixture(scope="module")
def learned(engine):
    """A session that has learned (memories moved, mid gradient open, a partial chunk open)."""
    s = engine.new_session()
    engine.absorb(s, random_tokens(2 * engine.cfg.mid_period + engine.cfg.chunk + 2, 1))
    assert 0 < int(s.state.n_open[0]) < engine.cfg.chunk
    assert s.updates["mid"] >= 1 and s.updates["fast"] >= 4
    return s


def _header(blob: bytes) -> dict:
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + n])


def _rebuild(blob: bytes, tensors=None, meta=None) -> bytes:
    """Re-encode a state blob with some tensors / metadata replaced (None values delete)."""
    t = dict(st_load(blob))
    m = dict(_header(blob)["__metadata__"])
    for k, v in (tensors or {}).items():
        if v is None:
            t.pop(k)
        else:
            t[k] = v
    for k, v in (meta or {}).items():
        if v is None:
            m.pop(k)
        else:
            m[k] = v
    return st_save(t, metadata=m)


def _refused(engine, blob: bytes, match: str | None = None) -> StateError:
    with pytest.raises(StateError, match=match) as info:
        engine.load_session(blob)
    return info.value


# ---------------------------------------------------------------------------------------------
# round trips and size
# ---------------------------------------------------------------------------------------------

def test_fp32_round_trip_is_exact(engine, learned):
    s = SessionState(learned.state, learned.fingerprint, version=7)
    back = SessionState.from_bytes(s.to_bytes(), engine.model, engine.fingerprint)
    assert_states_equal(back.state, s.state, what="fp32 round trip")
    assert all(v.dtype == w.dtype for v, w in zip(back.state.tensors().values(),
                                                  s.state.tensors().values()))
    assert back.version == 7 and back.fingerprint == engine.fingerprint
    assert back.tokens_absorbed == learned.tokens_absorbed and back.updates == learned.updates
    # and it continues identically
    probe = random_tokens(engine.cfg.chunk + 3, 2)
    assert engine.absorb(back, probe).logprobs == engine.absorb(learned.copy(), probe).logprobs


def test_bf16_round_trip_rounds_floats_only(engine, learned):
    back = engine.load_session(learned.to_bytes("bfloat16"))
    orig = learned.state.tensors()
    for name, t in back.state.tensors().items():
        ref = orig[name]
        assert t.dtype == ref.dtype, name  # loaded back as the model's dtypes
        if ref.is_floating_point():
            assert torch.equal(t, ref.to(torch.bfloat16).float()), f"{name}: not bf16 rounding"
        else:
            assert torch.equal(t, ref), f"{name}: integer changed"
    diffs = state_diffs(back.state, learned.state)
    assert any(d > 0 for d in diffs.values()), "bf16 storage should not be bit-exact"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_nbytes_is_the_blob_size_minus_its_header(learned, dtype):
    blob = learned.to_bytes(dtype)
    header_len = int.from_bytes(blob[:8], "little")
    assert len(blob) == 8 + header_len + learned.nbytes(dtype)
    assert header_len < 16_384
    floats = sum(t.numel() for t in learned.state.tensors().values() if t.is_floating_point())
    assert learned.nbytes("float32") - learned.nbytes("bfloat16") == 2 * floats


def test_to_bytes_rejects_unknown_storage_dtype(learned):
    with pytest.raises(ValueError):
        learned.to_bytes("float16")


def test_blob_metadata(engine, learned):
    meta = _header(learned.to_bytes("bfloat16"))["__metadata__"]
    assert meta["format"] == FORMAT
    assert meta["fingerprint"] == engine.fingerprint
    assert meta["dtype"] == "bfloat16"


# ---------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------

def test_refuses_another_checkpoints_state(engine, learned, tmp_path):
    blob = learned.to_bytes()
    with pytest.raises(StateError, match="another checkpoint"):
        SessionState.from_bytes(blob, engine.model, "0" * 32)
    other = make_engine(tmp_path / "other", tiny_config(), seed=123)  # same shapes, other weights
    assert other.fingerprint != engine.fingerprint
    with pytest.raises(StateError, match="another checkpoint"):
        other.load_session(blob)
    # a forged fingerprint in the metadata is refused too (by this checkpoint)
    _refused(engine, _rebuild(blob, meta={"fingerprint": other.fingerprint}), "another checkpoint")
    _refused(engine, _rebuild(blob, meta={"fingerprint": None}), "another checkpoint")


@pytest.mark.parametrize("change", [
    dict(window=32), dict(chunk=8), dict(mem_hidden=16), dict(n_layers=3), dict(d_model=64),
    dict(self_modifying=False), dict(fast_hidden=4), dict(mid_hidden=8), dict(n_heads=4),
])
def test_refuses_a_state_of_another_shape(engine, change):
    """A state made by a model of another config, stamped with this checkpoint's fingerprint."""
    foreign = make_model(tiny_config(**change), seed=0)
    s = SessionState(foreign.init_state(1), engine.fingerprint)
    _refused(engine, s.to_bytes())


@pytest.mark.parametrize("name, dtype", [
    ("layers.0.mem_a", torch.float16), ("layers.1.attn_k", torch.float64),
    ("last_hidden", torch.bfloat16), ("n_committed", torch.int32), ("n_open", torch.float32),
    ("open_tokens", torch.int32), ("updates", torch.uint8),
])
def test_refuses_a_tensor_of_the_wrong_dtype(engine, learned, name, dtype):
    blob = learned.to_bytes()
    t = st_load(blob)[name]
    _refused(engine, _rebuild(blob, tensors={name: t.to(dtype)}), "dtype")


def test_refuses_mismatched_storage_dtype_metadata(engine, learned):
    _refused(engine, _rebuild(learned.to_bytes("float32"), meta={"dtype": "bfloat16"}), "dtype")
    _refused(engine, _rebuild(learned.to_bytes("bfloat16"), meta={"dtype": "float32"}), "dtype")
    _refused(engine, _rebuild(learned.to_bytes(), meta={"dtype": "float16"}), "dtype")
    _refused(engine, _rebuild(learned.to_bytes(), meta={"dtype": None}), "dtype")


def test_refuses_missing_or_extra_tensors(engine, learned):
    blob = learned.to_bytes()
    _refused(engine, _rebuild(blob, tensors={"layers.1.mom_b": None}), "missing")
    _refused(engine, _rebuild(blob, tensors={"layers.0.backdoor": torch.zeros(3)}), "unexpected")
    _refused(engine, _rebuild(blob, tensors={"layers.2.mem_a": st_load(blob)["layers.1.mem_a"]}))


@pytest.mark.parametrize("cut", ["half", "minus_one", "header_only", "seven", "empty"])
def test_refuses_truncated_bytes(engine, learned, cut):
    blob = learned.to_bytes()
    n = int.from_bytes(blob[:8], "little")
    end = {"half": len(blob) // 2, "minus_one": len(blob) - 1, "header_only": 8 + n,
           "seven": 7, "empty": 0}[cut]
    _refused(engine, blob[:end])


@pytest.mark.parametrize("seed", range(6))
def test_refuses_random_bytes(engine, seed):
    g = torch.Generator().manual_seed(seed)
    n = [0, 5, 8, 64, 4096, 100_000][seed]
    blob = bytes(torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).tolist())
    _refused(engine, blob)
    # random bytes behind a plausible header length
    _refused(engine, len(blob).to_bytes(8, "little") + blob)
    _refused(engine, min(len(blob), 40).to_bytes(8, "little") + blob)


def test_refuses_malformed_headers(engine, learned):
    blob = learned.to_bytes()
    for header in (b"[1, 2, 3]", b"\"a string\"", b"{\"__metadata__\": 5}", b"{}", b"\xff\xfe{}",
                   b"{\"__metadata__\": {\"format\": \"hope-session-state/1\"}}"):
        _refused(engine, len(header).to_bytes(8, "little") + header)
    _refused(engine, _rebuild(blob, meta={"format": "hope-session-state/0"}), "format")
    _refused(engine, _rebuild(blob, meta={"format": None}), "format")
    _refused(engine, _rebuild(blob, meta={"version": "one"}), "version")
    _refused(engine, _rebuild(blob, meta={"version": None}), "version")
    deep = b"[" * 100_000 + b"]" * 100_000  # deeper than Python's json recursion allows
    _refused(engine, len(deep).to_bytes(8, "little") + deep)
    nested_meta = b'{"__metadata__": {"format": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}"
    _refused(engine, len(nested_meta).to_bytes(8, "little") + nested_meta)


@pytest.mark.parametrize("name", ["layers.0.mem_a", "layers.1.mom_b", "layers.0.attn_v",
                                  "layers.1.fast_down", "layers.0.mid_up_grad", "last_hidden",
                                  "layers.1.open_conv"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_refuses_non_finite_tensors(engine, learned, name, bad, dtype):
    blob = learned.to_bytes(dtype)
    t = st_load(blob)[name].clone()
    t.view(-1)[t.numel() // 2] = bad
    _refused(engine, _rebuild(blob, tensors={name: t}), "finite")


@pytest.mark.parametrize("name, value", [
    ("n_open", "chunk"), ("n_open", -1), ("n_open", "chunk+5"),
    ("n_committed", -4), ("n_committed", 3), ("n_committed", "chunk-1"),
    ("open_tokens", "vocab"), ("open_tokens", -1),
    ("updates", -1),
    # beyond any stream, and where counting on would overflow int64 (or rope lose positions)
    ("n_committed", "near-int64"), ("updates", 2**63 - 1), ("updates", 2**48 + 1),
])
def test_refuses_out_of_range_counters(engine, learned, name, value):
    blob = learned.to_bytes()
    C, V = engine.cfg.chunk, engine.cfg.vocab_size
    value = {"chunk": C, "chunk+5": C + 5, "chunk-1": C - 1, "vocab": V, "near-int64": 2**63 - C}.get(value, value)
    t = st_load(blob)[name].clone()
    t.view(-1)[-1] = value
    _refused(engine, _rebuild(blob, tensors={name: t}))


class _Boom:
    """A pickle payload that records it was executed."""

    executed = False

    def __reduce__(self):
        return (_mark_executed, ())


def _mark_executed():
    _Boom.executed = True
    return {}


def test_refuses_pickle_payloads_without_unpickling(engine, learned, tmp_path):
    payloads = [pickle.dumps(_Boom(), protocol=p) for p in (2, 4, 5)]
    payloads.append(pickle.dumps({"state": learned.state.tensors(), "boom": _Boom()}))
    torch.save({"boom": _Boom(), "tensors": learned.state.tensors()}, tmp_path / "p.pt")
    payloads.append((tmp_path / "p.pt").read_bytes())
    for blob in payloads:
        _refused(engine, blob)
    assert not _Boom.executed, "a pickle payload was executed while loading a state"


def test_every_refusal_is_a_value_error(engine):
    """StateError subclasses ValueError: callers catching ValueError keep working."""
    assert issubclass(StateError, ValueError)
    with pytest.raises(ValueError):
        engine.load_session(b"not a state")
