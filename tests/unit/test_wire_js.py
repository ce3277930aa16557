"""The dashboard's ``gateway/static/js/protocol.js`` names every code and name as ``gateway/wire.py`` does.

The JS module is parsed as text (one ``NAME: value,`` per line inside ``Object.freeze({...})``, and
``export const NAME = value;`` for scalars), so this runs without node or a browser.
"""

from __future__ import annotations

import enum
import json
import re

import pytest

from gateway import wire
from support import ROOT

PROTOCOL_JS = ROOT / "gateway" / "static" / "js" / "protocol.js"
ENUMS = ("ErrorCode", "EventType", "CloseReason", "TurnStatus", "CloseCode", "Method")
SCALARS = ("PROTOCOL_VERSION", "JSONRPC_VERSION", "SUBPROTOCOL", "TOKEN_SUBPROTOCOL_PREFIX", "COOKIE_NAME")


def parse_protocol_js(text: str) -> tuple[dict[str, dict[str, object]], dict[str, object]]:
    """(frozen objects by name, scalar constants by name) of the module's exports."""
    objects: dict[str, dict[str, object]] = {}
    for match in re.finditer(r"^export const (\w+) = Object\.freeze\(\{\n(.*?)^\}\);", text, re.M | re.S):
        entries: dict[str, object] = {}
        for line in match.group(2).splitlines():
            entry = re.fullmatch(r"\s*(\w+): (.+),", line)
            assert entry, f"{match.group(1)}: a line that is not `NAME: value,`: {line!r}"
            entries[entry.group(1)] = json.loads(entry.group(2))
        objects[match.group(1)] = entries
    scalars = {m.group(1): json.loads(m.group(2))
               for m in re.finditer(r"^export const (\w+) = ([^;{]+);$", text, re.M)}
    return objects, scalars


def test_the_parser_reads_what_it_is_given() -> None:
    text = 'export const A = 1;\nexport const B = Object.freeze({\n  X: "x",\n  Y: -2,\n});\n'
    objects, scalars = parse_protocol_js(text)
    assert objects == {"B": {"X": "x", "Y": -2}} and scalars == {"A": 1}


@pytest.mark.parametrize("name", ENUMS)
def test_each_enum_matches_wire_py(name: str) -> None:
    objects, _ = parse_protocol_js(PROTOCOL_JS.read_text())
    python: type[enum.Enum] = getattr(wire, name)
    assert objects[name] == {member.name: member.value for member in python}


def test_scalar_constants_match_wire_py() -> None:
    _, scalars = parse_protocol_js(PROTOCOL_JS.read_text())
    assert {name: scalars[name] for name in SCALARS} == {name: getattr(wire, name) for name in SCALARS}


def test_no_wire_enum_is_forgotten() -> None:
    """A new enum in wire.py must be mirrored (or listed here as server-only)."""
    server_only: set[str] = set()
    python_enums = {name for name, value in vars(wire).items()
                    if isinstance(value, type) and issubclass(value, enum.Enum) and value.__module__ == wire.__name__}
    assert python_enums - server_only == set(ENUMS)
