"""The ``openai`` agent's settings: the worker's environment, then the session's ``options`` (pure apart
from reading ``os.environ`` in :func:`from_environment`).

The key and the header values are secrets: they stay in this object (``repr`` hides them) and are never
put in an event, a log line or the agent's snapshot.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

KNOWN_TOOLS = ("shell", "delegate")
DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-4o-mini"
ENV_BASE_URL = ("WORKER_GATEWAY_OPENAI_BASE_URL", "OPENAI_BASE_URL")  # first set wins
ENV_API_KEY = ("WORKER_GATEWAY_OPENAI_API_KEY", "OPENAI_API_KEY")
ENV_MODEL = ("WORKER_GATEWAY_OPENAI_MODEL", "OPENAI_MODEL")


class OptionError(ValueError):
    """A session option has a wrong value; the message names the option and what it accepts."""


@dataclass(frozen=True)
class Settings:
    base_url: str = DEFAULT_BASE_URL
    api_key: str | None = field(default=None, repr=False)
    model: str = DEFAULT_MODEL
    system: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    tools: tuple[str, ...] = KNOWN_TOOLS
    max_tool_rounds: int = 8
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    history_chars: int = 200_000  #: the history budget (characters, see history.py)
    tool_timeout_s: float = 60.0  #: per tool call
    tool_output_chars: int = 16_000  #: what one tool call may send back to the model (and stream)
    max_retries: int = 3  #: before the first token only (retry.py)
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 300.0  #: a silent stream longer than this fails the turn
    #: sent with the first request of each turn only (later rounds let the model answer): "auto", "none",
    #: "required" or {"type": "function", "function": {"name": ...}} to force one tool (small models)
    tool_choice: str | dict[str, Any] | None = None

    @property
    def chat_url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    def request_headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream", **self.headers}
        if self.api_key and not any(k.lower() == "authorization" for k in self.headers):
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def secrets(self) -> list[str]:
        """Literal values to redact from anything that leaves the worker (tool output)."""
        values = [self.api_key or "", *self.headers.values()]
        return [v for v in values if len(v) >= 8]


def from_environment(options: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if environ is None else environ
    base = Settings(
        base_url=_first(env, ENV_BASE_URL) or DEFAULT_BASE_URL,
        api_key=_first(env, ENV_API_KEY),
        model=_first(env, ENV_MODEL) or DEFAULT_MODEL,
    )
    return apply_options(base, options)


def _first(env: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    for name in names:
        if env.get(name):
            return env[name]
    return None


def apply_options(base: Settings, options: Mapping[str, Any]) -> Settings:
    """``base`` with the session's options applied; raises :class:`OptionError` naming a bad option."""
    unknown = sorted(set(options) - set(_PARSERS))
    if unknown:
        raise OptionError(f"unknown option {unknown[0]!r} for the openai agent (known: {', '.join(sorted(_PARSERS))})")
    values: dict[str, Any] = {}
    for name, value in options.items():
        if value is None:
            continue
        values[name] = _PARSERS[name](name, value)
    return Settings(**{**base.__dict__, **values})


def _url(name: str, value: Any) -> str:
    if not isinstance(value, str) or urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).netloc:
        raise OptionError(
            f"option {name!r} must be an http(s) URL such as http://127.0.0.1:8080/v1, got {_show(value)}"
        )
    return value


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise OptionError(f"option {name!r} must be a non-empty string, got {_show(value)}")
    return value


def _number(low: float, high: float):
    def parse(name: str, value: Any) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or not low <= value <= high
        ):
            raise OptionError(f"option {name!r} must be a number from {low:g} to {high:g}, got {_show(value)}")
        return float(value)

    return parse


def _integer(low: int, high: int):
    def parse(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise OptionError(f"option {name!r} must be an integer from {low} to {high}, got {_show(value)}")
        return value

    return parse


def _tools(name: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise OptionError(
            f"option {name!r} must be a list of tool names ({', '.join(KNOWN_TOOLS)}), got {_show(value)}"
        )
    for tool in value:
        if tool not in KNOWN_TOOLS:
            raise OptionError(f"option {name!r}: unknown tool {tool!r} (known: {', '.join(KNOWN_TOOLS)})")
    return tuple(dict.fromkeys(value))


def _headers(name: str, value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and k and isinstance(v, str) for k, v in value.items()
    ):
        # never show the value: header values are secrets
        raise OptionError(f"option {name!r} must be an object mapping header names to string values")
    for key, header_value in value.items():
        if any(c in key + header_value for c in "\r\n"):
            raise OptionError(f"option {name!r}: header {key!r} contains a line break")
    return dict(value)


def _tool_choice(name: str, value: Any) -> str | dict[str, Any]:
    if value in ("auto", "none", "required"):
        return value
    function = value.get("function") if isinstance(value, dict) else None
    if (
        isinstance(value, dict)
        and value.get("type") == "function"
        and isinstance(function, dict)
        and function.get("name") in KNOWN_TOOLS
    ):
        return {"type": "function", "function": {"name": function["name"]}}
    raise OptionError(
        f"option {name!r} must be 'auto', 'none', 'required' or "
        f"{{'type': 'function', 'function': {{'name': <a tool>}}}}, got {_show(value)}"
    )


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_PARSERS = {
    "base_url": _url,
    "model": _text,
    "system": _text,
    "temperature": _number(0.0, 2.0),
    "max_tokens": _integer(1, 10_000_000),
    "tools": _tools,
    "max_tool_rounds": _integer(1, 100),
    "headers": _headers,
    "history_chars": _integer(1_000, 100_000_000),
    "tool_timeout_s": _number(0.1, 3600.0),
    "tool_output_chars": _integer(100, 10_000_000),
    "max_retries": _integer(0, 10),
    "connect_timeout_s": _number(0.1, 600.0),
    "read_timeout_s": _number(0.1, 3600.0),
    "tool_choice": _tool_choice,
}
