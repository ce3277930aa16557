"""The terminal query parser (``gateway/terminals/queries.py``): pure calls, no terminal."""

from __future__ import annotations

import pytest

from gateway.terminals.queries import QueryStripper, strip_terminal_queries

#: The 24 query forms of issue 13 section 4: DSR and DA with every spelling of their numbers, behind
#: each of the three CSI introducers (7-bit ESC [, 8-bit C1, and C1 encoded as UTF-8).
_BODIES = [b"5n", b"6n", b"06n", b"0006n", b"c", b"0c", b"00c", b">c"]
_INTRODUCERS = [b"\x1b[", b"\x9b", b"\xc2\x9b"]
ISSUE_FORMS = [intro + body for intro in _INTRODUCERS for body in _BODIES]
KEPT = [b"\x1b[31m", b"\x1b[2J", b"\x1b[H", b"\x1b[?2004h", b"\x1b[8;24;80t", b"\x1b]0;title\x07",
        b"\x1b[1;1H", b"\x1b[2 q", b"\x9b31m", b"\xc2\x9b1;1H", b"\x1b[>4;1m"]


def test_the_issue_lists_24_forms() -> None:
    assert len(ISSUE_FORMS) == 24 and len(set(ISSUE_FORMS)) == 24


@pytest.mark.parametrize("query", ISSUE_FORMS, ids=repr)
def test_each_query_form_is_stripped(query: bytes) -> None:
    assert strip_terminal_queries(b"before" + query + b"after") == b"beforeafter"


@pytest.mark.parametrize("sequence", KEPT, ids=repr)
def test_sequences_that_are_not_queries_are_kept(sequence: bytes) -> None:
    data = b"x" + sequence + b"y"
    assert strip_terminal_queries(data) == data


def test_a_c1_byte_inside_a_utf8_character_is_text() -> None:
    text = "věc ěn".encode()  # 'ě' is C4 9B: its second byte is not a CSI introducer
    assert strip_terminal_queries(text) == text


def test_a_query_split_across_reads_is_still_removed() -> None:
    stripper = QueryStripper(limit=1024)
    for piece in (b"one\x1b", b"[00", b"06", b"ntwo\xc2", b"\x9b", b"ctree"):
        stripper.feed(piece)
    assert stripper.snapshot() == b"onetwotree"


def test_an_unfinished_query_at_the_end_is_kept_as_live() -> None:
    stripper = QueryStripper(limit=1024)
    stripper.feed(b"prompt\x1b[6")
    assert stripper.snapshot() == b"prompt\x1b[6"


def test_the_replay_keeps_only_the_last_limit_bytes() -> None:
    stripper = QueryStripper(limit=10)
    for _ in range(30):
        stripper.feed(b"0123456789\x1b[6n")
    assert stripper.snapshot() == b"0123456789"
