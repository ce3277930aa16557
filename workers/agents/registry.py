"""How an agent name resolves: a built-in short name, ``package.module:attr``, or an entry point in the
group ``worker_gateway.agents``.

The gateway only *validates* names (:func:`check_name`, :func:`entry_point_names`: no agent code is
imported there); :func:`load_factory` imports the agent and runs only inside a worker.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

ENTRY_POINT_GROUP = "worker_gateway.agents"
BUILTIN_AGENTS: dict[str, str] = {
    "echo": "workers.agents.echo:EchoAgent",
    "shell": "workers.agents.shell:ShellAgent",
    "load": "workers.agents.load:LoadAgent",
    "openai": "workers.agents.openai:OpenAIAgent",
}
_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


class UnknownAgent(LookupError):
    """The name matches no built-in, entry point or importable ``module:attr`` (error 4004)."""


class AgentLoadError(RuntimeError):
    """The agent exists but importing it failed (error 5001)."""


def entry_point_names() -> list[str]:
    """Names registered in the entry-point group, read from package metadata without importing them."""
    from importlib.metadata import entry_points

    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def is_spec(name: str) -> bool:
    """True for the ``package.module:attr`` form."""
    return _SPEC.fullmatch(name) is not None


def check_name(name: str, entry_points: list[str]) -> None:
    """Raise :class:`UnknownAgent` when ``name`` cannot possibly resolve (cheap: no import)."""
    if name in BUILTIN_AGENTS or name in entry_points or is_spec(name):
        return
    raise UnknownAgent(_unknown_message(name, entry_points))


def load_factory(name: str) -> Callable[..., Any]:
    """Import the agent named ``name`` and return its factory ``(options, cwd) -> agent``."""
    if name in BUILTIN_AGENTS:
        return _load_spec(BUILTIN_AGENTS[name], name)
    if is_spec(name):
        return _load_spec(name, name)
    from importlib.metadata import entry_points

    found = list(entry_points(group=ENTRY_POINT_GROUP, name=name))
    if not found:
        raise UnknownAgent(_unknown_message(name, entry_point_names()))
    try:
        return found[0].load()
    except Exception as exc:
        raise AgentLoadError(
            f"agent {name!r} (entry point {found[0].value}) failed to load: {type(exc).__name__}: {exc}"
        ) from exc


def _load_spec(spec: str, name: str) -> Callable[..., Any]:
    module_name, _, attr_path = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise UnknownAgent(f"unknown agent {name!r}: no module named {exc.name!r}") from exc
        raise AgentLoadError(f"agent {name!r} failed to import: {exc}") from exc
    except Exception as exc:
        raise AgentLoadError(f"agent {name!r} failed to import: {type(exc).__name__}: {exc}") from exc
    target: Any = module
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise UnknownAgent(
                f"unknown agent {name!r}: module {module_name!r} has no attribute {attr_path!r}"
            ) from None
    if not callable(target):
        raise UnknownAgent(f"unknown agent {name!r}: {spec} is not callable")
    return target


def _unknown_message(name: str, entry_points: list[str]) -> str:
    known = ", ".join(sorted(BUILTIN_AGENTS) + entry_points)
    return f"unknown agent {name!r}: use a built-in or installed agent ({known}) or a 'package.module:attr' path"
