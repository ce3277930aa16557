"""The store's writer process: the loop that feeds :class:`SqliteWriter` from the gateway's pipe.

Started by :class:`gateway.store.EventStore` as ``python -m gateway.store.writer_main``, in its own
session (terminal signals go to the gateway, which then closes the store in order).  It blocks in
``poll()`` on the request pipe and on a pidfd of the gateway, and exits when

- the gateway sends CLOSE (after committing and answering everything before it),
- the pipe reaches EOF (every copy of the gateway's write end is closed: the gateway died), or
- the gateway's pidfd fires (it died, but a forked child still holds the pipe open): the writer then
  drains what the pipe already holds without waiting for more.

In the last two cases it commits what it read before exiting, so the log holds every event the gateway
handed over (events still in the dead gateway's memory were never acknowledged, hence never shown).
Group commit falls out of the loop: it reads whatever is ready (up to a batch), then commits once.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import sqlite3
import sys
import time
from pathlib import Path

from gateway.store.pipe import StoreOp
from gateway.store.sqlite_writer import DatabaseOpenError, SqliteWriter, open_database
from workers.channel import FrameScanner, Kind, control_frame

_READ_SIZE = 1024 * 1024
#: How often a failing commit (disk full, I/O error) is retried.
RETRY_S = 0.5
#: While commits fail, stop reading the pipe once this many bytes wait in memory: the gateway's own
#: bounded buffer then fills and it applies backpressure; nothing is dropped.
HOLD_BYTES = 64 * 1024 * 1024
#: Idle wake-up, for retention; the parent is watched by its pidfd, or polled at this period without one.
IDLE_POLL_S = 0.5


class _Gateway:
    """The answer pipe.  A write to a dead gateway is ignored: the writer still commits, then exits."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.gone = False

    def send(self, frames: list[bytes]) -> None:
        if self.gone or not frames:
            return
        view = memoryview(b"".join(frames))
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError:
            self.gone = True


def _parent_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run(
    *,
    db: Path,
    read_fd: int,
    write_fd: int,
    parent_pid: int,
    retention_s: float,
    max_bytes: int,
    maintenance_every_s: float,
    max_page_count: int | None,
) -> int:
    gateway = _Gateway(write_fd)
    try:
        conn = open_database(db, max_page_count=max_page_count)
    except DatabaseOpenError as exc:
        gateway.send(
            [
                control_frame(
                    StoreOp.OPEN_FAILED, {"kind": exc.kind.value, "path": str(exc.path), "message": exc.message}
                )
            ]
        )
        return 3
    writer = SqliteWriter(conn, retention_s=retention_s, max_bytes=max_bytes, maintenance_every_s=maintenance_every_s)
    gateway.send(
        [control_frame(StoreOp.READY, {"pid": os.getpid(), "path": str(db), "sqlite_version": sqlite3.sqlite_version})]
    )
    try:
        pidfd: int | None = os.pidfd_open(parent_pid)
    except ProcessLookupError:
        pidfd = -1
    except (AttributeError, OSError):
        pidfd = None
    os.set_blocking(read_fd, False)
    poller = select.poll()
    poller.register(read_fd, select.POLLIN)
    if pidfd is not None and pidfd >= 0:
        poller.register(pidfd, select.POLLIN)
    # One buffer for every read, frames parsed in place (only each body is copied out), as the gateway's
    # own pipe readers do: no per-read allocation, no compaction of a growing buffer.
    buffer = memoryview(bytearray(_READ_SIZE))
    scanner = FrameScanner()
    ending = pidfd == -1  # the gateway is already gone
    eof = False
    next_retry = 0.0
    listening_paused = False
    while True:
        now = time.monotonic()
        degraded_wait = writer.health is not None and writer.queued_writes and now < next_retry
        if eof or ending or (writer.has_work and not degraded_wait):
            timeout_ms = 0
        elif degraded_wait:
            timeout_ms = max(1, int((next_retry - now) * 1000))
        elif writer.maintenance_due():
            timeout_ms = 0
        else:
            timeout_ms = int(IDLE_POLL_S * 1000)
        holding = writer.health is not None and writer.queued_bytes > HOLD_BYTES
        if holding != listening_paused:  # not reading: do not wake up for data we will not read
            poller.modify(read_fd, 0 if holding else select.POLLIN)
            listening_paused = holding
        ready = poller.poll(timeout_ms)
        idle = not ready and timeout_ms == int(IDLE_POLL_S * 1000)
        for fd, mask in ready:
            if fd == pidfd:
                ending = True
            elif holding and mask & (select.POLLHUP | select.POLLERR):
                ending = True  # the gateway closed the pipe while we hold unwritable data: last attempt
        if pidfd is None and not _parent_alive(parent_pid):
            ending = True
        closing = False
        while not eof and (writer.queued_bytes <= HOLD_BYTES if writer.health else not writer.batch_full):
            try:
                n = os.readv(read_fd, [buffer])
            except BlockingIOError:
                break
            if not n:
                eof = True
                break
            frames = scanner.feed(buffer[:n])
            if scanner.error is not None:
                print(
                    f"worker-gateway store writer: corrupt request stream ({scanner.error}); committing what "
                    "came before it and exiting",
                    file=sys.stderr,
                )
                eof = True
            for frame in frames:
                if frame.kind is Kind.CONTROL and frame.name == StoreOp.CLOSE:
                    closing = True
                try:
                    writer.submit(frame)
                except (ValueError, KeyError) as exc:
                    print(
                        f"worker-gateway store writer: ignoring a bad request frame {frame.name!r}: {exc}",
                        file=sys.stderr,
                    )
            if eof:
                break
        final = eof or ending or closing
        if writer.has_work:
            now = time.monotonic()
            retry = writer.health is None or now >= next_retry or final
            health_before = writer.health
            gateway.send(writer.commit() if retry else writer.answer_requests())
            if writer.health is not None and (retry or health_before is None):
                next_retry = now + RETRY_S
            if writer.checkpoint_due and not final:
                writer.checkpoint()  # after the acknowledgements went out: off the commit's path
        if final:
            if writer.health is not None and writer.queued_writes:
                break  # the last attempt failed too: exit loudly rather than spin
            if not (ending and not eof and _more_ready(read_fd)):
                break  # what the pipe held is committed
        elif writer.maintenance_due() and writer.health is None:
            writer.maintenance_step()
        elif idle and writer.health is None:
            writer.checkpoint()  # a whole idle period passed: a checkpoint now costs nobody a wait
    lost_rows, lost_bytes = writer.queued_writes, writer.queued_bytes
    writer.close()
    if lost_rows:
        print(
            f"worker-gateway store writer: {lost_rows} writes ({lost_bytes} bytes of events) could not be "
            f"written ({writer.health}); none of them had been acknowledged",
            file=sys.stderr,
        )
        return 1
    return 0


def _more_ready(fd: int) -> bool:
    ready = select.poll()
    ready.register(fd, select.POLLIN)
    return any(mask & select.POLLIN for _fd, mask in ready.poll(0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.store.writer_main")
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--read-fd", type=int, required=True)
    parser.add_argument("--write-fd", type=int, required=True)
    parser.add_argument(
        "--lock-fd",
        type=int,
        required=True,
        help="held open: the state-dir lock lives as "
        "long as the writer does, so no second writer can start while this one commits",
    )
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--retention-s", type=float, required=True)
    parser.add_argument("--max-bytes", type=int, required=True)
    parser.add_argument("--maintenance-every-s", type=float, default=5.0)
    parser.add_argument("--max-page-count", type=int, default=None, help="test hook: a size-limited file")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the gateway decides when the store ends
    logging.basicConfig(level=logging.WARNING, format="worker-gateway store writer: %(message)s")
    return run(
        db=args.db,
        read_fd=args.read_fd,
        write_fd=args.write_fd,
        parent_pid=args.parent_pid,
        retention_s=args.retention_s,
        max_bytes=args.max_bytes,
        maintenance_every_s=args.maintenance_every_s,
        max_page_count=args.max_page_count,
    )


if __name__ == "__main__":
    sys.exit(main())
