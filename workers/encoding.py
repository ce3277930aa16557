"""The one JSON encoding of payloads and control bodies: orjson, with a standard-library fallback.

Why orjson: ``json.dumps`` spends most of a 64 KiB event escaping the string (179 µs, 68% of the worker's
cost per event in issue 18's profile) and ~6.5 µs building an encoder for every small event; orjson does
both in a fraction of that.  What orjson refuses (ints beyond 64 bits, strings with lone surrogates,
non-string dict keys, nesting deeper than 254 levels) goes through :func:`encode_fallback`, a small
encoder built on the standard library's string escaper that writes exactly orjson's bytes for everything
orjson accepts, so which path ran is invisible on the wire.

The output (both paths) is compact UTF-8 JSON: no whitespace, non-ASCII characters raw, control
characters and ``"``/``\\`` escaped as the standard library does (``\\n``, ``\\u001f``...).  It equals
what ``json.dumps(obj, separators=(",", ":"), ensure_ascii=False)`` produced before, except where that was
not valid or not encodable JSON, and for some tiny floats:

- NaN and ±Infinity become ``null`` (the standard library wrote ``NaN``, which no JSON parser accepts);
- a lone surrogate becomes a ``\\udXXX`` escape (the standard library's output could not be encoded to
  UTF-8 at all, and the send failed); ``json.loads`` turns it back into the same string;
- floats below 1e-4 in magnitude keep the same shortest digits but may be spelled differently
  (``1e-05`` -> ``0.00001``, ``1.5e-07`` -> ``1.5e-7``): the same number.
"""

from __future__ import annotations

import enum
import re
from json.encoder import encode_basestring  # type: ignore[attr-defined]  # the C escaper, no ASCII-fying
from typing import Any

import orjson

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def encode_json(obj: Any) -> bytes:
    """Compact UTF-8 JSON bytes of ``obj``; raises ``TypeError`` / ``ValueError`` as ``json.dumps`` does
    for what JSON cannot hold (bytes, sets, circular references...)."""
    try:
        return orjson.dumps(obj)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return encode_fallback(obj)


def encode_fallback(obj: Any) -> bytes:
    """The standard-library path: byte-identical to :func:`orjson.dumps` wherever that succeeds."""
    parts: list[str] = []
    _encode(obj, parts, set())
    return "".join(parts).encode("utf-8")


def _encode(obj: Any, out: list[str], active: set[int]) -> None:
    if isinstance(obj, str):
        out.append(_string(obj))
    elif obj is None:
        out.append("null")
    elif obj is True:
        out.append("true")
    elif obj is False:
        out.append("false")
    elif isinstance(obj, int):
        out.append(int.__repr__(obj))
    elif isinstance(obj, float):
        out.append(_float(obj))
    elif isinstance(obj, (list, tuple, dict)):
        if id(obj) in active:
            raise ValueError("Circular reference detected")
        active.add(id(obj))
        if isinstance(obj, dict):
            out.append("{")
            for index, (key, value) in enumerate(obj.items()):
                if index:
                    out.append(",")
                out.append(_key(key))
                out.append(":")
                _encode(value, out, active)
            out.append("}")
        else:
            out.append("[")
            for index, value in enumerate(obj):
                if index:
                    out.append(",")
                _encode(value, out, active)
            out.append("]")
        active.discard(id(obj))
    elif isinstance(obj, enum.Enum):
        _encode(obj.value, out, active)
    else:
        try:  # whatever else orjson knows (dataclasses, datetimes, UUIDs...) it encodes alone
            out.append(orjson.dumps(obj).decode("utf-8"))
        except TypeError:
            raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable") from None


def _string(text: str) -> str:
    encoded: str = encode_basestring(text)
    if not text.isascii() and _LONE_SURROGATE.search(text):
        encoded = _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", encoded)
    return encoded


def _float(value: float) -> str:
    return orjson.dumps(float(value)).decode("ascii")  # orjson's spelling, so both paths agree


def _key(key: Any) -> str:
    """Dict keys as ``json.dumps`` converts them (orjson refuses anything but ``str``)."""
    if isinstance(key, str):
        return _string(key)
    if key is None:
        return '"null"'
    if key is True:
        return '"true"'
    if key is False:
        return '"false"'
    if isinstance(key, int):
        return '"' + int.__repr__(key) + '"'
    if isinstance(key, float):
        return '"' + _float(key) + '"'
    raise TypeError(f"keys must be str, int, float, bool or None, not {type(key).__name__}")
