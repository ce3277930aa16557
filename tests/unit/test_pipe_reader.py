"""The push-mode pipe reader (workers/channel.py FrameScanner, FrameReader, LoopReads) on real pipes, on
the stdlib event loop and on uvloop when it is installed."""

from __future__ import annotations

import asyncio
import errno
import os
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from support import async_wait_for

from workers.channel import (
    ChannelError,
    Frame,
    FrameScanner,
    Kind,
    LoopReads,
    ReaderState,
    encode_frame,
    open_frame_reader,
)

pytestmark = pytest.mark.timeout(60)

LOOPS = ["asyncio"]
try:
    import uvloop

    LOOPS.append("uvloop")
except ImportError:  # pragma: no cover - uvloop is part of the "fast" extra
    uvloop = None  # type: ignore[assignment]


def run(loop_kind: str, main: Callable[[], Awaitable[Any]]) -> Any:
    factory = uvloop.new_event_loop if loop_kind == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


def fd_is_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        return exc.errno == errno.EBADF
    return False


def event(i: int, size: int = 10) -> bytes:
    return encode_frame(Kind.EVENT, "message.delta", b"%06d" % i + b"x" * size)


def body(i: int, size: int = 10) -> bytes:
    return b"%06d" % i + b"x" * size


# -- FrameScanner (pure) ----------------------------------------------------------------------------------


def test_scanner_completes_frames_split_at_every_byte() -> None:
    stream = b"".join(event(i, 300) for i in range(5)) + encode_frame(Kind.CONTROL, "state", b"{}")
    scanner = FrameScanner()
    got: list[Frame] = []
    for b in range(len(stream)):
        got += scanner.feed(memoryview(stream)[b : b + 1])
    assert [f.body for f in got[:5]] == [body(i, 300) for i in range(5)]
    assert got[5] == Frame(Kind.CONTROL, "state", b"{}")
    assert scanner.buffered == 0
    scanner.eof()


def test_scanner_returns_many_frames_from_one_feed_and_copies_them_out() -> None:
    shared = bytearray(64 * 1024)
    data = b"".join(event(i) for i in range(200))
    shared[: len(data)] = data
    frames = FrameScanner().feed(memoryview(shared)[: len(data)])
    shared[:] = b"\xff" * len(shared)  # the buffer is reused by the next read: the frames must not see it
    assert [f.body for f in frames] == [body(i) for i in range(200)]
    assert all(type(f.body) is bytes for f in frames)


def test_scanner_keeps_only_the_partial_frame() -> None:
    one, two = event(1, 1000), event(2, 1000)
    scanner = FrameScanner()
    assert [f.body for f in scanner.feed(memoryview(one + two[:7]))] == [body(1, 1000)]
    assert scanner.buffered == 7
    with pytest.raises(ChannelError, match="inside a frame"):
        scanner.eof()
    assert [f.body for f in scanner.feed(memoryview(two[7:]))] == [body(2, 1000)]
    assert scanner.buffered == 0


def test_scanner_delivers_frames_before_a_corrupt_header_then_stays_broken() -> None:
    scanner = FrameScanner()
    bad = struct.pack(">IBB", 3, 9, 0) + b"\x00"
    frames = scanner.feed(memoryview(event(1) + bad))
    assert [f.body for f in frames] == [body(1)]
    assert isinstance(scanner.error, ChannelError) and "unknown kind" in str(scanner.error)
    with pytest.raises(ChannelError):
        scanner.feed(memoryview(event(2)))


def test_scanner_rejects_an_oversize_length_even_in_the_carry() -> None:
    scanner = FrameScanner(max_frame_bytes=1000)
    header = struct.pack(">IBB", 5000, 1, 1)
    assert scanner.feed(memoryview(header[:3])) == []
    assert scanner.feed(memoryview(header[3:])) == []
    assert scanner.error is not None and "limit 1000" in str(scanner.error)


def test_scanner_rejects_a_non_ascii_name() -> None:
    scanner = FrameScanner()
    raw = struct.pack(">IBB", 3, 1, 1) + b"\xe9"
    assert scanner.feed(memoryview(raw)) == []
    assert scanner.error is not None and "ASCII" in str(scanner.error)


# -- FrameReader on real pipes ----------------------------------------------------------------------------


@pytest.fixture(params=LOOPS)
def loop_kind(request: pytest.FixtureRequest) -> str:
    return request.param


def test_many_frames_arrive_as_one_batch(loop_kind: str) -> None:
    async def main() -> None:
        r, w = os.pipe()
        os.write(w, b"".join(event(i) for i in range(300)))  # already in the pipe: one read takes it all
        reader = await open_frame_reader(r)
        batch = await asyncio.wait_for(reader.next_batch(), 10)
        assert [f.body for f in batch] == [body(i) for i in range(300)]
        os.close(w)
        assert await asyncio.wait_for(reader.next_batch(), 10) == []
        assert reader.at_eof and fd_is_closed(r)

    run(loop_kind, main)


def test_partial_frame_across_reads(loop_kind: str) -> None:
    async def main() -> None:
        r, w = os.pipe()
        reader = await open_frame_reader(r)
        frame = event(7, 5000)
        os.write(w, frame[:3])  # not even a whole header
        await async_wait_for(lambda: reader._scanner.buffered == 3, 10.0, what="the first piece to be read")
        os.write(w, frame[3:2000])
        await async_wait_for(lambda: reader._scanner.buffered == 2000, 10.0, what="the second piece to be read")
        assert reader.queued_bytes == 0
        os.write(w, frame[2000:] + event(8))
        got = [await asyncio.wait_for(anext(reader), 10) for _ in range(2)]
        assert [f.body for f in got] == [body(7, 5000), body(8)]
        os.close(w)
        reader.close()

    run(loop_kind, main)


def test_batches_iterate_until_eof_and_error_comes_after_the_good_frames(loop_kind: str) -> None:
    async def main() -> None:
        r, w = os.pipe()
        reader = await open_frame_reader(r)
        os.write(w, event(1) + event(2) + struct.pack(">IBB", 3, 9, 0) + b"\x00")
        got: list[bytes] = []
        with pytest.raises(ChannelError, match="unknown kind"):
            async for batch in reader.batches():
                got += [f.body for f in batch]
        assert got == [body(1), body(2)]
        assert fd_is_closed(r)  # a corrupt stream closes the pipe at once
        os.close(w)

    run(loop_kind, main)


def test_eof_in_the_middle_of_a_frame(loop_kind: str) -> None:
    async def main() -> None:
        r, w = os.pipe()
        reader = await open_frame_reader(r)
        os.write(w, event(1) + event(2)[:-1])
        os.close(w)
        assert (await asyncio.wait_for(anext(reader), 10)).body == body(1)
        with pytest.raises(ChannelError, match="inside a frame"):
            await asyncio.wait_for(anext(reader), 10)

    run(loop_kind, main)


def test_pause_at_the_bound_and_resume_at_half(loop_kind: str) -> None:
    """The writer blocks on a full pipe while the reader's queue stays within its bound plus one read; a
    batch handed out counts until the next is asked for; then everything arrives, in order."""
    limit = 64 * 1024
    size, total = 4000, 1000  # ~4 MB: far more than the bound plus the pipe
    slack = limit + 64 * 1024 + len(event(0, size))

    async def main() -> None:
        r, w = os.pipe()
        reader = await open_frame_reader(r, max_queued_bytes=limit)
        writer = asyncio.get_running_loop().run_in_executor(None, write_all, w)
        await async_wait_for(lambda: reader.paused, 10.0, what="the reader to pause")
        assert limit <= reader.queued_bytes <= slack
        batch = await reader.next_batch()
        assert batch and reader.queued_bytes == 0
        assert reader.paused  # the batch is still held: the worker stays held back
        got = [f.body for f in batch]
        async for more in reader.batches():  # asking for the next batch releases the previous one
            assert reader.queued_bytes <= slack
            got += [f.body for f in more]
        assert got == [body(i, size) for i in range(total)]
        await writer

    def write_all(w: int) -> None:
        with os.fdopen(w, "wb", buffering=0) as pipe:
            for i in range(total):
                pipe.write(event(i, size))

    run(loop_kind, main)


def test_close_while_paused_closes_the_fd_once_and_still_yields_what_was_queued(loop_kind: str) -> None:
    async def main() -> None:
        r, w = os.pipe()
        os.write(w, b"".join(event(i) for i in range(20)))
        reader = await open_frame_reader(r, max_queued_frames=4)
        await async_wait_for(lambda: reader.paused, 10.0, what="the reader to pause")
        queued = len(reader._frames)
        reader.close()
        assert reader.state is ReaderState.DONE and fd_is_closed(r)
        reused = os.open(os.devnull, os.O_RDONLY)  # likely the same number as r: a second close would hit it
        try:
            reader.close()
            os.fstat(reused)  # still open
            got = [f.body async for f in reader]
            assert got == [body(i) for i in range(queued)]
        finally:
            os.close(reused)
            os.close(w)

    run(loop_kind, main)


def test_fd_closed_exactly_once_at_eof(loop_kind: str) -> None:
    async def main() -> None:
        r, w = os.pipe()
        reader = await open_frame_reader(r)
        os.write(w, event(1))
        os.close(w)
        assert [f.body async for f in reader] == [body(1)]
        assert fd_is_closed(r)
        reused = os.open(os.devnull, os.O_RDONLY)
        try:
            reader.close()
            reader.close()
            os.fstat(reused)
        finally:
            os.close(reused)

    run(loop_kind, main)


def test_readers_share_the_loop_buffer_without_corrupting_one_another(loop_kind: str) -> None:
    """Interleaved partial frames on several pipes, all read through the one buffer of the loop."""

    async def main() -> None:
        pipes = [os.pipe() for _ in range(4)]
        readers = [await open_frame_reader(r) for r, _ in pipes]
        assert len({id(reader._reads.buffer) for reader in readers}) == 1
        assert all(reader._reads is LoopReads.of(asyncio.get_running_loop()) for reader in readers)
        streams = [b"".join(event(n * 1000 + i, 100 + 37 * n) for i in range(60)) for n in range(4)]
        step = 333  # never a frame boundary: every read leaves a carry in every reader
        for offset in range(0, max(map(len, streams)), step):
            for n, (_, w) in enumerate(pipes):
                piece = streams[n][offset : offset + step]
                if piece:
                    os.write(w, piece)
            expected = [min(len(s), offset + step) for s in streams]

            def all_read(expected: list[int] = expected) -> bool:
                return all(
                    reader.queued_bytes + reader._scanner.buffered >= want
                    for reader, want in zip(readers, expected, strict=True)
                )

            await async_wait_for(all_read, 10.0, what="every piece to be read")
        for _, w in pipes:
            os.close(w)
        for n, reader in enumerate(readers):
            got = [f.body async for f in reader]
            assert got == [body(n * 1000 + i, 100 + 37 * n) for i in range(60)]

    run(loop_kind, main)


def test_a_small_read_budget_defers_readers_and_loses_nothing(loop_kind: str) -> None:
    async def main() -> None:
        pipes = [os.pipe() for _ in range(6)]
        for n, (_, w) in enumerate(pipes):  # ~60 KB waiting in every pipe before the first read
            os.write(w, b"".join(event(n * 1000 + i, 6000) for i in range(10)))
            os.close(w)
        readers = [await open_frame_reader(r, read_budget_bytes=64 * 1024) for r, _ in pipes]
        reads = readers[0]._reads
        assert reads.budget.per_iteration == 64 * 1024
        async def drain(reader: Any) -> list[bytes]:
            return [f.body async for f in reader]

        results = await asyncio.wait_for(asyncio.gather(*(drain(reader) for reader in readers)), 20)
        for n, got in enumerate(results):
            assert got == [body(n * 1000 + i, 6000) for i in range(10)]
        assert reads.deferrals > 0  # six readers' 360 KB cannot all be read in one 64 KiB iteration
        assert not reads.deferred

    run(loop_kind, main)


def test_close_while_deferred_leaves_the_queue(loop_kind: str) -> None:
    async def main() -> None:
        pipes = [os.pipe() for _ in range(3)]
        for _, w in pipes:
            os.write(w, event(0, 60000))
        readers = [await open_frame_reader(r, read_budget_bytes=64 * 1024) for r, _ in pipes]
        for _ in range(1000):  # one loop iteration per step: the first read spends the budget
            await asyncio.sleep(0)
            deferred = [n for n, reader in enumerate(readers) if reader.state is ReaderState.DEFERRED]
            if deferred:
                break
        assert deferred, "no reader was deferred"
        n = deferred[0]
        readers[n].close()
        assert readers[n] not in readers[n]._reads.deferred and fd_is_closed(pipes[n][0])
        for m, reader in enumerate(readers):
            if m != n:
                assert (await asyncio.wait_for(anext(reader), 10)).body == body(0, 60000)
                reader.close()
        assert [f async for f in readers[n]] == []
        for _, w in pipes:
            os.close(w)

    run(loop_kind, main)


def test_relay_budget_is_spent_within_an_iteration_and_back_in_the_next(loop_kind: str) -> None:
    async def main() -> None:
        reads = LoopReads.of(asyncio.get_running_loop(), 64 * 1024)
        assert not reads.relay_spent
        reads.spend_relay(40 * 1024)
        assert not reads.relay_spent
        reads.spend_relay(30 * 1024)
        assert reads.relay_spent  # under the minimum read left: spent
        await asyncio.sleep(0)  # the next iteration: its reset ran before this task resumed
        assert not reads.relay_spent and reads.relay.remaining == 64 * 1024

    run(loop_kind, main)


def test_a_closed_loop_does_not_keep_its_shared_state_alive(loop_kind: str) -> None:
    import gc
    import weakref

    async def main() -> weakref.ref[LoopReads]:
        r, w = os.pipe()
        reader = await open_frame_reader(r)
        os.write(w, event(1))
        os.close(w)
        assert [f.body async for f in reader] == [body(1)]
        return weakref.ref(reader._reads)

    state = run(loop_kind, main)
    gc.collect()
    assert state() is None  # the 1 MiB buffer went with its loop
