"""``load``: a synthetic long turn for load tests (PROTOCOL section 7).

The prompt is space-separated ``key=value`` pairs, all optional:

=============  =========================================================================================
``cpu_s``      float >= 0 (default 0): seconds of CPU (thread CPU time) spent by the turn
``gil``        ``python`` (default: a pure-Python loop, which lets other threads in every few ms) or
               ``regex`` (single ``re`` calls with catastrophic backtracking, each holding the GIL for
               ~1-2 s, calibrated on first use)
``output_mb``  float >= 0 (default 0): MiB of ``tool.output`` text
``chunk_kb``   int 1..64 (default 64): KiB of text per output event
``subagents``  int >= 0 (default 0): nested subagents sharing the CPU and output budget, each emitting
               ``subagent.start``, ``subagent.progress`` events and ``subagent.complete``
``secrets``    int >= 0 (default 0): fake secrets of every kind the scrubber knows, embedded in the output
=============  =========================================================================================

CPU work and output are interleaved in proportion; cancellation is checked between every slice of CPU
work (50 ms, or one regex call) and every chunk.
"""

from __future__ import annotations

import math
import random
import re
import string
import time
from dataclasses import dataclass, fields

from workers.agents.base import Agent, TurnHandle, TurnResult

_MIB = 1024 * 1024
_PYTHON_SLICE_S = 0.05
_REGEX_CALL_S = 1.5
_LIMITS = {"cpu_s": 86400.0, "output_mb": 65536.0, "subagents": 1000, "secrets": 100000}


class LoadPromptError(ValueError):
    """The prompt has an unknown key or a bad value; the message names the key."""


@dataclass(frozen=True)
class LoadPlan:
    cpu_s: float = 0.0
    gil: str = "python"
    output_mb: float = 0.0
    chunk_kb: int = 64
    subagents: int = 0
    secrets: int = 0


def parse_plan(text: str) -> LoadPlan:
    """Parse a ``load`` prompt; raise :class:`LoadPromptError` naming the offending key."""
    known = {f.name for f in fields(LoadPlan)}
    values: dict[str, object] = {}
    for token in text.split():
        key, sep, raw = token.partition("=")
        if not sep:
            raise LoadPromptError(f"expected key=value, got {token!r} (keys: {', '.join(sorted(known))})")
        if key not in known:
            raise LoadPromptError(f"unknown key {key!r} (keys: {', '.join(sorted(known))})")
        values[key] = _parse_value(key, raw)
    return LoadPlan(**values)  # type: ignore[arg-type]


def _parse_value(key: str, raw: str) -> object:
    if key == "gil":
        if raw not in ("python", "regex"):
            raise LoadPromptError(f"bad value for gil: {raw!r} (expected python or regex)")
        return raw
    if key in ("cpu_s", "output_mb"):
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0 or value > _LIMITS[key]:
            raise LoadPromptError(f"bad value for {key}: {raw!r} (expected a number from 0 to {_LIMITS[key]:g})")
        return value
    low, high = (1, 64) if key == "chunk_kb" else (0, int(_LIMITS[key]))
    try:
        number = int(raw)
    except ValueError:
        number = low - 1
    if not low <= number <= high:
        raise LoadPromptError(f"bad value for {key}: {raw!r} (expected an integer from {low} to {high})")
    return number


@dataclass(frozen=True)
class FakeSecret:
    """A realistic-looking secret; ``value`` is the part that must never leave the worker."""

    kind: str
    text: str
    value: str


def fake_secrets(count: int) -> list[FakeSecret]:
    """``count`` fake secrets cycling through every kind the scrubber knows (deterministic, so tests can
    check that none of them leaks)."""
    return [_fake_secret(index) for index in range(count)]


def _fake_secret(index: int) -> FakeSecret:
    rng = random.Random(index)

    def token(length: int, alphabet: str = string.ascii_letters + string.digits) -> str:
        return "".join(rng.choice(alphabet) for _ in range(length))

    kind = index % 9
    if kind == 0:
        value = "AKIA" + token(16, string.ascii_uppercase + string.digits)
        return FakeSecret("aws_access_key", f"aws_access_key_id = {value}", value)
    if kind == 1:
        value = "sk-proj-" + token(40)
        return FakeSecret("api_key", f"OPENAI_API_KEY={value}", value)
    if kind == 2:
        value = "ghp_" + token(36)
        return FakeSecret("github_token", f"GITHUB_TOKEN={value}", value)
    if kind == 3:
        value = "xoxb-" + token(12, string.digits) + "-" + token(24)
        return FakeSecret("slack_token", f"slack: {value}", value)
    if kind == 4:
        value = token(40)
        return FakeSecret("bearer", f"Authorization: Bearer {value}", value)
    if kind == 5:
        value = token(16)
        return FakeSecret("url_password", f"DATABASE_URL=postgres://app:{value}@db.internal:5432/app", value)
    if kind == 6:
        value = "\n".join(token(64, string.ascii_letters + string.digits + "+/") for _ in range(4))
        return FakeSecret("private_key", f"-----BEGIN RSA PRIVATE KEY-----\n{value}\n-----END RSA PRIVATE KEY-----",
                          value)
    if kind == 7:
        value = "sk-ant-api03-" + token(40)
        return FakeSecret("api_key", f"ANTHROPIC_API_KEY={value}", value)
    value = "github_pat_" + token(22) + "_" + token(59)
    return FakeSecret("github_pat", f"GH_PAT={value}", value)


_FILLER_LINE = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt\n"
_FILLER = _FILLER_LINE * (65 * 1024 // len(_FILLER_LINE) + 2)


def _chunk_text(label: str, size: int, secrets: list[FakeSecret]) -> str:
    """``size`` bytes of ASCII output (more if the secrets alone exceed it)."""
    head = f"[{label}]\n" + "".join(s.text + "\n" for s in secrets)
    return head + _FILLER[:max(0, size - len(head))]


class LoadAgent(Agent):
    def run_turn(self, text: str, turn: TurnHandle) -> TurnResult | None:
        try:
            plan = parse_plan(text)
        except LoadPromptError as exc:
            return TurnResult("error", error=str(exc))
        turn.delta(f"load: cpu_s={plan.cpu_s:g} gil={plan.gil} output_mb={plan.output_mb:g} "
                   f"chunk_kb={plan.chunk_kb} subagents={plan.subagents} secrets={plan.secrets}\n")
        units = max(1, plan.subagents)
        secrets = fake_secrets(plan.secrets)
        total_bytes = int(plan.output_mb * _MIB)
        started = time.thread_time()
        for unit in range(units):
            work = _UnitWork(
                turn=turn, plan=plan, label=f"unit {unit + 1}/{units}",
                cpu_s=plan.cpu_s / units,
                out_bytes=total_bytes // units + (total_bytes % units if unit == units - 1 else 0),
                secrets=secrets[unit::units])
            if plan.subagents:
                work.subagent_id = turn.subagent_start(name=f"load-{unit + 1}", goal=work.label)
            finished = work.run()
            if plan.subagents:
                turn.subagent_complete(work.subagent_id or "", status="ok" if finished else "interrupted",
                                       chunks=work.chunks_sent, cpu_s=round(work.cpu_spent, 3))
            if not finished:
                return TurnResult("interrupted")
        turn.delta(f"load done in {time.thread_time() - started:.2f} s of CPU\n")
        return None


class _UnitWork:
    """The share of one subagent (or of the whole turn): CPU slices and output chunks interleaved."""

    def __init__(self, *, turn: TurnHandle, plan: LoadPlan, label: str, cpu_s: float, out_bytes: int,
                 secrets: list[FakeSecret]) -> None:
        self.turn = turn
        self.label = label
        self.subagent_id: str | None = None
        self.cpu_s = cpu_s
        self.cpu_spent = 0.0
        self.chunks_sent = 0
        self._gil = plan.gil
        chunk = plan.chunk_kb * 1024
        self._sizes = [chunk] * (out_bytes // chunk) + ([out_bytes % chunk] if out_bytes % chunk else [])
        if len(self._sizes) < len(secrets):  # too little output to hide them in: give each its own chunk
            self._sizes += [0] * (len(secrets) - len(self._sizes))
        self._secrets_at: dict[int, list[FakeSecret]] = {}
        for k, secret in enumerate(secrets):
            self._secrets_at.setdefault(k * len(self._sizes) // len(secrets), []).append(secret)
        self._next_progress = 0.25

    def run(self) -> bool:
        """Do the work; False if cancelled."""
        total_chunks = len(self._sizes)
        while True:
            if self.turn.cancelled:
                return False
            out_frac = self.chunks_sent / total_chunks if total_chunks else 1.0
            cpu_frac = self.cpu_spent / self.cpu_s if self.cpu_s > 0 else 1.0
            cpu_left = self.cpu_s - self.cpu_spent
            self._report_progress(min(out_frac, cpu_frac))
            if self.chunks_sent < total_chunks and (out_frac <= cpu_frac or cpu_left <= 0.005):
                self._emit_chunk()
            elif cpu_left > 0.005:
                self.cpu_spent += _burn(self._gil, cpu_left)
            else:
                return True

    def _emit_chunk(self) -> None:
        index = self.chunks_sent
        text = _chunk_text(f"{self.label} chunk {index + 1}", self._sizes[index], self._secrets_at.get(index, []))
        extra = {"subagent_id": self.subagent_id} if self.subagent_id else {}
        self.turn.tool_output(text, **extra)
        self.chunks_sent += 1

    def _report_progress(self, fraction: float) -> None:
        if self.subagent_id is None or fraction < self._next_progress:
            return
        self.turn.subagent_progress(self.subagent_id, progress=round(fraction, 3),
                                    chunks=self.chunks_sent, cpu_s=round(self.cpu_spent, 3))
        while self._next_progress <= fraction:
            self._next_progress += 0.25


def _burn(gil: str, budget_s: float) -> float:
    """Spend up to one slice of CPU; return the thread CPU seconds actually spent."""
    start = time.thread_time()
    if gil == "regex":
        _backtrack(min(budget_s, _REGEX_CALL_S))
    else:
        end = start + min(budget_s, _PYTHON_SLICE_S)
        x = 1
        while time.thread_time() < end:
            for _ in range(2000):
                x = (x * 1103515245 + 12345) & 0x7FFFFFFF
    return time.thread_time() - start


# (?:a|aaaa)+$ against "a"*n + "!" explores ~1.38**n paths inside one C call that never releases the GIL
# (a small growth per character lets the calibration size each call finely).
_BACKTRACK = re.compile(r"(?:a|aaaa)+$")
_calibration: tuple[int, float, float] | None = None  # (n, seconds at n, growth per +1)


def _backtrack(target_s: float) -> None:
    """One regex call lasting about ``target_s`` seconds (within ~30%), holding the GIL throughout."""
    global _calibration
    n0, t0, growth = _calibrate()
    n = max(1, min(80, n0 + round(math.log(max(target_s, 1e-4) / t0) / math.log(growth))))
    took = _time_backtrack(n)
    if took > 0.05:  # re-anchor on the latest measurement: growth per step drifts with the size
        _calibration = (n, took, growth)


def _calibrate() -> tuple[int, float, float]:
    global _calibration
    if _calibration is None:
        n = 16
        while (t := _time_backtrack(n)) < 0.005 and n < 60:
            n += 2
        t2 = _time_backtrack(n + 3)
        _calibration = (n + 3, t2, max(1.2, (t2 / t) ** (1 / 3)))
    return _calibration


def _time_backtrack(n: int) -> float:
    subject = "a" * n + "!"
    start = time.thread_time()
    _BACKTRACK.match(subject)
    return time.thread_time() - start
