"""The tools the ``openai`` agent offers a model: their JSON schemas, and the ``shell`` tool's runner.

The shell tool is the ``shell`` agent's runner (same cwd, same process group: what a command leaves
behind ends with the session), with a timeout and an output cap per call.  Its output is scrubbed before
it leaves the worker, as an event *and* as the tool result the model gets: a secret never reaches the
provider.  The agent's own key and header values are redacted literally on top of the scrubber, and are
not in the command's environment at all.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from workers.agents.base import TurnHandle
from workers.agents.shell import run_command
from workers.scrub import REDACTED

SUBAGENT_SYSTEM = (
    "You are a subagent doing one task for another assistant, with a fresh conversation. "
    "Use the tools you have when they help, then answer with a short, self-contained "
    "summary of the result: it is all the other assistant will see."
)
MAX_PARALLEL_DELEGATES = 3

_SPECS: dict[str, dict[str, Any]] = {
    "shell": {
        "description": "Run a command with /bin/sh -c in the session's working directory. Returns its "
        "output (stdout and stderr merged, secrets redacted) and its exit code.",
        "parameters": {
            "type": "object",
            "properties": {"command": {"type": "string", "description": "the shell command line to run"}},
            "required": ["command"],
        },
    },
    "delegate": {
        "description": "Hand a self-contained task to a subagent that starts with a fresh conversation "
        "and can use the shell tool; returns its summary. Several delegate calls in one "
        f"message run in parallel (at most {MAX_PARALLEL_DELEGATES} at once).",
        "parameters": {
            "type": "object",
            "properties": {
                "task": {"type": "string", "description": "what the subagent must do, with everything it needs"},
                "context": {"type": "string", "description": "optional background for the task"},
            },
            "required": ["task"],
        },
    },
}


def tool_specs(names: tuple[str, ...]) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": name, **_SPECS[name]}} for name in names]


def redact_literals(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def run_shell_tool(
    command: str,
    *,
    cwd: str,
    turn: TurnHandle,
    emit_output: Callable[[str], str],
    env: Mapping[str, str],
    secrets: list[str],
    timeout_s: float,
    output_chars: int,
) -> str:
    """Run ``command``; stream its output through ``emit_output`` (which scrubs, emits and returns the
    scrubbed text); return what the model gets: the scrubbed output, capped, and how the command ended."""
    sent: list[str] = []

    def sink(text: str) -> None:
        sent.append(emit_output(redact_literals(text, secrets)))

    outcome = run_command(command, cwd, turn, sink, env=env, timeout_s=timeout_s, output_cap_bytes=output_chars)
    output = "".join(sent)
    notes = []
    if len(output) > output_chars:
        output = output[:output_chars]
        notes.append(f"[output cut at {output_chars} characters]")
    if outcome.truncated:
        notes.append(f"[the command was stopped: its output passed {output_chars} bytes]")
    if outcome.timed_out:
        notes.append(f"[the command was stopped: it ran longer than {timeout_s:g} s]")
    if outcome.interrupted:
        notes.append("[interrupted by the user]")
    notes.append(f"[exit code {outcome.exit_code}]")
    return output + ("\n" if output and not output.endswith("\n") else "") + "\n".join(notes)
