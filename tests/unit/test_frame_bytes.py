"""Frames as bytes: a worker's payload is made valid UTF-8 once (as the old ``decode("replace")`` did),
and the gateway's own ``str`` frames are encoded once, a lone surrogate costing only its character."""

from __future__ import annotations

import pytest

from gateway import rpc
from gateway.sessions.stream import EventStream
from gateway.store.memory import MemoryEventLog


@pytest.mark.parametrize("data", [b"", b'{"text":"ascii"}', '{"text":"héllo ✓ 🚀"}'.encode()])
def test_valid_utf8_is_returned_as_is(data: bytes) -> None:
    assert rpc.valid_utf8(data) is data


@pytest.mark.parametrize("data", [b"\xff", b"caf\xc3", b"\xed\xa0\x80", b'{"t":"\xe2\x9c ok \xe2\x9c\x93"}'])
def test_invalid_utf8_is_replaced_like_decode_replace(data: bytes) -> None:
    fixed = rpc.valid_utf8(data)
    assert fixed == data.decode("utf-8", "replace").encode("utf-8")
    fixed.decode("utf-8")  # strict: valid now


def test_text_bytes_replaces_only_a_lone_surrogate() -> None:
    assert rpc.text_bytes("héllo") == "héllo".encode()
    assert rpc.text_bytes("a\ud800b") == b"a?b"
    assert rpc.text_bytes("pair \U0001f680") == "pair \U0001f680".encode()


def test_produce_keeps_the_same_bytes_in_the_log_as_it_returns() -> None:
    stream = EventStream("s1", MemoryEventLog(100, 10**6), reader_max_events=50, reader_max_bytes=10**6)
    frame = stream.produce("message.delta", b'{"text":"bad \xff"}')
    assert isinstance(frame, bytes) and stream.log.get(1) is frame
    assert frame.endswith('"payload":{"text":"bad \ufffd"}}}'.encode())
    ok = stream.produce("message.delta", b'{"text":"fine"}')
    assert ok == b'{"jsonrpc":"2.0","method":"event","params":{"type":"message.delta","session_id":"s1","seq":2,"payload":{"text":"fine"}}}'


def test_produce_accepts_a_memoryview_payload() -> None:
    stream = EventStream("s1", MemoryEventLog(100, 10**6), reader_max_events=50, reader_max_bytes=10**6)
    buffer = bytearray(b'xx{"text":"caf\xc3\xa9 \xff"}yy')
    frame = stream.produce("message.delta", memoryview(buffer)[2:-2])
    assert frame.endswith('"payload":{"text":"café \ufffd"}}}'.encode())
