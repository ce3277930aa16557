"""Worker CPU per event: scrub + JSON-encode, before (nine regex passes, ``json.dumps``) vs after (one
prefilter pass, orjson).  Issue 18 §1 and §4.

No processes, no sockets: the exact code a worker runs for ``turn.tool_output`` / ``turn.delta``
(``Scrubber.scrub_chunks``, then ``event_frame`` per chunk), timed in this process.  Rounds alternate
before/after so a noisy neighbour hits both sides alike; the table gives the median and range of the
per-round means.  ``python -m bench.bench_encode [--quick]`` prints the section.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from bench.report import Options, Section, table
from bench.stats import median
from workers.agents.load import _chunk_text, fake_secrets
from workers.channel import Kind, encode_frame, event_frame
from workers.scrub import MAX_CHUNK_BYTES, PrefilterKind, Scrubber

KEY = "encode"


def _stdlib_event_frame(event_type: str, payload: Any) -> bytes:
    """What ``event_frame`` did before orjson."""
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return encode_frame(Kind.EVENT, event_type, body)


Frame = Callable[[str, Any], bytes]


def _tool_output(scrubber: Scrubber, frame: Frame, text: str) -> None:
    """The body of ``TurnHandle.tool_output``."""
    for chunk, count in scrubber.scrub_chunks(text, MAX_CHUNK_BYTES):
        frame("tool.output", {"turn_id": "t1", "text": chunk, "redactions": count})


def _cases() -> list[tuple[str, str, bool]]:
    """(label, text, scrubbed?) — deltas are the agent's own reply and are not scrubbed."""
    return [
        ("`tool.output` 64 KiB, no secret (`load` filler)", _chunk_text("unit 1/1 chunk 1", 65536, []), True),
        ("`tool.output` 64 KiB, 9 secrets", _chunk_text("unit 1/1 chunk 2", 65536, fake_secrets(9)), True),
        ("`tool.output` 1 KiB", _chunk_text("unit 1/1 chunk 3", 1024, []), True),
        ("`tool.output` 40 B", "building target //app:server ... done\n", True),
        ("`message.delta` 20 B (no scrub)", "the quick brown fox ", False),
    ]


def _per_call_us(fn: Callable[[], None], budget_s: float) -> float:
    """Mean µs per call over about ``budget_s`` of calls (at least 5)."""
    fn()
    calls = 0
    started = time.perf_counter()
    while calls < 5 or time.perf_counter() - started < budget_s:
        fn()
        calls += 1
    return (time.perf_counter() - started) / calls * 1e6


def _available_backends() -> dict[PrefilterKind, Scrubber]:
    found = {}
    for kind in (PrefilterKind.HYPERSCAN, PrefilterKind.RE2, PrefilterKind.NONE):
        try:
            found[kind] = Scrubber(prefilter=kind)
        except Exception:  # that library is not installed here
            continue
    return found


def measure(rounds: int, budget_s: float) -> dict[str, Any]:
    before_scrub = Scrubber(prefilter=PrefilterKind.NONE)  # every rule runs: the previous algorithm
    after_scrub = Scrubber()
    backends = _available_backends()
    rows: list[dict[str, Any]] = []
    for label, text, scrubbed in _cases():
        payload = {"turn_id": "t1", "text": text, "redactions": 0}
        samples: dict[str, list[float]] = {k: [] for k in ("enc_before", "enc_after", "scrub_before",
                                                            "scrub_after", "total_before", "total_after")}
        for r in range(rounds):
            sides = [("before", _stdlib_event_frame, before_scrub), ("after", event_frame, after_scrub)]
            if r % 2:
                sides.reverse()
            for side, frame, scrubber in sides:
                samples[f"enc_{side}"].append(_per_call_us(lambda: frame("tool.output", payload), budget_s))
                if scrubbed:
                    samples[f"scrub_{side}"].append(
                        _per_call_us(lambda: list(scrubber.scrub_chunks(text, MAX_CHUNK_BYTES)), budget_s))
                    samples[f"total_{side}"].append(
                        _per_call_us(lambda: _tool_output(scrubber, frame, text), budget_s))
                else:
                    samples[f"total_{side}"].append(samples[f"enc_{side}"][-1])
        rows.append({"label": label, "scrubbed": scrubbed, **samples})
    by_backend = {}
    text = _cases()[0][1]
    for kind, scrubber in backends.items():
        by_backend[kind.value] = median([_per_call_us(lambda: scrubber.scrub(text), budget_s)
                                         for _ in range(rounds)])
    return {"rows": rows, "backend": after_scrub.prefilter.value, "by_backend": by_backend}


def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    low, mid, high = min(values), median(values), max(values)
    return f"{mid:,.1f} ({low:,.1f}–{high:,.1f})" if high - low >= 0.05 * mid else f"{mid:,.1f}"


def _ratio(before: list[float], after: list[float]) -> str:
    return f"{median(before) / median(after):.1f}×" if before and after else "–"


def render(result: dict[str, Any], rounds: int) -> str:
    rows = [(r["label"], _cell(r["enc_before"]), _cell(r["enc_after"]), _cell(r["scrub_before"]),
             _cell(r["scrub_after"]), _cell(r["total_before"]), _cell(r["total_after"]),
             _ratio(r["total_before"], r["total_after"])) for r in result["rows"]]
    backends = [(f"`{name}`" + (" (used)" if name == result["backend"] else ""), f"{us:,.1f}")
                for name, us in result["by_backend"].items()]
    return "\n\n".join([
        f"µs of worker CPU per event, median of {rounds} alternating rounds (range). *Encode*: payload → "
        "frame bytes (`json.dumps` before, orjson after); *scrub*: text → ≤ 64 KiB chunks (all nine rule "
        f"passes before, the `{result['backend']}` prefilter and the rules it selects after); *total*: the "
        "whole `turn.tool_output` path.",
        table(("event", "encode before", "encode after", "scrub before", "scrub after", "total before",
               "total after", "speed-up"), rows),
        "Scrub of one 64 KiB chunk without secrets, by prefilter backend (µs; `none` = every rule runs):",
        table(("prefilter", "µs per 64 KiB"), backends),
    ])


async def run(opts: Options) -> Section:
    rounds = opts.pick(9, 3)
    started = time.perf_counter()
    result = await asyncio.to_thread(measure, rounds, 0.05 if opts.quick else 0.2)
    return Section(KEY, "8. Worker CPU per event: scrub + encode", ".venv/bin/python -m bench --only encode",
                   render(result, rounds), seconds=time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_encode", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args(argv)
    section = asyncio.run(run(Options(quick=args.quick, rounds=args.rounds)))
    print(f"## {section.title}\n\n{section.body}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
