"""The raw benchmark client's pure parts: the frame scanner, client frames, the handshake check, and the
statistics and goal verdicts of the relay and scale benchmarks."""

from __future__ import annotations

import math
import random
import struct

import pytest

from bench import bench_relay, bench_scale
from bench.stats import ratios, spread
from bench.wsframes import (KEEP_WHOLE, PREFIX_KEEP, Frame, FrameError, FrameScanner, Opcode, accept_value,
                            apply_mask, check_handshake_response, client_frame, handshake_request)


def server_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """An unmasked frame as a server sends it (the encoder under test is the scanner's inverse)."""
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", first, n)
    elif n < 1 << 16:
        header = struct.pack("!BBH", first, 126, n)
    else:
        header = struct.pack("!BBQ", first, 127, n)
    return header + payload


PAYLOADS = [b"", b"x", b"a" * 125, b"b" * 126, b"c" * KEEP_WHOLE, b"d" * (KEEP_WHOLE + 1), bytes(range(256)) * 300,
            b"e" * 70000]
STREAM = b"".join(server_frame(Opcode.TEXT, p) for p in PAYLOADS)


def expected() -> list[Frame]:
    out = []
    for p in PAYLOADS:
        header = 2 if len(p) < 126 else 4 if len(p) < 1 << 16 else 10
        head = p if len(p) <= KEEP_WHOLE else p[:PREFIX_KEEP]
        out.append(Frame(Opcode.TEXT, True, len(p), head, header + len(p)))
    return out


def scan(chunks: list[bytes]) -> tuple[list[Frame], FrameScanner]:
    scanner = FrameScanner()
    frames: list[Frame] = []
    for chunk in chunks:
        frames += scanner.feed(chunk)
    return frames, scanner


def test_whole_stream_in_one_chunk() -> None:
    frames, scanner = scan([STREAM])
    assert frames == expected()
    assert scanner.pending == 0
    assert [f.whole for f in frames] == [len(p) <= KEEP_WHOLE for p in PAYLOADS]


def test_byte_by_byte_gives_the_same_frames() -> None:
    frames, scanner = scan([STREAM[i:i + 1] for i in range(len(STREAM))])
    assert frames == expected()
    assert scanner.pending == 0


@pytest.mark.parametrize("seed", range(20))
def test_random_splits_give_the_same_frames(seed: int) -> None:
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(STREAM)), rng.randint(1, 60)))
    chunks = [STREAM[a:b] for a, b in zip([0, *cuts], [*cuts, len(STREAM)])]
    frames, scanner = scan(chunks)
    assert frames == expected()
    assert scanner.pending == 0


def test_partial_frame_is_pending_until_complete() -> None:
    data = server_frame(Opcode.TEXT, b"hello world")
    scanner = FrameScanner()
    assert scanner.feed(data[:5]) == []
    assert scanner.pending == 5
    assert scanner.feed(data[5:]) == [Frame(Opcode.TEXT, True, 11, b"hello world", 13)]
    assert scanner.pending == 0


def test_big_frame_is_reported_at_its_prefix_and_then_skipped() -> None:
    payload = b"p" * 100000
    data = server_frame(Opcode.TEXT, payload) + server_frame(Opcode.TEXT, b"next")
    scanner = FrameScanner()
    first = scanner.feed(data[:10 + PREFIX_KEEP])
    assert [(f.length, f.head) for f in first] == [(100000, payload[:PREFIX_KEEP])]
    assert scanner.pending == 100000 - PREFIX_KEEP
    assert scanner.feed(data[10 + PREFIX_KEEP:-6]) == []
    assert [f.head for f in scanner.feed(data[-6:])] == [b"next"]


def test_fragments_and_control_frames() -> None:
    data = (server_frame(Opcode.TEXT, b"abc", fin=False) + server_frame(Opcode.PING, b"hi")
            + server_frame(Opcode.CONTINUATION, b"def") + server_frame(Opcode.CLOSE, b"\x03\xe8"))
    frames, _ = scan([data])
    assert [(f.opcode, f.fin, f.head) for f in frames] == [
        (Opcode.TEXT, False, b"abc"), (Opcode.PING, True, b"hi"), (Opcode.CONTINUATION, True, b"def"),
        (Opcode.CLOSE, True, b"\x03\xe8")]


@pytest.mark.parametrize("bad", [
    bytes([0x81, 0x80 | 3]) + b"\0\0\0\0abc",  # masked: servers must not mask
    bytes([0xC1, 3]) + b"abc",  # RSV1 without an extension
    bytes([0x89, 126, 0, 200]) + b"x" * 200,  # control frame over 125 bytes
    bytes([0x09, 1]) + b"x",  # fragmented control frame
])
def test_invalid_server_frames_are_refused(bad: bytes) -> None:
    with pytest.raises(FrameError):
        FrameScanner().feed(bad)


def test_prefix_must_fit_in_kept_payloads() -> None:
    with pytest.raises(ValueError):
        FrameScanner(keep_whole=10, prefix_keep=20)


@pytest.mark.parametrize("size,header", [(0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)])
def test_client_frames_are_masked_with_the_right_length_field(size: int, header: int) -> None:
    payload = bytes(i % 251 for i in range(size))
    mask = b"\x01\x02\x03\x04"
    frame = client_frame(Opcode.TEXT, payload, mask)
    assert frame[0] == 0x81 and frame[1] & 0x80
    assert len(frame) == header + 4 + size
    assert frame[header:header + 4] == mask
    assert apply_mask(frame[header + 4:], mask) == payload


def test_handshake_accept_key_from_rfc6455() -> None:
    assert accept_value("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_handshake_request_and_response_check() -> None:
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    request = handshake_request("127.0.0.1", 8080, "/ws?token=t", key)
    assert request.startswith(b"GET /ws?token=t HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n")
    assert request.endswith(b"\r\n\r\n") and b"Sec-WebSocket-Key: " + key.encode() in request
    ok = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
          b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")
    check_handshake_response(ok, key)
    with pytest.raises(FrameError, match="refused"):
        check_handshake_response(b"HTTP/1.1 403 Forbidden\r\n\r\n", key)
    with pytest.raises(FrameError, match="Accept"):
        check_handshake_response(ok.replace(b"s3pP", b"AAAA"), key)


# Statistics and verdicts --------------------------------------------------------------------------------------
def test_spread_and_ratios() -> None:
    assert spread([3.0, 1.0, 2.0, math.nan]) == (2.0, 1.0, 3.0)
    assert all(math.isnan(x) for x in spread([]))
    assert ratios([2.0, 3.0, 1.0], [1.0, 0.0, math.nan])[0] == 2.0
    assert all(math.isnan(x) for x in ratios([2.0, 3.0, 1.0], [1.0, 0.0, math.nan])[1:])


def _measure(events_s: float, server_us: float, seconds: float = 1.0) -> bench_relay.Measure:
    events = int(events_s * seconds)
    return bench_relay.Measure(seconds, events * 1000, events, server_us * events / 1e6, 0.0, 0.0)


def test_relay_goals_follow_the_per_round_ratios() -> None:
    results: bench_relay.Results = {}
    for client in bench_relay.CLIENTS:
        for kind in bench_relay.BARE:
            results[(kind, "bare", client)] = [_measure(1000, 10), _measure(1000, 10)]
        for w in bench_relay.WORKLOADS:
            for server in bench_relay.GATEWAYS:
                # store on: 0.5x bare everywhere and 3x its CPU; --no-state: 1.1x bare and 1.2x its CPU
                rate, cpu = (500, 30) if server == "store" else (1100, 12)
                results[(w.key, server, client)] = [_measure(rate, cpu), _measure(rate, cpu)]
    body, goals = bench_relay.render(results, 2, bench_relay.Sizes(1, 1, 10))
    verdicts = {g.name: g.met for g in goals}
    assert len(goals) == 2 * (len(bench_relay.THROUGHPUT_GOALS) + len(bench_relay.CPU_GOALS))
    assert verdicts["relay throughput vs bare, `load` agent, 64 KiB events (store on)"] is True  # 0.5 >= 0.4
    assert verdicts["relay throughput vs bare, relay-only, 64 KiB events (store on)"] is False  # 0.5 < 0.6
    assert verdicts["relay throughput vs bare, token deltas (20-byte text) (`--no-state`)"] is True
    assert verdicts["gateway server CPU per token event vs the bare server's (store on)"] is False
    assert verdicts["gateway server CPU per 64 KiB event vs the bare server's (`--no-state`)"] is True
    assert "0.50×" in next(g.measured for g in goals if g.name.startswith("relay throughput"))
    assert "| relay-only, 64 KiB events | gateway, store on | raw |" in body


def test_a_missed_64k_goal_says_where_the_pipe_hop_floor_was() -> None:
    results: bench_relay.Results = {}
    for client in bench_relay.CLIENTS:
        results[("64k", "bare", client)] = [_measure(1000, 10), _measure(1000, 10)]
        results[("64k", "floor", client)] = [_measure(400, 25), _measure(400, 25)]  # 0.4x bare, 2.5x its CPU
        results[("relay64", "nostate", client)] = [_measure(300, 40), _measure(300, 40)]  # 0.75x the floor
    body, goals = bench_relay.render(results, 2, bench_relay.Sizes(1, 1, 10))
    by_name = {g.name: g for g in goals}
    relay = by_name["relay throughput vs bare, relay-only, 64 KiB events (`--no-state`)"]
    assert relay.met is False
    assert "reached 0.40× (0.40–0.40) of bare" in relay.note and "the gateway 0.75× (0.75–0.75) of the floor" in relay.note
    cpu = by_name["gateway server CPU per 64 KiB event vs the bare server's (`--no-state`)"]
    assert cpu.met is False and "25.0 µs per event, 2.50×" in cpu.note
    assert "| floor: producer → pipe → relay, 64 KiB event frames | pipe-hop floor | raw |" in body
    # no floor measured: no note (a goal with nothing to compare says nothing about it)
    del results[("64k", "floor", "raw")]
    assert all(not g.note for g in bench_relay.goals(results))


def test_relay_goal_without_measurements_is_not_judged() -> None:
    goals = bench_relay.goals({})
    assert goals and all(g.met is None for g in goals)


def _level(n: int, store: bool, buckets: list[tuple[float, float]], pings: list[float]) -> bench_scale.Level:
    return bench_scale.Level(n, store, 100.0, 1.0, 0.001, 0.01, 0.01, max(pings), 1, 2, [3_000_000], [5_000_000],
                             buckets, pings)


INF = math.inf


def test_scale_goals_pool_the_rounds_of_64_sessions_store_on_and_off() -> None:
    # store on: 2 rounds of 50 samples each, 98 of 100 at most 1 ms and 2 beyond 50 ms: p50 <= 1 ms, p99 high
    on = [(0.001, 49.0), (0.02, 49.0), (0.05, 49.0), (INF, 50.0)]
    runs = [_level(64, True, on, [0.01] * 99 + [0.5]), _level(64, True, on, [0.01] * 100),
            _level(64, False, [(0.001, 0.0), (0.02, 100.0), (0.05, 100.0), (INF, 100.0)], [0.03] * 10),
            _level(1, True, [(0.001, 0.0), (INF, 10.0)], [1.0])]
    body, goals = bench_scale.render(runs, 2, 192, 512)
    verdicts = {g.name: g.met for g in goals}
    assert verdicts["64 sessions streaming: loop lag p50 (store on)"] is True
    assert verdicts["64 sessions streaming: loop lag p99 (store on)"] is False
    assert verdicts["64 sessions streaming: ping RTT p99 (a separate client) (store on)"] is True  # 1 of 200
    assert verdicts["64 sessions streaming: loop lag p50 (`--no-state`)"] is False  # interpolated: 10.5 ms
    assert verdicts["64 sessions streaming: loop lag p99 (`--no-state`)"] is True
    assert verdicts["USS per idle worker"] is True
    assert "100 lag samples" in next(g.measured for g in goals if g.name.endswith("loop lag p99 (store on)"))
    assert "| 64 | `--no-state` |" in body
