"""A real HTTP server on loopback that speaks the Chat Completions streaming format, scripted per
scenario, recording every request it gets (so tests assert what the agent sent).

Each request takes the next queued :class:`Script`; with none queued it answers 500 "no script", which a
test then sees as a clear error.  Responses are HTTP/1.0, delimited by closing the connection, so a "cut"
stream is simply one that closes early.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Pause:
    """Wait this long before the next step (a slow stream)."""
    seconds: float


@dataclass(frozen=True)
class Stall:
    """Send nothing more until the client goes away or the server closes (a stalled stream)."""


@dataclass
class Script:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    steps: list[bytes | Pause | Stall] = field(default_factory=list)
    stall_before_headers: bool = False  #: take the request, then answer nothing at all


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> bytes:
    choices = [] if delta is None and finish is None else [{"index": 0, "delta": delta or {}, "finish_reason": finish}]
    return sse({"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": choices, **extra})


def text_script(*pieces: str, finish: str = "stop", usage: dict[str, int] | None = None,
                reasoning: list[str] | None = None) -> Script:
    steps: list[bytes | Pause | Stall] = [chunk({"role": "assistant"})]
    steps += [chunk({"reasoning_content": r}) for r in reasoning or []]
    steps += [chunk({"content": p}) for p in pieces]
    steps.append(chunk({}, finish))
    steps.append(chunk(None, usage=usage or {"prompt_tokens": 7, "completion_tokens": len(pieces),
                                              "total_tokens": 7 + len(pieces)}))
    steps.append(DONE)
    return Script(steps=steps)


def tool_script(*calls: tuple[str, str, str], split: int = 5, repeat_name: bool = False) -> Script:
    """Tool calls ``(call_id, name, arguments JSON)``, the arguments split into pieces of ``split``
    characters, interleaved across calls; ``repeat_name`` mimics llama.cpp (the name in every delta)."""
    steps: list[bytes | Pause | Stall] = [chunk({"role": "assistant", "content": None})]
    pieces = [[args[i:i + split] for i in range(0, len(args), split)] or [""] for _, _, args in calls]
    for index, (call_id, name, _) in enumerate(calls):
        steps.append(chunk({"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                            "function": {"name": name, "arguments": ""}}]}))
    for step in range(max(len(p) for p in pieces)):
        for index, (call_id, name, _) in enumerate(calls):
            if step < len(pieces[index]):
                function = {"arguments": pieces[index][step]}
                if repeat_name:
                    function["name"] = name
                steps.append(chunk({"tool_calls": [{"index": index, "function": function}]}))
    steps.append(chunk({}, "tool_calls"))
    steps.append(DONE)
    return Script(steps=steps)


def error_script(status: int, message: str, retry_after: str | None = None) -> Script:
    headers = {"Content-Type": "application/json"}
    if retry_after is not None:
        headers["Retry-After"] = retry_after
    return Script(status=status, headers=headers,
                  steps=[json.dumps({"error": {"message": message, "type": "test", "code": status}}).encode()])


class FakeOpenAI:
    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self._scripts: deque[Script] = deque()
        self._lock = threading.Lock()
        self._released = threading.Event()
        self.stalled = threading.Event()  #: set when a request reached a Stall step
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = {"unparsed": raw.decode(errors="replace")}
                with fake._lock:
                    fake.requests.append(Recorded(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                    script = fake._scripts.popleft() if fake._scripts else error_script(500, "fake server: no script")
                if script.stall_before_headers:
                    fake.stalled.set()
                    fake._released.wait(120)
                    return
                self.send_response(script.status)
                headers = {"Content-Type": "text/event-stream", **script.headers}
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                try:
                    for step in script.steps:
                        if isinstance(step, Pause):
                            if fake._released.wait(step.seconds):
                                return
                        elif isinstance(step, Stall):
                            fake.stalled.set()
                            fake._released.wait(120)
                            return
                        else:
                            self.wfile.write(step)
                            self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-openai", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def push(self, *scripts: Script) -> None:
        with self._lock:
            self._scripts.extend(scripts)

    def wait_requests(self, count: int, timeout: float = 20.0) -> list[Recorded]:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"the fake server got {len(self.requests)} requests, not {count}")
            time.sleep(0.02)
        return self.requests

    def close(self) -> None:
        self._released.set()
        self._server.shutdown()
        self._server.server_close()
