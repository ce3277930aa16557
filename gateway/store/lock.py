"""The state-directory lock: one gateway (and its writer) per state dir, and a loud refusal for a second.

``flock`` on ``<state_dir>/lock``, with the holder's pid written inside so the refusal can name it.  The
lock belongs to the open file description, which the writer process inherits: the directory stays locked
until the gateway *and* its writer are gone, so a new gateway never starts a second writer on a database
the old writer is still committing to.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from gateway.store.errors import StoreError, StoreLocked

try:
    import fcntl
except ImportError:  # Windows: no flock, no pidfd; the store is POSIX-only (run with --no-state)
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = "lock"


def prepare_state_dir(state_dir: Path) -> Path:
    """Create the directory (mode 0700: sessions hold prompts and outputs) and return it resolved."""
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create the state directory {state_dir}: {exc.strerror or exc}") from exc
    return state_dir.resolve()


def acquire_lock(state_dir: Path, orphan_wait_s: float = 5.0) -> int:
    """Lock ``state_dir`` for this process; returns the lock file's fd (close it to release).

    When the recorded holder is dead but the lock is still held, its writer process is committing what it
    had before it exits (it inherited the lock): wait up to ``orphan_wait_s`` for it, so a gateway
    restarted right after a crash gets its state dir back."""
    deadline = time.monotonic() + orphan_wait_s
    while True:
        try:
            return _try_lock(state_dir)
        except StoreLocked as exc:
            if exc.holder_pid is None or _alive(exc.holder_pid) or time.monotonic() >= deadline:
                raise
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed gateway that its parent has not reaped yet is a zombie: dead for our purpose
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _try_lock(state_dir: Path) -> int:
    path = state_dir / LOCK_NAME
    if fcntl is None:
        raise StoreError("the session store needs a POSIX system (flock); start with --no-state")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StoreError(f"cannot open the lock file {path}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_pid(fd)
        os.close(fd)
        who = f"pid {holder}" if holder is not None else "another process"
        raise StoreLocked(
            f"the state directory {state_dir} is in use by another gateway ({who}); stop it, or start this "
            "one with another --state-dir (or --no-state)",
            holder,
        ) from None
    except OSError as exc:
        os.close(fd)
        raise StoreError(f"cannot lock {path}: {exc.strerror or exc}") from exc
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None
