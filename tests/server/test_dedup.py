"""Which messages of a request were already absorbed: the largest k with request[:k] == history[-k:]."""

from __future__ import annotations

from server.sessions import message_digest, resent_prefix, split_digests


def d(*names: str) -> list[bytes]:
    return [message_digest("user" if n.startswith("u") else "assistant", n) for n in names]


def test_whole_history_resent() -> None:
    assert resent_prefix(d("u1", "a1", "u2"), d("u1", "a1")) == 2
    assert resent_prefix(d("u1", "a1", "u2", "a2", "u3"), d("u1", "a1", "u2", "a2")) == 4


def test_new_message_only() -> None:
    assert resent_prefix(d("u3"), d("u1", "a1", "u2", "a2")) == 0
    assert resent_prefix(d("u1"), []) == 0


def test_tail_of_a_longer_stream() -> None:
    """A client that keeps only the last turns of a long conversation (a sliding context)."""
    assert resent_prefix(d("u2", "a2", "u3"), d("u1", "a1", "u2", "a2")) == 2


def test_a_new_conversation_on_an_old_session() -> None:
    assert resent_prefix(d("u9", "a9", "u10"), d("u1", "a1")) == 0


def test_prefers_the_longest_match() -> None:
    history = d("u1", "a1", "u1", "a1")
    assert resent_prefix(d("u1", "a1", "u1", "a1", "u2"), history) == 4


def test_role_is_part_of_the_message() -> None:
    assert message_digest("user", "hi") != message_digest("assistant", "hi")


def test_trimmed_replies_are_recognised() -> None:
    assert message_digest("assistant", "  Hello there.\n") == message_digest("assistant", "Hello there.")


def test_truncated_history() -> None:
    """Only the last 2 digests are kept, but the client re-sends all 5 earlier messages."""
    kept = d("u2", "a2")
    assert resent_prefix(d("u1", "a1", "u2", "a2", "u3"), kept, truncated=True) == 4
    assert resent_prefix(d("u1", "a1", "u2", "a2", "u3"), kept, truncated=False) == 0


def test_split_digests_roundtrip() -> None:
    digests = d("u1", "a1", "u2")
    assert split_digests(b"".join(digests)) == digests
    assert split_digests(b"") == []
