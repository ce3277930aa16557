"""pipe.encode_append_head: the APPEND frame written as a head plus the untouched event bytes."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from gateway.store import pipe
from gateway.store.pipe import StoreOp
from workers.channel import MAX_FRAME_BYTES, FrameDecoder, Kind


@given(sid=st.text(min_size=1, max_size=40), seq=st.integers(0, 2**63), etype=st.text(max_size=30),
       data=st.binary(max_size=3000))
def test_head_then_bytes_is_the_append_frame(sid: str, seq: int, etype: str, data: bytes) -> None:
    assume(len(etype.encode()) <= 255)
    wire = pipe.encode_append_head(sid, seq, etype, len(data)) + data
    assert wire == pipe.encode_append(sid, seq, etype, data)
    [frame] = FrameDecoder().feed(wire)
    assert (frame.kind, frame.name) == (Kind.EVENT, StoreOp.APPEND)
    assert pipe.decode_append(frame.body) == (sid, seq, etype, data)


def test_head_refuses_what_the_frame_codec_refuses() -> None:
    with pytest.raises(ValueError, match="255"):
        pipe.encode_append_head("s", 1, "t" * 256, 10)
    with pytest.raises(ValueError, match="limit"):
        pipe.encode_append_head("s", 1, "tool.output", MAX_FRAME_BYTES)
