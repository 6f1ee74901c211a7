"""Which messages of a request were already absorbed: its first k equal k consecutive logged messages, at the
log's end (any k) or earlier (k >= 3: a retry, a regenerate, an edit)."""

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


def test_a_retry_or_a_regenerate_leaves_the_logged_reply_out() -> None:
    """The same request sent again (its first attempt was stored, its reply logged): the whole
    request is re-sent, nothing is absorbed twice."""
    assert resent_prefix(d("u1", "a1", "u2"), d("u1", "a1", "u2", "a2")) == 3
    assert resent_prefix(d("u1", "a1", "u2"), d("u1", "a1", "u2", "a2", "a2-again")) == 3


def test_an_edited_message_matches_up_to_the_edit() -> None:
    assert resent_prefix(d("s", "u1", "a1", "u2-edited"), d("s", "u1", "a1", "u2", "a2", "a2-again")) == 3
    assert resent_prefix(d("s", "u1", "a1-edited", "u2"), d("s", "u1", "a1", "u2", "a2")) == 0  # < 3 shared


def test_few_messages_never_match_away_from_the_end() -> None:
    """A client that sends only its new message (with a system prompt: two) may say the same
    thing twice: it is absorbed again."""
    assert resent_prefix(d("ok"), d("u1", "a1", "ok", "a2")) == 0
    assert resent_prefix(d("s", "ok"), d("s", "ok", "a1", "s", "u2", "a2")) == 0


def test_a_match_at_the_end_comes_first() -> None:
    history = d("u1", "a1", "u1", "a1")
    assert resent_prefix(d("u1", "a1", "u2"), history) == 2  # the end of the log: both alignments give 2


def test_a_retry_beyond_the_kept_history() -> None:
    kept = d("a1", "u2", "a2", "u3", "a3")  # the last 5 of 6; the request regenerates a3
    assert resent_prefix(d("u1", "a1", "u2", "a2", "u3"), kept, truncated=True) == 5
    assert resent_prefix(d("u1", "a1", "u2", "a2", "u3"), kept, truncated=False) == 0


def test_a_new_message_equal_to_the_oldest_kept_one_is_new() -> None:
    """Only messages compared with the kept history count: a client re-sending the whole
    conversation whose new "continue" equals the oldest kept message re-sent 6, not 7."""
    kept = d("u-continue", "a2", "u3", "a3")  # the last 4 of 6
    request = d("u1", "a1", "u-continue", "a2", "u3", "a3", "u-continue")
    assert resent_prefix(request, kept, truncated=True) == 6


def _reference(request: list[bytes], history: list[bytes], truncated: bool) -> int:
    """The definition, alignment by alignment (quadratic)."""
    n, best = len(history), 0
    for start in range(1 - len(request) if truncated else 0, n):
        offset = max(0, -start)
        k = offset
        while k < len(request) and start + k < n and request[k] == history[start + k]:
            k += 1
        if k > offset and k > best and (start + k == n or k - offset >= 3):
            best = k
    return best


def test_agrees_with_the_definition_on_random_conversations() -> None:
    import random

    rng = random.Random(0)
    for _ in range(3000):
        words = [bytes([c]) for c in range(rng.randint(1, 3))]  # few distinct messages: many matches
        history = [rng.choice(words) for _ in range(rng.randint(0, 12))]
        request = [rng.choice(words) for _ in range(rng.randint(1, 12))]
        if rng.random() < 0.5 and history:  # often a real re-send of part of the log, then new ones
            i = rng.randrange(len(history))
            request = history[i:rng.randint(i, len(history))] + request[:rng.randint(0, 3)] or request
        for truncated in (False, True):
            assert resent_prefix(request, history, truncated) == _reference(request, history, truncated), \
                (request, history, truncated)


class _Counted(bytes):
    comparisons = 0

    def __eq__(self, other: object) -> bool:
        _Counted.comparisons += 1
        return bytes.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = bytes.__hash__


def test_linear_in_the_messages() -> None:
    """One request of many equal messages against a long log of them (every alignment matches
    far) is linear work: the match runs on the event loop, and a quadratic one let one request
    stall the whole server for seconds."""
    same = _Counted(message_digest("user", "a"))
    history, request = [same] * 1024, [same] * 5000
    _Counted.comparisons = 0
    assert resent_prefix(request, history, truncated=True) == 5000  # all of it, the log's end included
    assert _Counted.comparisons < 8 * (len(history) + len(request))
