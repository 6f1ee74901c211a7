"""Byte-level BPE tokenizer and chat format for HOPE.

Why a thin wrapper around Hugging Face ``tokenizers`` instead of using it directly:

* A session is one endless token stream, so the chat format must be *prefix-stable*: the
  tokens of ``messages[:k]`` are always a prefix of the tokens of ``messages``. A server
  relies on this to absorb only the new messages of a request. Every message is therefore
  encoded on its own, ``[role] + encode(content) + [end]``, and nothing ever merges across
  message boundaries.
* Special tokens must never be injectable from user text. A user who types ``<|end|>``
  must get ordinary byte tokens, or they could close a turn or impersonate the assistant.
  ``tokenizers`` matches added tokens inside raw text by default (even with
  ``add_special_tokens=False``), so we switch that off with ``encode_special_tokens = True``
  (which is *not* stored in the JSON and is therefore set every time a tokenizer is built)
  and additionally check that no special id came out.
* Streaming generation needs detokenization that never emits half a UTF-8 character. We map
  every token id to its exact bytes once (``token_bytes``) and build both ``decode`` and
  ``StreamDecoder`` on that single mapping, so the two always agree.

Special tokens take ids 0..4 in this order: ``<|endoftext|>`` (BOS/EOS and document
separator), ``<|system|>``, ``<|user|>``, ``<|assistant|>``, ``<|end|>`` (end of a chat turn).
"""

from __future__ import annotations

import codecs
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ENDOFTEXT = "<|endoftext|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"

#: Special tokens in id order: the token at index i has id i in every HOPE tokenizer.
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, SYSTEM, USER, ASSISTANT, END)

#: Chat roles and the special token that opens a message of that role.
ROLE_TOKENS: dict[str, str] = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
_SPECIAL_NAME_RE = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")

#: Where the tokenizer shipped with the package lives.
DEFAULT_TOKENIZER_PATH = Path(__file__).resolve().parent / "assets" / "tokenizer.json"


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table.

    Byte-level BPE stores every token as a string of these stand-in characters (a space is
    ``Ġ``, a newline ``Ċ``), so inverting this table turns a vocabulary entry back into the
    exact bytes it stands for.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    """Inverse of :func:`bytes_to_unicode`."""
    return {c: b for b, c in bytes_to_unicode().items()}


_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def sanitize(text: str) -> str:
    """Replace lone surrogates with U+FFFD.

    A Python ``str`` can hold lone surrogates (e.g. from ``surrogateescape`` decoding); they
    have no UTF-8 encoding and the Rust tokenizer rejects them. A server must not crash on
    such input, so each becomes the replacement character. All other text is left untouched.
    """
    if text.isascii():
        return text
    return _SURROGATE_RE.sub("\ufffd", text)


class HopeTokenizer:
    """Byte-level BPE tokenizer with HOPE's special tokens and prefix-stable chat format.

    ``decode`` renders special tokens as their names (``<|end|>``) unless
    ``skip_special=True``; ordinary text never produces special ids, so in the output of
    ``decode`` a literal ``<|end|>`` typed by a user and a real end-of-turn token look
    alike: use the ids, not decoded text, when the difference matters.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        for expected_id, name in enumerate(SPECIAL_TOKENS):
            got = tokenizer.token_to_id(name)
            if got != expected_id:
                raise ValueError(
                    f"tokenizer has special token {name!r} at id {got}, expected {expected_id}; "
                    "HOPE tokenizers must be built with train_tokenizer()"
                )
        # Not serialized in tokenizer.json, so it must be set on every construction: without
        # it, "<|end|>" inside user text would become the special end-of-turn id.
        tokenizer.encode_special_tokens = True
        self._tok = tokenizer
        self.bos_id: int = SPECIAL_TOKENS.index(ENDOFTEXT)
        self.eot_id: int = self.bos_id
        self.end_id: int = SPECIAL_TOKENS.index(END)
        self.role_ids: dict[str, int] = {
            role: SPECIAL_TOKENS.index(tok) for role, tok in ROLE_TOKENS.items()
        }
        self.special_ids: frozenset[int] = frozenset(range(len(SPECIAL_TOKENS)))
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self._id_bytes: list[bytes] = self._build_id_bytes()
        # a text of n characters (at least n bytes) is at least n / max_token_bytes tokens
        self.max_token_bytes: int = max(len(b) for b in self._id_bytes[len(SPECIAL_TOKENS):])

    # ------------------------------------------------------------------ construction

    def _build_id_bytes(self) -> list[bytes]:
        """Map every id to its bytes once; decode and StreamDecoder both read this table."""
        u2b = unicode_to_bytes()
        table: list[bytes | None] = [None] * self.vocab_size
        for token, idx in self._tok.get_vocab(with_added_tokens=True).items():
            if idx in self.special_ids:
                table[idx] = token.encode("utf-8")
            else:
                try:
                    table[idx] = bytes(u2b[ch] for ch in token)
                except KeyError as exc:
                    raise ValueError(f"token {idx} ({token!r}) is not a byte-level token") from exc
        missing = [i for i, b in enumerate(table) if b is None]
        if missing:
            raise ValueError(f"vocabulary has holes at ids {missing[:10]}")
        return [b for b in table if b is not None]

    @classmethod
    def from_str(cls, json_str: str) -> HopeTokenizer:
        """Build from the JSON text written by :meth:`to_str`."""
        return cls(Tokenizer.from_str(json_str))

    @classmethod
    def from_file(cls, path: str | Path) -> HopeTokenizer:
        """Load a ``tokenizer.json`` written by :meth:`save`."""
        return cls.from_str(Path(path).read_text(encoding="utf-8"))

    @classmethod
    def default(cls) -> HopeTokenizer:
        """The tokenizer shipped in ``hope_core/assets/tokenizer.json``."""
        return cls.from_file(DEFAULT_TOKENIZER_PATH)

    def to_str(self) -> str:
        """Serialize to the Hugging Face ``tokenizer.json`` format (compact, deterministic)."""
        return self._tok.to_str()

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json``; parent directories are created."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_str(), encoding="utf-8")

    @property
    def backend(self) -> Tokenizer:
        """The wrapped ``tokenizers.Tokenizer`` (already set not to match special tokens)."""
        return self._tok

    # ------------------------------------------------------------------ encoding

    def _check_no_special(self, ids: Sequence[int]) -> None:
        if ids and min(ids) < len(SPECIAL_TOKENS):
            raise RuntimeError("ordinary text produced a special token id; tokenizer is misconfigured")

    def encode(self, text: str) -> list[int]:
        """Encode ordinary text; special-token names in ``text`` become ordinary byte tokens."""
        ids = self._tok.encode(sanitize(text), add_special_tokens=False).ids
        self._check_no_special(ids)
        return ids

    def encode_with_special_names(self, text: str) -> list[int]:
        """Encode text in which special-token names (``<|endoftext|>``, ``<|user|>``...) stand
        for their ids, as Hugging Face tokenizers read text. Only for a client that builds a
        token-id prompt on purpose (``/tokenize``); prompts sent as text use :meth:`encode`."""
        ids: list[int] = []
        for piece in _SPECIAL_NAME_RE.split(text):
            if piece in SPECIAL_TOKENS:
                ids.append(SPECIAL_TOKENS.index(piece))
            elif piece:
                ids += self.encode(piece)
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts in parallel (Rust threads); same rules as :meth:`encode`."""
        encodings = self._tok.encode_batch([sanitize(t) for t in texts], add_special_tokens=False)
        out = [e.ids for e in encodings]
        for ids in out:
            self._check_no_special(ids)
        return out

    def encode_message(self, role: str, content: str) -> list[int]:
        """One chat message: ``[role_id] + encode(content) + [end_id]``."""
        if role not in self.role_ids:
            raise ValueError(f"unknown role {role!r}; expected one of {sorted(self.role_ids)}")
        if not isinstance(content, str):
            raise TypeError(f"message content must be str, got {type(content).__name__}")
        return [self.role_ids[role], *self.encode(content), self.end_id]

    def apply_chat_template(
        self, messages: Iterable[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Encode a conversation; with ``add_generation_prompt`` end with ``[assistant_id]``.

        Prefix-stable by construction: messages are encoded independently and concatenated,
        so the tokens of ``messages[:k]`` (without generation prompt) are a prefix of those of
        ``messages``. The generation prompt is exactly the first token of an assistant
        message, so a reply generated after it continues the same stream that
        ``encode_message("assistant", reply)`` would produce.
        """
        ids: list[int] = []
        for message in messages:
            ids.extend(self.encode_message(message["role"], message["content"]))
        if add_generation_prompt:
            ids.append(self.role_ids["assistant"])
        return ids

    # ------------------------------------------------------------------ decoding

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes a token stands for (a special token: its name in UTF-8)."""
        if not 0 <= token_id < self.vocab_size:
            raise IndexError(f"token id {token_id} out of range [0, {self.vocab_size})")
        return self._id_bytes[token_id]

    def is_special(self, token_id: int) -> bool:
        """True for the five special ids."""
        return token_id in self.special_ids

    def decode_bytes(self, ids: Iterable[int], skip_special: bool = False) -> bytes:
        """Concatenated bytes of ``ids``; may end inside a multi-byte character."""
        return b"".join(
            self.token_bytes(i) for i in ids if not (skip_special and i in self.special_ids)
        )

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Decode to text; invalid UTF-8 becomes U+FFFD. Special tokens appear as their names
        unless ``skip_special``."""
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special: bool = False) -> StreamDecoder:
        """A fresh incremental detokenizer bound to this tokenizer."""
        return StreamDecoder(self, skip_special=skip_special)

    def id_to_token(self, token_id: int) -> str:
        """The raw vocabulary entry (byte-level stand-in characters), for debugging."""
        token = self._tok.id_to_token(token_id)
        if token is None:
            raise IndexError(f"token id {token_id} out of range")
        return token

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"HopeTokenizer(vocab_size={self.vocab_size})"


class StreamDecoder:
    """Incremental detokenizer for streaming generation.

    ``push`` returns only complete UTF-8 text: bytes of a character that a later token will
    finish are held back. The concatenation of all ``push`` results and ``flush()`` equals
    ``tokenizer.decode(ids)`` exactly, because both use the same byte table and Python's
    incremental UTF-8 decoder gives the same result as a one-shot decode (also for invalid
    bytes, which become U+FFFD).
    """

    def __init__(self, tokenizer: HopeTokenizer, skip_special: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Feed one token; return the text that became complete."""
        if self._skip_special and self._tokenizer.is_special(token_id):
            return ""
        return self._decoder.decode(self._tokenizer.token_bytes(token_id), final=False)

    def flush(self) -> str:
        """Emit whatever is held back (an incomplete character becomes U+FFFD) and reset."""
        out = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return out

    @property
    def pending(self) -> bool:
        """True while bytes of an incomplete character are held back."""
        return bool(self.held_bytes)

    @property
    def held_bytes(self) -> bytes:
        """The bytes of an incomplete character held back."""
        buffered, _ = self._decoder.getstate()
        return buffered


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> HopeTokenizer:
    """Train a byte-level BPE with HOPE's special tokens at ids 0..4.

    The full 256-byte initial alphabet guarantees that any byte sequence encodes (there is no
    unknown token). ``add_prefix_space=False`` keeps encoding a pure function of the text, so
    ``decode(encode(s)) == s`` exactly.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 256}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator((sanitize(t) for t in texts), trainer=trainer)
    return HopeTokenizer(tok)


def tokenizer_summary(tokenizer: HopeTokenizer) -> dict[str, object]:
    """Small JSON-able description, for checkpoint docs and logs."""
    return {
        "vocab_size": tokenizer.vocab_size,
        "special_tokens": list(SPECIAL_TOKENS),
        "sha256": _sha256(tokenizer.to_str()),
    }


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


__all__ = [
    "ASSISTANT",
    "DEFAULT_TOKENIZER_PATH",
    "END",
    "ENDOFTEXT",
    "ROLE_TOKENS",
    "SPECIAL_TOKENS",
    "SYSTEM",
    "USER",
    "HopeTokenizer",
    "StreamDecoder",
    "bytes_to_unicode",
    "tokenizer_summary",
    "train_tokenizer",
    "unicode_to_bytes",
]
