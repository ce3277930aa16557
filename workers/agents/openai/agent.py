"""``openai``: a chat agent for any server speaking the Chat Completions streaming format (PROTOCOL 7).

One turn is a conversation loop: stream the model's answer (``message.delta``, ``reasoning.delta``), run
the tool calls it asked for (``tool.call``, ``tool.output``), send the results back, until it answers
without tools or ``max_tool_rounds`` is reached.  ``delegate`` runs the same loop nested, as a subagent
with a fresh history and no ``delegate`` of its own.  Whatever happens (an interrupt, a provider error)
the history keeps everything up to that point, trimmed to ``history_chars``, and survives the worker
through ``snapshot`` / ``restore``.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from workers.agents.base import Agent, TurnCancelled, TurnHandle, TurnResult
from workers.agents.openai.history import Message, trim_history, valid_history
from workers.agents.openai.settings import ENV_API_KEY, Settings, from_environment
from workers.agents.openai.stream import DONE, ProviderError, make_client, stream_chunks
from workers.agents.openai.tool_calls import ToolCall, ToolCallAccumulator
from workers.agents.openai.tools import MAX_PARALLEL_DELEGATES, SUBAGENT_SYSTEM, run_shell_tool, tool_specs

SNAPSHOT_VERSION = 1
_INTERRUPTED_RESULT = "[not run: the turn was interrupted]"
_SUMMARY_EVENT_CHARS = 16_000


class OpenAIAgent(Agent):
    def __init__(self, options: Any, cwd: str) -> None:
        super().__init__({}, cwd)  # the raw options hold header values: keep only the parsed settings
        self.settings: Settings = from_environment(options)
        self.history: list[Message] = []
        self._client = make_client(self.settings)
        self._delegates = threading.BoundedSemaphore(MAX_PARALLEL_DELEGATES)
        self._tool_env = {k: v for k, v in os.environ.items() if k not in ENV_API_KEY}

    def run_turn(self, text: str, turn: TurnHandle) -> TurnResult | None:
        messages = [*self.history, {"role": "user", "content": text}]
        usage = _Usage()
        conversation = _Conversation(
            self, turn, _ParentView(turn), self.settings.tools, self.settings.system, usage, self.settings.tool_choice
        )
        try:
            outcome = conversation.run(messages)
        finally:
            self.history = trim_history(messages, self.settings.history_chars)
        extra: dict[str, Any] = {"usage": usage.totals(), "finish_reason": outcome.finish_reason}
        if outcome.provider_status is not None:
            extra["provider_status"] = outcome.provider_status
        return TurnResult(outcome.status, error=outcome.error, extra=extra)  # type: ignore[arg-type]

    def snapshot(self) -> Any:
        return {"version": SNAPSHOT_VERSION, "history": self.history}

    def restore(self, state: Any) -> None:
        if not isinstance(state, dict) or state.get("version") != SNAPSHOT_VERSION:
            raise ValueError(f"not an openai agent snapshot of version {SNAPSHOT_VERSION}")
        self.history = trim_history(valid_history(state.get("history")), self.settings.history_chars)


@dataclass
class _Outcome:
    status: str
    summary: str = ""
    finish_reason: str | None = None
    error: str | None = None
    provider_status: int | None = None


class _Usage:
    """Token usage summed over every request of a turn (subagents' included); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals: dict[str, int] = {}

    def add(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        with self._lock:
            for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
                value = usage.get(key)
                if isinstance(value, int) and not isinstance(value, bool):
                    self._totals[key] = self._totals.get(key, 0) + value

    def totals(self) -> dict[str, int] | None:
        with self._lock:
            return dict(self._totals) or None


class _ParentView:
    """Where the top-level conversation's output goes: the turn's own events."""

    subagent_id: str | None = None

    def __init__(self, turn: TurnHandle) -> None:
        self.turn = turn

    def content(self, text: str) -> None:
        self.turn.delta(text)

    def reasoning(self, text: str) -> None:
        self.turn.reasoning(text)

    def tool_call(self, call_id: str, name: str, arguments: Any) -> None:
        self.turn.tool_call(call_id, name, arguments)

    def tool_output(self, call_id: str, text: str) -> str:
        return self.turn.scrubbed_tool_output(text, call_id=call_id)[0]


class _SubagentView(_ParentView):
    """A subagent's output: its text as ``subagent.progress``, the rest tagged with its ``subagent_id``."""

    def __init__(self, turn: TurnHandle, subagent_id: str) -> None:
        super().__init__(turn)
        self.subagent_id = subagent_id
        self._id = subagent_id

    def content(self, text: str) -> None:
        self.turn.subagent_progress(self._id, text=text)

    def reasoning(self, text: str) -> None:
        self.turn.reasoning(text, subagent_id=self.subagent_id)

    def tool_call(self, call_id: str, name: str, arguments: Any) -> None:
        self.turn.tool_call(call_id, name, arguments, subagent_id=self.subagent_id)

    def tool_output(self, call_id: str, text: str) -> str:
        return self.turn.scrubbed_tool_output(text, call_id=call_id, subagent_id=self.subagent_id)[0]


@dataclass
class _Round:
    """What one streamed answer brought so far (kept when the stream is interrupted or fails)."""

    content: list[str] = field(default_factory=list)
    calls: ToolCallAccumulator = field(default_factory=ToolCallAccumulator)
    finish_reason: str | None = None
    done: bool = False

    def text(self) -> str:
        return "".join(self.content)


class _Conversation:
    def __init__(
        self,
        agent: OpenAIAgent,
        turn: TurnHandle,
        view: _ParentView,
        tools: tuple[str, ...],
        system: str | None,
        usage: _Usage,
        tool_choice: Any = None,
    ) -> None:
        self._agent = agent
        self._settings = agent.settings
        self._turn = turn
        self._view = view
        self._tools = tools
        self._system = system
        self._usage = usage
        self._tool_choice = tool_choice  # for the first request only

    def run(self, messages: list[Message]) -> _Outcome:
        """Run rounds until the model answers without tools; ``messages`` grows in place with every
        message of the exchange, so the caller keeps them whatever the outcome."""
        rounds = 0
        while True:
            current = _Round()
            try:
                self._stream(messages, current)
            except TurnCancelled:
                _keep_partial(messages, current)
                return _Outcome("interrupted", current.text(), current.finish_reason)
            except ProviderError as exc:
                _keep_partial(messages, current)
                if self._turn.cancelled:  # the error is the interrupt's doing (its socket was shut down)
                    return _Outcome("interrupted", current.text(), current.finish_reason)
                return _Outcome("error", current.text(), current.finish_reason, str(exc), exc.status)
            calls = current.calls.calls(id_prefix=f"call_{len(messages)}")
            assistant: Message = {"role": "assistant", "content": current.text() or None}
            if calls:
                assistant["tool_calls"] = [call.as_message_entry() for call in calls]
            messages.append(assistant)
            if not calls:
                return _Outcome("ok", current.text(), current.finish_reason)
            if rounds >= self._settings.max_tool_rounds:
                limit = self._settings.max_tool_rounds
                _answer_all(
                    messages, calls, [f"[not run: the limit of {limit} tool rounds per turn was reached]"] * len(calls)
                )
                return _Outcome(
                    "error",
                    current.text(),
                    current.finish_reason,
                    f"stopped after {limit} tool rounds (option max_tool_rounds)",
                )
            rounds += 1
            _answer_all(messages, calls, self._run_tools(calls))
            if self._turn.cancelled:
                return _Outcome("interrupted", current.text(), current.finish_reason)

    def _request(self, messages: list[Message]) -> dict[str, Any]:
        settings = self._settings
        system = [{"role": "system", "content": self._system}] if self._system else []
        body: dict[str, Any] = {
            "model": settings.model,
            "messages": system + messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if settings.temperature is not None:
            body["temperature"] = settings.temperature
        if settings.max_tokens is not None:
            body["max_tokens"] = settings.max_tokens
        if self._tools:
            body["tools"] = tool_specs(self._tools)
            if self._tool_choice is not None:
                body["tool_choice"] = self._tool_choice
                self._tool_choice = None
        return body

    def _stream(self, messages: list[Message], current: _Round) -> None:
        for chunk in stream_chunks(self._agent._client, self._settings, self._request(messages), self._turn):
            if chunk is DONE:
                current.done = True
                break
            self._usage.add(chunk.get("usage"))
            choices = chunk.get("choices")
            for choice in choices if isinstance(choices, list) else ():
                if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                    continue
                raw_delta = choice.get("delta")
                delta: dict[str, Any] = raw_delta if isinstance(raw_delta, dict) else {}
                reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                if isinstance(reasoning, str) and reasoning:
                    self._view.reasoning(reasoning)
                content = delta.get("content")
                if isinstance(content, str) and content:
                    current.content.append(content)
                    self._view.content(content)
                current.calls.add(delta.get("tool_calls"))
                if isinstance(choice.get("finish_reason"), str):
                    current.finish_reason = choice["finish_reason"]
            self._turn.check_cancelled()
        self._turn.check_cancelled()
        if not current.done and current.finish_reason is None:
            raise ProviderError("the stream ended before a finish_reason or [DONE]: it was cut off")

    def _run_tools(self, calls: list[ToolCall]) -> list[str]:
        """Each call's result for the model, in call order.  Delegates run in parallel (bounded), shell
        commands one after another; after a cancel, what did not run says so."""
        results: list[str | None] = [None] * len(calls)
        pending: dict[int, Future[str]] = {}
        with ThreadPoolExecutor(MAX_PARALLEL_DELEGATES, thread_name_prefix="delegate") as pool:
            for index, call in enumerate(calls):
                try:
                    arguments = call.parsed_arguments()
                except ValueError as exc:
                    self._view.tool_call(call.call_id, call.name, call.arguments)
                    results[index] = f"error: {exc}"
                    continue
                self._view.tool_call(call.call_id, call.name, arguments)
                if call.name not in self._tools:
                    available = ", ".join(self._tools) or "none"
                    results[index] = f"error: no tool named {call.name!r} here (available: {available})"
                elif self._turn.cancelled:
                    results[index] = _INTERRUPTED_RESULT
                elif call.name == "delegate":
                    pending[index] = pool.submit(self._delegate, call, arguments)
                else:
                    results[index] = self._shell(call, arguments)
            for index, future in pending.items():
                results[index] = future.result()
        return [result if result is not None else _INTERRUPTED_RESULT for result in results]

    def _shell(self, call: ToolCall, arguments: dict[str, Any]) -> str:
        command = arguments.get("command")
        if not isinstance(command, str) or not command.strip():
            return "error: the shell tool needs a non-empty 'command' string"
        settings = self._settings
        try:
            return run_shell_tool(
                command,
                cwd=self._agent.cwd,
                turn=self._turn,
                emit_output=lambda text: self._view.tool_output(call.call_id, text),
                env=self._agent._tool_env,
                secrets=settings.secrets(),
                timeout_s=settings.tool_timeout_s,
                output_chars=settings.tool_output_chars,
            )
        except OSError as exc:  # e.g. the session's cwd is gone: the model gets the reason, the turn goes on
            return f"error: the command could not be started: {exc}"

    def _delegate(self, call: ToolCall, arguments: dict[str, Any]) -> str:
        task = arguments.get("task")
        if not isinstance(task, str) or not task.strip():
            return "error: the delegate tool needs a non-empty 'task' string"
        context = arguments.get("context")
        prompt = task if not isinstance(context, str) or not context else f"{task}\n\nContext:\n{context}"
        with self._agent._delegates:
            if self._turn.cancelled:
                return _INTERRUPTED_RESULT
            subagent_id = self._turn.subagent_start(task=task, call_id=call.call_id)
            child = _Conversation(
                self._agent,
                self._turn,
                _SubagentView(self._turn, subagent_id),
                tuple(t for t in self._tools if t != "delegate"),
                SUBAGENT_SYSTEM,
                self._usage,
            )
            try:
                outcome = child.run([{"role": "user", "content": prompt}])
            except Exception as exc:  # a subagent's failure is the parent's tool result, not its crash
                outcome = _Outcome("error", error=f"{type(exc).__name__}: {exc}")
            # The event shows the summary within one chunk's size (events stay <= 64 KiB); the parent
            # model gets all of it.
            fields: dict[str, Any] = {"status": outcome.status, "summary": outcome.summary[:_SUMMARY_EVENT_CHARS]}
            if len(outcome.summary) > _SUMMARY_EVENT_CHARS:
                fields["summary_truncated"] = True
            if outcome.error:
                fields["error"] = outcome.error
            self._turn.subagent_complete(subagent_id, **fields)
        if outcome.status == "ok":
            return outcome.summary
        return f"[subagent {outcome.status}: {outcome.error or 'no summary'}]\n{outcome.summary}".rstrip()


def _keep_partial(messages: list[Message], current: _Round) -> None:
    """An answer cut short keeps its text (the user saw it); its unfinished tool calls are dropped."""
    if current.content:
        messages.append({"role": "assistant", "content": current.text()})


def _answer_all(messages: list[Message], calls: list[ToolCall], results: list[str]) -> None:
    for call, result in zip(calls, results, strict=False):
        messages.append({"role": "tool", "tool_call_id": call.call_id, "content": result})
