"""The worker's JSON encoding (workers/encoding.py): orjson and its standard-library fallback agree byte
for byte, and both equal the previous ``json.dumps`` encoding wherever that produced valid JSON."""

from __future__ import annotations

import enum
import json
import math

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.channel import Kind, event_frame, FrameDecoder
from workers.encoding import encode_fallback, encode_json


def previous(obj: object) -> bytes:
    """What workers/channel.py emitted before orjson."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class Colour(enum.IntEnum):
    RED = 1


class Mode(str, enum.Enum):
    FAST = "fast"


CORPUS: list[object] = [
    None, True, False, 0, -1, 2 ** 63 - 1, -2 ** 63, 2 ** 64 - 1, 0.0, -0.0, 1.5, 0.1, 1e16, 1e300, 5e-324,
    0.0001, 123456789.125, "", "plain", "h\u00e9llo \u2028\u2029 \U0001f600 \x7f \x80",
    "".join(map(chr, range(0x80))), "quote \" backslash \\ slash /", [], {}, [1, [2, [3, []]]],
    {"turn_id": "t1", "text": "x" * 70000, "redactions": 3, "nested": {"a": [None, True, 1.25]}},
    {"subagent_id": "s-1", "progress": 0.25, "cpu_s": 1.234}, (1, "two"), [Colour.RED, Mode.FAST],
    {"text": "tool output\n\tline two\r\n\x00\x1b[31mred\x1b[0m"},
]


@pytest.mark.parametrize("obj", CORPUS, ids=lambda o: repr(o)[:30])
def test_corpus_encodes_as_before_on_both_paths(obj: object) -> None:
    assert encode_json(obj) == previous(obj)
    assert encode_fallback(obj) == previous(obj)


@pytest.mark.parametrize("obj, expected", [
    (2 ** 64, b"18446744073709551616"),
    (-2 ** 63 - 1, b"-9223372036854775809"),
    ({"n": 10 ** 40, "s": "ok"}, b'{"n":10000000000000000000000000000000000000000,"s":"ok"}'),
    ("lone \ud800 surrogate", b'"lone \\ud800 surrogate"'),
    ({"k\udcff": ["\ud83d\ude00"]}, b'{"k\\udcff":["\\ud83d\\ude00"]}'),
    ({1: "a", None: "b", False: "c"}, b'{"1":"a","null":"b","false":"c"}'),
])
def test_what_orjson_refuses_goes_through_the_fallback(obj: object, expected: bytes) -> None:
    with pytest.raises(TypeError):
        orjson.dumps(obj)
    assert encode_json(obj) == expected
    assert encode_fallback(obj) == expected


def test_deep_nesting_beyond_orjson_limit_still_encodes() -> None:
    obj: list[object] = []
    for _ in range(300):
        obj = [obj]
    assert encode_json(obj) == previous(obj)


def test_not_finite_floats_become_null_instead_of_invalid_json() -> None:
    assert encode_json([math.nan, math.inf, -math.inf]) == b"[null,null,null]"
    assert encode_json({"big": 2 ** 70, "x": math.nan}) == b'{"big":1180591620717411303424,"x":null}'


def test_tiny_floats_keep_their_value() -> None:
    for value in (1e-05, 1.5e-07, 6.26703014325946e-05, -2.5e-300):
        assert json.loads(encode_json(value)) == value
        assert encode_json(value) == encode_fallback(value)


@pytest.mark.parametrize("obj", [b"bytes", {1, 2}, object(), {("tuple", "key"): 1}])
def test_what_json_cannot_hold_is_a_type_error(obj: object) -> None:
    with pytest.raises(TypeError):
        encode_json(obj)


def test_circular_reference_is_a_value_error_not_a_crash() -> None:
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(ValueError, match="Circular"):
        encode_json({"big": 2 ** 70, "loop": loop})


def test_event_frame_carries_the_encoding() -> None:
    payload = {"text": "\u00e9\ud800", "n": 2 ** 65}
    [frame] = FrameDecoder().feed(event_frame("tool.output", payload))
    assert frame.kind is Kind.EVENT and frame.body == encode_json(payload)
    assert json.loads(frame.body) == payload


# -- properties -------------------------------------------------------------------------------------------

_any_text = st.text(st.characters(codec=None, min_codepoint=0, max_codepoint=0x10FFFF))  # surrogates too
_valid_text = st.text(st.characters(blacklist_categories=("Cs",)))
_finite = st.floats(allow_nan=False, allow_infinity=False)
_int = st.integers(min_value=-2 ** 80, max_value=2 ** 80)


def _json_values(text: st.SearchStrategy[str], floats: st.SearchStrategy[float],
                 ints: st.SearchStrategy[int]) -> st.SearchStrategy[object]:
    scalars = st.none() | st.booleans() | ints | floats | text
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=5)
                        | st.dictionaries(text, inner, max_size=5), max_leaves=30)


@settings(max_examples=400, deadline=None)
@given(_json_values(_any_text, st.floats(), _int))
def test_fallback_is_byte_identical_to_orjson_wherever_orjson_succeeds(obj: object) -> None:
    try:
        expected = orjson.dumps(obj)
    except TypeError:
        encoded = encode_json(obj)
        assert encoded == encode_fallback(obj)
        encoded.decode("utf-8")  # always valid UTF-8, whatever the surrogates
        return
    assert encode_fallback(obj) == expected == encode_json(obj)


@settings(max_examples=400, deadline=None)
@given(_json_values(_valid_text, _finite.filter(lambda f: "e-0" not in repr(f)),
                    st.integers(min_value=-2 ** 63, max_value=2 ** 64 - 1)))
def test_same_bytes_as_the_previous_encoder(obj: object) -> None:
    assert encode_json(obj) == previous(obj)


def _paired(obj: object) -> object:
    """``obj`` as a JSON parser reads it back: an escaped high+low surrogate pair is one character."""
    if isinstance(obj, str):
        return obj.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")
    if isinstance(obj, list):
        return [_paired(v) for v in obj]
    if isinstance(obj, dict):
        return {_paired(k): _paired(v) for k, v in obj.items()}
    return obj


def test_escaped_surrogate_pair_reads_back_as_one_character() -> None:
    assert json.loads(encode_json("\ud83d\ude00 \udcff")) == "\U0001f600 \udcff"


@settings(max_examples=300, deadline=None)
@given(_json_values(_any_text, _finite, _int))
def test_round_trips_through_json_loads(obj: object) -> None:
    assert json.loads(encode_json(obj)) == _paired(obj)
