"""``load``: a synthetic long turn for load tests (PROTOCOL section 7).

The prompt is space-separated ``key=value`` pairs, all optional:

=============  =========================================================================================
``cpu_s``      float >= 0 (default 0): seconds of CPU (thread CPU time) spent by the turn
``gil``        ``python`` (default: a pure-Python loop, which lets other threads in every few ms) or
               ``regex`` (single ``re`` calls with catastrophic backtracking, each holding the GIL for
               up to ~1.5 s, sized from the measured cost of the calls before it)
``output_mb``  float >= 0 (default 0): MiB of ``tool.output`` text
``chunk_kb``   int 1..64 (default 64): KiB of text per output event
``subagents``  int >= 0 (default 0): nested subagents sharing the CPU and output budget, each emitting
               ``subagent.start``, ``subagent.progress`` events and ``subagent.complete``
``secrets``    int >= 0 (default 0): fake secrets of every kind the scrubber knows, embedded in the output
=============  =========================================================================================

CPU work and output are interleaved in proportion; cancellation is checked between every slice of CPU
work (50 ms, or one regex call) and every chunk.

Precision of ``cpu_s`` (thread CPU time of the turn): ``python`` slices stop on the clock, so a turn
lands within a few ms of it.  ``regex`` calls cannot be stopped once started, so each is sized in advance:
a call aims at 1.5 s while more than 3 s are left, then at half of what is left (all of it below 10 ms).
A call costs at most ~1.7x its aim (the per-path cost drifts up to ~1.7x between calls on a loaded
machine) and usually 0.5x-1x (sizes are 1.38x apart and the estimate errs short; short calls are made up
by more calls), so a turn spends ``cpu_s`` to ``cpu_s + 10 ms``; it
overshoots more only if one call runs over 2x its aim, and no call can cost more than ~2.6x the largest
call measured before it.  tests/integration/test_load_regex_budget.py checks ``1.25 * cpu_s + 0.1 s`` over many
turns in fresh workers.
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
        return FakeSecret(
            "private_key", f"-----BEGIN RSA PRIVATE KEY-----\n{value}\n-----END RSA PRIVATE KEY-----", value
        )
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
    return head + _FILLER[: max(0, size - len(head))]


class LoadAgent(Agent):
    def run_turn(self, text: str, turn: TurnHandle) -> TurnResult | None:
        try:
            plan = parse_plan(text)
        except LoadPromptError as exc:
            return TurnResult("error", error=str(exc))
        turn.delta(
            f"load: cpu_s={plan.cpu_s:g} gil={plan.gil} output_mb={plan.output_mb:g} "
            f"chunk_kb={plan.chunk_kb} subagents={plan.subagents} secrets={plan.secrets}\n"
        )
        units = max(1, plan.subagents)
        secrets = fake_secrets(plan.secrets)
        total_bytes = int(plan.output_mb * _MIB)
        started = time.thread_time()
        for unit in range(units):
            work = _UnitWork(
                turn=turn,
                plan=plan,
                label=f"unit {unit + 1}/{units}",
                cpu_s=plan.cpu_s / units,
                out_bytes=total_bytes // units + (total_bytes % units if unit == units - 1 else 0),
                secrets=secrets[unit::units],
            )
            if plan.subagents:
                work.subagent_id = turn.subagent_start(name=f"load-{unit + 1}", goal=work.label)
            finished = work.run()
            if plan.subagents:
                turn.subagent_complete(
                    work.subagent_id or "",
                    status="ok" if finished else "interrupted",
                    chunks=work.chunks_sent,
                    cpu_s=round(work.cpu_spent, 3),
                )
            if not finished:
                return TurnResult("interrupted")
        turn.delta(f"load done in {time.thread_time() - started:.2f} s of CPU\n")
        return None


class _UnitWork:
    """The share of one subagent (or of the whole turn): CPU slices and output chunks interleaved."""

    def __init__(
        self, *, turn: TurnHandle, plan: LoadPlan, label: str, cpu_s: float, out_bytes: int, secrets: list[FakeSecret]
    ) -> None:
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
        self.turn.subagent_progress(
            self.subagent_id, progress=round(fraction, 3), chunks=self.chunks_sent, cpu_s=round(self.cpu_spent, 3)
        )
        while self._next_progress <= fraction:
            self._next_progress += 0.25


def _burn(gil: str, budget_s: float) -> float:
    """Spend up to one slice of CPU; return the thread CPU seconds actually spent."""
    start = time.thread_time()
    if gil == "regex":
        _backtrack(_regex_aim(budget_s))
    else:
        end = start + min(budget_s, _PYTHON_SLICE_S)
        x = 1
        while time.thread_time() < end:
            for _ in range(2000):
                x = (x * 1103515245 + 12345) & 0x7FFFFFFF
    return time.thread_time() - start


def _regex_aim(budget_left_s: float) -> float:
    """The CPU one regex call aims at: a full ``_REGEX_CALL_S`` while plenty is left, then half of what is
    left, so a call that runs up to 2x long still does not overshoot the turn's budget."""
    if budget_left_s <= 2 * _REGEX_CALL_S:
        return budget_left_s / 2 if budget_left_s > _TAIL_S else budget_left_s
    return _REGEX_CALL_S


# (?:a|aaaa)+$ against "a"*n + "!" fails after trying every way to cut a prefix of the a's into pieces of
# 1 and 4, inside one C call that never releases the GIL.  That count is exact arithmetic (paths(n) below,
# growing ~1.3803x per character), so the cost model is ``seconds = k * paths(n)`` and only ``k`` (the
# cost of one path on this machine, which drifts ~1.7x with load) is measured, on every call.
_BACKTRACK = re.compile(r"(?:a|aaaa)+$")
_MAX_N = 90
_TAIL_S = 0.01  # below this, aim at all that is left (halving further only adds calls)
_CALIBRATE_S = 0.001  # the first calls grow until one takes this long, to measure k
_RAMP_CHARS = 3  # never go more than 3 characters (~2.6x paths) past the largest size measured
_K_WINDOW = 4  # k is the largest of the last 4 measurements: errs towards shorter calls


def backtrack_paths(n: int) -> int:
    """Paths the regex explores on ``"a" * n + "!"``: sum over prefixes i <= n of the ways to write i as an
    ordered sum of 1s and 4s (each way is a state the matcher reaches, then fails ``$`` or moves on)."""
    ways = [1] + [0] * n
    for i in range(1, n + 1):
        ways[i] = ways[i - 1] + (ways[i - 4] if i >= 4 else 0)
    return sum(ways)


_PATHS = tuple(backtrack_paths(n) for n in range(_MAX_N + 1))


class BacktrackSizer:
    """Pure core of the regex mode: picks the subject length of the next call from measured calls.

    The growth per character is known exactly, so one measurement of ``k`` at any size predicts every other
    size; the prediction can only be as wrong as ``k`` drifts between two calls.  Two caps keep a wrong
    ``k`` from running away: the size never exceeds the largest measured size by more than
    ``_RAMP_CHARS``, and ``k`` is the largest recent measurement, so calls err short, never long.
    """

    def __init__(self) -> None:
        self._ks: list[float] = []
        self._largest_measured = 0

    @property
    def calibrated(self) -> bool:
        return bool(self._ks)

    def observe(self, n: int, seconds: float) -> None:
        """Record one call's CPU time; calls too short to time reliably only move the ramp."""
        self._largest_measured = max(self._largest_measured, n)
        if seconds >= _CALIBRATE_S:
            self._ks = ([*self._ks, seconds / _PATHS[n]])[-_K_WINDOW:]

    def size_for(self, aim_s: float) -> int:
        """The largest size predicted to cost at most ``aim_s`` (at least 1, at most the ramp)."""
        limit = min(_MAX_N, self._largest_measured + _RAMP_CHARS) if self._largest_measured else 20
        if not self._ks:
            return max(1, limit)
        k = max(self._ks)
        n = 1
        while n < limit and k * _PATHS[n + 1] <= aim_s:
            n += 1
        return n


_sizer = BacktrackSizer()


def _backtrack(aim_s: float) -> None:
    """One regex call (more while uncalibrated) of at most about ``aim_s`` CPU seconds, holding the GIL.

    Precision: a calibrated call costs at most ~1.7x its aim (the per-path cost drifts that much from one
    call to the next under load), usually 0.5x-1x; while calibrating, calls start at 20 characters
    (~70 µs) and grow by at most 3 characters a call.
    """
    while True:
        n = _sizer.size_for(aim_s)
        took = _time_backtrack(n)
        _sizer.observe(n, took)
        if _sizer.calibrated or took >= aim_s:
            return


def _time_backtrack(n: int) -> float:
    subject = "a" * n + "!"
    start = time.thread_time()
    _BACKTRACK.match(subject)
    return time.thread_time() - start
