"""The server frame builder against websockets' own serialization (the bytes the send_text path writes)."""

from __future__ import annotations

import pytest
from websockets.frames import Frame, Opcode

from gateway import wsframes

BOUNDARIES = [0, 1, 125, 126, 127, 65535, 65536, 65537, 200_000]


def _websockets_text_frame(payload: bytes) -> bytes:
    return Frame(Opcode.TEXT, payload).serialize(mask=False)


@pytest.mark.parametrize("length", BOUNDARIES)
def test_text_frame_matches_websockets(length: int) -> None:
    payload = (b"0123456789abcdef" * (length // 16 + 1))[:length]
    assert wsframes.text_frame(payload) == _websockets_text_frame(payload)
    assert wsframes.text_header(length) + payload == _websockets_text_frame(payload)


@pytest.mark.parametrize("length", BOUNDARIES)
def test_header_size_by_length(length: int) -> None:
    expected = 2 if length <= 125 else 4 if length <= 65535 else 10
    assert len(wsframes.text_header(length)) == expected


def test_utf8_payload_is_carried_unchanged() -> None:
    payload = '{"text":"héllo ✓ 🚀"}'.encode()
    assert wsframes.text_frame(payload) == _websockets_text_frame(payload)


def test_refuses_impossible_length() -> None:
    with pytest.raises(ValueError):
        wsframes.text_header(1 << 63)
