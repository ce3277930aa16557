"""bench/bench_encode.py compares like with like: both sides produce the same frames, and it renders."""

from __future__ import annotations

from bench import bench_encode
from workers.channel import event_frame
from workers.scrub import PrefilterKind, Scrubber


def test_before_and_after_paths_produce_identical_frames() -> None:
    before, after = Scrubber(prefilter=PrefilterKind.NONE), Scrubber()
    for _, text, _ in bench_encode._cases():
        frames: dict[str, list[bytes]] = {"before": [], "after": []}
        for side, scrubber, frame in (("before", before, bench_encode._stdlib_event_frame),
                                      ("after", after, event_frame)):
            bench_encode._tool_output(scrubber, lambda name, payload: frames[side].append(frame(name, payload))
                                      or b"", text)
        assert frames["before"] == frames["after"] and frames["after"]


def test_measure_renders_a_row_per_case() -> None:
    result = bench_encode.measure(rounds=2, budget_s=0.0)
    text = bench_encode.render(result, 2)
    for label, _, _ in bench_encode._cases():
        assert label in text
    assert all(r["total_before"] and r["total_after"] for r in result["rows"])
    assert "`none`" in text
