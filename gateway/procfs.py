"""Erase a secret from this process's ``/proc/<pid>/cmdline`` and ``/proc/<pid>/environ`` (Linux).

``os.environ.pop`` removes a variable from libc's table but not from the memory block that
``/proc/<pid>/environ`` shows, and ``--token T`` stays in ``/proc/<pid>/cmdline`` (readable by every local
user unless ``/proc`` is mounted with ``hidepid``).  Both blocks are plain memory of this process, whose
bounds the kernel publishes in ``/proc/self/stat`` (``arg_start``..``env_end``); overwriting the secret's
bytes there makes it disappear from both files.  Python keeps its own copies (``sys.argv``,
``os.environ``), so nothing in the interpreter reads these bytes again.

Limits: the secret was visible from ``exec`` until this runs (a fraction of a second), and elsewhere than
Linux this does nothing (:func:`erase_secret` returns False); docs/security.md says so.
"""

from __future__ import annotations

import ctypes
import sys

#: Fields of /proc/self/stat (1-based, man 5 proc) that bound the argument and environment blocks.
_ARG_START, _ARG_END, _ENV_START, _ENV_END = 48, 49, 50, 51


def memory_bounds(stat_line: str) -> tuple[int, int, int, int] | None:
    """``(arg_start, arg_end, env_start, env_end)`` from a ``/proc/<pid>/stat`` line, or None when it lacks
    them (old kernels, or zeros when the process may not read them)."""
    # Field 2 (comm) is parenthesised and may hold spaces or ')': fields 3.. follow the last ')'.
    tail = stat_line.rsplit(")", 1)[-1].split()
    if len(tail) < _ENV_END - 2:
        return None
    values = tuple(int(tail[field - 3]) for field in (_ARG_START, _ARG_END, _ENV_START, _ENV_END))
    arg_start, arg_end, env_start, env_end = values
    if not arg_start or arg_end < arg_start or env_end < env_start:
        return None
    return arg_start, arg_end, env_start, env_end


def secret_spans(block: bytes, secret: bytes, env_name: bytes | None = None) -> list[tuple[int, int]]:
    """``(offset, length)`` of secrets in a NUL-separated block: an argument equal to ``secret``, the value
    of ``--option=secret``, and (with ``env_name``) the value of ``NAME=...``, whatever it is.  Only whole
    values: other strings are left alone (libc's environment still points into the environment block)."""
    spans, offset = [], 0
    for item in block.split(b"\0"):
        value_at = None
        if item == secret:
            value_at = 0
        elif item.startswith(b"-") and item.endswith(b"=" + secret):
            value_at = len(item) - len(secret)
        elif env_name is not None and item.startswith(env_name + b"="):
            value_at = len(env_name) + 1
        if value_at is not None and len(item) > value_at:
            spans.append((offset + value_at, len(item) - value_at))
        offset += len(item) + 1
    return spans


def erase_secret(secret: str, env_name: str) -> bool:
    """Overwrite with ``*`` the secret where it is a command-line value, and the value of the environment
    variable ``env_name`` whatever it is (call after removing that variable from ``os.environ``).  Returns
    whether the blocks could be reached (Linux with a readable ``/proc/self/stat``)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/self/stat") as f:
            bounds = memory_bounds(f.read())
    except OSError:
        return False
    if bounds is None:
        return False
    arg_start, arg_end, env_start, env_end = bounds
    needle = secret.encode("utf-8", "surrogateescape") if secret else b"\0"  # b"\0": matches no argument
    for start, end, name in ((arg_start, arg_end, None), (env_start, env_end, env_name.encode())):
        if end <= start:
            continue
        block = ctypes.string_at(start, end - start)
        for offset, length in secret_spans(block, needle, name):
            ctypes.memset(start + offset, ord("*"), length)
    return True
