"""The frame codec (pure) and its two I/O endpoints (asyncio for the gateway, blocking for workers)."""

from __future__ import annotations

import asyncio
import os
import struct
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.channel import (
    HEADER_SIZE, MAX_FRAME_BYTES, BlockingChannel, ChannelError, Frame, FrameDecoder, Kind, control_frame,
    encode_frame, event_frame, open_frame_reader, open_frame_writer)

SAMPLE = [
    Frame(Kind.CONTROL, "init", b'{"agent":"echo"}'),
    Frame(Kind.EVENT, "message.delta", '{"text":"h\u00e9llo"}'.encode()),
    Frame(Kind.EVENT, "turn.complete", b""),
    Frame(Kind.CONTROL, "x" * 255, b"\x00\xff" * 100),
]
STREAM = b"".join(encode_frame(f.kind, f.name, f.body) for f in SAMPLE)


# -- codec ------------------------------------------------------------------------------------------------

def test_frames_round_trip_in_one_feed() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(STREAM) == SAMPLE
    assert decoder.buffered == 0
    decoder.eof()


def test_byte_at_a_time_feeding_yields_every_frame_once() -> None:
    decoder = FrameDecoder()
    frames = [f for i in range(len(STREAM)) for f in decoder.feed(STREAM[i:i + 1])]
    assert frames == SAMPLE


def test_stream_split_at_every_byte_boundary() -> None:
    for cut in range(len(STREAM) + 1):
        decoder = FrameDecoder()
        assert decoder.feed(STREAM[:cut]) + decoder.feed(STREAM[cut:]) == SAMPLE, f"cut at {cut}"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_arbitrary_partial_reads_reassemble(cuts: list[int]) -> None:
    decoder = FrameDecoder()
    bounds = [0, *sorted(cuts), len(STREAM)]
    frames = [f for a, b in zip(bounds, bounds[1:]) for f in decoder.feed(STREAM[a:b])]
    assert frames == SAMPLE


def test_eof_inside_a_frame_is_corruption() -> None:
    decoder = FrameDecoder()
    decoder.feed(STREAM[:-3])
    with pytest.raises(ChannelError, match="inside a frame"):
        decoder.eof()


def test_oversize_length_is_rejected_before_buffering() -> None:
    decoder = FrameDecoder(max_frame_bytes=1024)
    with pytest.raises(ChannelError, match="corrupt frame header"):
        decoder.feed(struct.pack(">IBB", 1025, 1, 0))
    with pytest.raises(ChannelError):  # the decoder stays broken: the stream cannot resynchronise
        decoder.feed(STREAM)


@pytest.mark.parametrize("header", [
    struct.pack(">IBB", 1, 1, 0),  # shorter than kind + name_len
    struct.pack(">IBB", 4, 1, 10),  # name longer than the frame
    struct.pack(">IBB", 10, 7, 0),  # unknown kind
    struct.pack(">IBB", MAX_FRAME_BYTES + 1, 1, 0),
])
def test_corrupt_header_raises(header: bytes) -> None:
    with pytest.raises(ChannelError):
        FrameDecoder().feed(header + b"\x00" * 16)


def test_non_ascii_name_raises() -> None:
    raw = struct.pack(">IBB", 4, 2, 2) + "\u00e9".encode()
    with pytest.raises(ChannelError, match="ASCII"):
        FrameDecoder().feed(raw)


def test_encoder_refuses_what_the_decoder_would_reject() -> None:
    with pytest.raises(ValueError):
        encode_frame(Kind.EVENT, "n" * 256)
    with pytest.raises(ValueError):
        encode_frame(Kind.EVENT, "big", b"\x00" * MAX_FRAME_BYTES)


def test_event_payload_is_carried_pre_encoded() -> None:
    (frame,) = FrameDecoder().feed(event_frame("tool.output", {"text": "a\nb", "redactions": 0}))
    assert frame.body == b'{"text":"a\\nb","redactions":0}'
    (control,) = FrameDecoder().feed(control_frame("cancel", {"turn_id": "t1"}))
    assert control.json() == {"turn_id": "t1"}


# -- asyncio endpoint -------------------------------------------------------------------------------------

async def _collect(reader) -> list[Frame]:
    return [frame async for frame in reader]


async def test_reader_yields_frames_then_ends_at_eof() -> None:
    r, w = os.pipe()
    reader = await open_frame_reader(r)
    os.write(w, STREAM)
    os.close(w)
    assert await asyncio.wait_for(_collect(reader), 5) == SAMPLE


async def test_reader_raises_on_corruption_after_good_frames() -> None:
    r, w = os.pipe()
    reader = await open_frame_reader(r)
    os.write(w, encode_frame(Kind.EVENT, "ok", b"1"))
    got = await asyncio.wait_for(anext(reader), 5)
    assert got.name == "ok"
    os.write(w, struct.pack(">IBB", 3, 9, 0) + b"\x00")
    with pytest.raises(ChannelError):
        await asyncio.wait_for(anext(reader), 5)
    os.close(w)


async def test_reader_reports_truncated_stream() -> None:
    r, w = os.pipe()
    reader = await open_frame_reader(r)
    os.write(w, STREAM[:-1])
    os.close(w)
    with pytest.raises(ChannelError, match="inside a frame"):
        await asyncio.wait_for(_collect(reader), 5)


async def test_slow_consumer_pauses_the_pipe_and_loses_nothing() -> None:
    """The writer blocks on a full pipe while the reader's queue stays bounded; then everything arrives."""
    r, w = os.pipe()
    limit = 64 * 1024
    reader = await open_frame_reader(r, max_queued_bytes=limit)
    payload = b"x" * 4000
    total = 2000  # ~8 MB: far more than queue + pipe buffer
    wrote = threading.Event()
    progress = [0]

    def produce() -> None:
        with os.fdopen(w, "wb", buffering=0) as pipe:
            for i in range(total):
                pipe.write(encode_frame(Kind.EVENT, "tool.output", payload + str(i).encode()))
                progress[0] = i + 1
        wrote.set()

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not reader.paused:  # the consumer has not read anything yet
        assert loop.time() < deadline, "reader never paused"
        await asyncio.sleep(0.01)
    # The writer goes on until the pipe's buffer is full; wait until it has stopped (a slow machine
    # schedules it late), then check that it stays stopped while nothing is read.
    stalled_at, still = -1, 0
    while still < 20:
        assert loop.time() < deadline + 10, "the writer never stopped"
        still = still + 1 if progress[0] == stalled_at else 0
        stalled_at = progress[0]
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)  # proves a negative: a non-blocking writer would run ahead in this window
    assert progress[0] == stalled_at < total, "the writer was not held back"
    assert reader.queued_bytes <= limit + 256 * 1024 + HEADER_SIZE + 8000
    received = 0
    async for frame in reader:
        assert frame.body == payload + str(received).encode()
        received += 1
        assert reader.queued_bytes <= limit + 256 * 1024 + HEADER_SIZE + 8000
    assert received == total
    assert wrote.wait(5)


async def test_writer_sends_frames_and_reports_a_closed_peer() -> None:
    r, w = os.pipe()
    writer = await open_frame_writer(w)
    assert writer.write(control_frame("prompt", {"turn_id": "t1", "text": "hi"}))
    channel = BlockingChannel(r, os.open(os.devnull, os.O_WRONLY))
    frame = await asyncio.to_thread(channel.recv)
    assert frame == Frame(Kind.CONTROL, "prompt", b'{"turn_id":"t1","text":"hi"}')
    channel.close()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while not writer.closed:  # the transport notices the read end went away
        writer.write(control_frame("cancel", {}))
        assert loop.time() < deadline
        await asyncio.sleep(0.01)
    assert writer.write(control_frame("cancel", {})) is False


# -- blocking endpoint ------------------------------------------------------------------------------------

def test_blocking_channel_round_trip_and_eof() -> None:
    a_r, a_w = os.pipe()
    b_r, b_w = os.pipe()
    left = BlockingChannel(a_r, b_w)
    right = BlockingChannel(b_r, a_w)
    big = "y" * 300_000  # larger than a pipe buffer: written in several partial writes
    sender = threading.Thread(target=lambda: (right.send_event("tool.output", {"text": big}),
                                              right.send_control("ready", {"pid": 1})))
    sender.start()
    first = left.recv()
    assert first is not None and first.name == "tool.output" and len(first.body) > 300_000
    second = left.recv()
    assert second is not None and second.json() == {"pid": 1}
    sender.join()
    right.close()
    assert left.recv() is None
    assert left.recv() is None
    left.close()


def test_blocking_sends_from_threads_never_interleave() -> None:
    r, w = os.pipe()
    sink = BlockingChannel(r, os.open(os.devnull, os.O_WRONLY))
    source = BlockingChannel(os.open(os.devnull, os.O_RDONLY), w)
    threads = [threading.Thread(target=lambda n=n: [source.send_event(f"t{n}", {"i": i, "pad": "z" * 5000})
                                                     for i in range(50)]) for n in range(4)]
    for t in threads:
        t.start()
    got = [sink.recv() for _ in range(200)]
    for t in threads:
        t.join()
    assert sorted(f.name for f in got if f) == sorted(f"t{n}" for n in range(4) for _ in range(50))
    source.close()
    sink.close()
