"""Fuzzing the /ws channel of ONE real gateway with hypothesis (PROTOCOL section 4, docs/protocol.md section 8).

Every malformed frame gets its documented error, the connection that sent it stays usable (``gateway.ping``
answers), a bystander connection's session can still run an echo turn with a gapless ``seq``, and no
worker is started or leaked (the gateway's process tree is unchanged; the module teardown stops the gateway
with SIGTERM and asserts exit 0 and no surviving process).

Runs are deterministic (``derandomize=True``).  ``WG_FUZZ_SCALE`` multiplies every ``max_examples`` for
longer runs (e.g. ``WG_FUZZ_SCALE=20``).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from support import GatewayProcess, alive, descendants, wait_for
from gateway import rpc
from gateway.rpc import METHOD_PARAMS
from hardening_wire import OP_BINARY, OP_CONT, OP_TEXT, RawWebSocket

SCALE = max(1, int(os.environ.get("WG_FUZZ_SCALE", "1")))
MAX_DEPTH = 32  # the gateway's default --max-json-depth, which this module's gateway keeps


def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=examples * SCALE, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


# A plain synchronous client: one request in, one answer out, in order ---------------------------------------

class SyncRpc:
    def __init__(self, url: str) -> None:
        self.ws: ClientConnection = connect(url, max_size=None, open_timeout=10).__enter__()
        ready = self.next_frame()
        assert ready["params"]["type"] == "gateway.ready", ready
        self.events: list[dict[str, Any]] = []
        self._ids = iter(range(1, 1 << 62))

    def close(self) -> None:
        self.ws.close()

    def next_frame(self, timeout: float = 10.0) -> dict[str, Any]:
        return json.loads(self.ws.recv(timeout=timeout))

    def send(self, data: str | bytes) -> None:
        self.ws.send(data)

    def answer(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next response (events that arrive meanwhile are kept in ``events``)."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self.next_frame(max(0.01, deadline - time.monotonic()))
            if frame.get("method") == "event":
                self.events.append(frame["params"])
                continue
            return frame

    def request(self, method: str, params: dict[str, Any] | None = None, timeout: float = 30.0) -> dict[str, Any]:
        rid = next(self._ids)
        msg: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            msg["params"] = params
        self.send(json.dumps(msg))
        response = self.answer(timeout)
        assert response["id"] == rid, (response, rid)
        return response

    def run_echo_turn(self, session_id: str, text: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        response = self.request("prompt.submit", {"session_id": session_id, "text": text})
        assert "result" in response, response
        turn_id = response["result"]["turn_id"]
        deadline = time.monotonic() + timeout
        while not any(e["type"] == "turn.complete" and e["payload"]["turn_id"] == turn_id for e in self.events):
            frame = self.next_frame(max(0.01, deadline - time.monotonic()))
            assert frame.get("method") == "event", frame
            self.events.append(frame["params"])
        return [e for e in self.events if e["payload"].get("turn_id") == turn_id]


def expect_error(client: SyncRpc, frame: str | bytes, code: int, request_id: Any = None) -> dict[str, Any]:
    client.send(frame)
    response = client.answer()
    assert "error" in response and response["error"]["code"] == code, (frame[:300], response)
    assert response["id"] == request_id, (frame[:300], response)
    assert isinstance(response["error"]["message"], str) and response["error"]["message"]
    return response["error"]


def assert_usable(client: SyncRpc) -> None:
    client.send('{"jsonrpc":"2.0","id":"usable?","method":"gateway.ping"}')
    assert client.answer() == {"jsonrpc": "2.0", "id": "usable?", "result": {"ok": True}}


# One gateway for the module, a fuzzing connection, and a bystander with a session -------------------------

@pytest.fixture(scope="module")
def fuzz_gateway() -> Iterator[GatewayProcess]:
    # The rate limit is lifted: the fuzzer sends thousands of frames and tests errors, not the bucket.
    gw = GatewayProcess("--rate-per-s", "1000000", "--rate-burst", "1000000", "--pool-size", "1").start()
    try:
        yield gw
    finally:
        code = gw.stop()  # asserts that nothing the gateway started survives it
        assert code == 0, gw.stderr()[-3000:]
        # No handler failed (a -32603 "internal error" is logged with its traceback by the gateway).
        assert "worker_gateway.app: internal error" not in gw.stderr(), gw.stderr()[-5000:]


@pytest.fixture(scope="module")
def bystander(fuzz_gateway: GatewayProcess) -> Iterator[tuple[SyncRpc, str]]:
    client = SyncRpc(fuzz_gateway.url())
    created = client.request("session.create", {"title": "bystander"})
    assert "result" in created, created
    try:
        yield client, created["result"]["session_id"]
    finally:
        client.close()


@pytest.fixture(scope="module")
def baseline(fuzz_gateway: GatewayProcess, bystander: tuple[SyncRpc, str]) -> Callable[[], set[int]]:
    """The gateway's process tree once the bystander's session exists and the pool is full again."""

    def tree() -> set[int]:
        return {p.pid for p in alive(descendants(fuzz_gateway.pid))}

    def settled() -> set[int] | None:
        first = tree()
        time.sleep(0.3)
        return first if tree() == first else None

    stable = wait_for(settled, 20, 0.05, "a settled process tree")
    return lambda: stable


@pytest.fixture(scope="module")
def fuzzer(fuzz_gateway: GatewayProcess) -> Iterator[SyncRpc]:
    client = SyncRpc(fuzz_gateway.url())
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(autouse=True)
def nothing_affected(request: pytest.FixtureRequest, fuzz_gateway: GatewayProcess, fuzzer: SyncRpc,
                     bystander: tuple[SyncRpc, str], baseline: Callable[[], set[int]]) -> Iterator[None]:
    """After each fuzz test: the fuzzing connection answers, the bystander's session runs an echo turn
    with a gapless seq, no session was created and the gateway's process tree is what it was."""
    yield
    gw, client, (by, sid), expected_tree = fuzz_gateway, fuzzer, bystander, baseline()
    assert_usable(client)
    listed = client.request("session.active_list")["result"]["sessions"]
    assert [s["session_id"] for s in listed] == [sid], listed
    events = by.run_echo_turn(sid, f"still fine after {request.node.name}")
    assert events[-1]["payload"]["status"] == "ok"
    seqs = [e["seq"] for e in by.events]
    assert seqs == list(range(1, len(seqs) + 1))
    wait_for(lambda: {p.pid for p in alive(descendants(gw.pid))} == expected_tree,
             10, 0.05, "the gateway's process tree to be unchanged (no worker started or leaked)")


# Strategies ------------------------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | \
    st.text(max_size=40)
json_values = st.recursive(json_scalars, lambda children: st.lists(children, max_size=4) |
                           st.dictionaries(st.text(max_size=10), children, max_size=4), max_leaves=20)

KIND_CHECKS: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string_list": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
}
VALID_SAMPLE: dict[str, Any] = {"string": "nope", "int": 0, "number": 0, "bool": False, "object": {},
                                "array": [], "string_list": ["x"]}
PARAM_CASES = [(method, name) for method, spec in METHOD_PARAMS.items() for name in spec]
#: Methods whose valid calls start processes: the generic fuzzer never sends them params that could pass.
CREATING = {"session.create", "terminal.open"}


def required_params(method: str) -> dict[str, Any]:
    return {name: VALID_SAMPLE[p.types[0]] for name, p in METHOD_PARAMS[method].items() if p.required}


def frame(method: str, params: Any, request_id: Any = 1) -> str:
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})


# Tests -------------------------------------------------------------------------------------------------------

@fuzz_settings(150)
@given(value=json_values)
def test_random_json_values_are_invalid_requests(fuzzer: SyncRpc, value: Any) -> None:
    if isinstance(value, dict):
        value.pop("jsonrpc", None)  # without "jsonrpc": "2.0" no object is a request
    request_id = value.get("id") if isinstance(value, dict) else None
    if not (isinstance(request_id, int) and not isinstance(request_id, bool)) and \
            not (isinstance(request_id, str) and len(request_id) <= 256):
        request_id = None
    expect_error(fuzzer, json.dumps(value), -32600, request_id)


@fuzz_settings(60)
@given(text=st.text(max_size=60).filter(lambda t: not _is_json(t)))
def test_text_that_is_not_json_is_a_parse_error(fuzzer: SyncRpc, text: str) -> None:
    expect_error(fuzzer, text, -32700)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@fuzz_settings(40)
@given(version=json_values.filter(lambda v: v != "2.0"), method=st.sampled_from(sorted(METHOD_PARAMS)),
       omit=st.booleans())
def test_requests_without_jsonrpc_2_0_are_invalid(fuzzer: SyncRpc, version: Any, method: str, omit: bool) -> None:
    msg: dict[str, Any] = {"id": 7, "method": method}
    if not omit:
        msg["jsonrpc"] = version
    expect_error(fuzzer, json.dumps(msg), -32600, 7)


@pytest.mark.parametrize("method, param", PARAM_CASES, ids=[f"{m}.{p}" for m, p in PARAM_CASES])
@fuzz_settings(8)
@given(data=st.data())
def test_wrong_type_for_every_param_of_every_method(fuzzer: SyncRpc, method: str, param: str, data: Any) -> None:
    spec = METHOD_PARAMS[method][param]
    wrong = data.draw(json_values.filter(lambda v: not any(KIND_CHECKS[k](v) for k in spec.types)), label="wrong")
    params = required_params(method)
    params[param] = wrong
    error = expect_error(fuzzer, frame(method, params, 11), -32602, 11)
    assert error["data"] == {"param": param}, error
    assert repr(param) in error["message"], error


@pytest.mark.parametrize("method", sorted(METHOD_PARAMS))
@fuzz_settings(10)
@given(data=st.data())
def test_unknown_params_are_named_in_the_error(fuzzer: SyncRpc, method: str, data: Any) -> None:
    key = data.draw(st.text(max_size=20).filter(lambda k: k not in METHOD_PARAMS[method]), label="key")
    params = required_params(method)
    params[key] = data.draw(json_values, label="value")
    error = expect_error(fuzzer, frame(method, params, "u"), -32602, "u")
    assert error["data"] == {"param": key}, error


@fuzz_settings(80)
@given(method=st.sampled_from(sorted(set(METHOD_PARAMS) - CREATING)) |
       st.text(max_size=20).filter(lambda m: m not in METHOD_PARAMS),
       params=st.dictionaries(st.text(max_size=12), json_values, max_size=5))
def test_random_params_for_random_methods_get_a_documented_answer(fuzzer: SyncRpc, method: str,
                                                                   params: dict) -> None:
    fuzzer.send(frame(method, params, 99))
    response = fuzzer.answer()
    assert response["id"] == 99, response
    if method not in METHOD_PARAMS:
        assert response["error"]["code"] == -32601, response
        return
    unknown = [k for k in params if k not in METHOD_PARAMS[method]]
    if unknown:
        assert response["error"]["code"] == -32602 and response["error"]["data"] == {"param": unknown[0]}
    elif "error" in response:
        assert response["error"]["code"] in (-32602, 4001), response
    else:
        assert method in ("gateway.ping", "gateway.info", "session.active_list", "session.list",
                          "terminal.list"), response


@fuzz_settings(60)
@given(request_id=st.integers() | st.integers(min_value=10 ** 30, max_value=10 ** 300) |
       st.text(max_size=256))
def test_valid_ids_of_any_size_are_echoed_exactly(fuzzer: SyncRpc, request_id: int | str) -> None:
    fuzzer.send(json.dumps({"jsonrpc": "2.0", "id": request_id, "method": "gateway.ping"}))
    assert fuzzer.answer() == {"jsonrpc": "2.0", "id": request_id, "result": {"ok": True}}


@fuzz_settings(40)
@given(request_id=st.text(min_size=257, max_size=5000) | st.floats(allow_nan=False, allow_infinity=False) |
       st.booleans() | st.none() | st.lists(st.integers(), max_size=3) | st.dictionaries(st.text(max_size=3),
                                                                                            st.integers(), max_size=2))
def test_invalid_ids_are_invalid_requests_answered_with_null_id(fuzzer: SyncRpc, request_id: Any) -> None:
    expect_error(fuzzer, json.dumps({"jsonrpc": "2.0", "id": request_id, "method": "gateway.ping"}), -32600, None)


def test_an_id_beyond_pythons_integer_digit_limit_is_a_parse_error(fuzzer: SyncRpc) -> None:
    # CPython refuses to convert integers of more than 4300 digits (a denial-of-service guard).
    expect_error(fuzzer, '{"jsonrpc":"2.0","id":' + "9" * 5000 + ',"method":"gateway.ping"}', -32700)


def _nest(depth: int, shape: list[bool]) -> Any:
    value: Any = 1
    for i in range(depth):
        value = [value] if shape[i % len(shape)] else {"k": value}
    return value


@fuzz_settings(30)
@given(depth=st.integers(min_value=1, max_value=400), shape=st.lists(st.booleans(), min_size=1, max_size=8))
def test_nesting_beyond_the_depth_limit_is_an_invalid_request(fuzzer: SyncRpc, depth: int, shape: list[bool]) -> None:
    # The request object is level 1 and "params" level 2, so the value of "x" may hold MAX_DEPTH - 2 levels.
    msg = frame("gateway.ping", {"x": _nest(depth, shape)}, 5)
    if depth + 2 <= MAX_DEPTH:
        error = expect_error(fuzzer, msg, -32602, 5)  # deep enough to parse, but "x" is unknown
        assert error["data"] == {"param": "x"}
    else:
        error = expect_error(fuzzer, msg, -32600, 5)
        assert str(MAX_DEPTH) in error["message"]


@pytest.mark.parametrize("depth", [MAX_DEPTH - 1, 10_000, 150_000])
def test_extreme_nesting_never_reaches_the_recursion_limit(fuzzer: SyncRpc, depth: int) -> None:
    # 150 000 levels is ~300 KB, under the 1 MiB frame limit, and far past Python's recursion limit.
    nested = "[" * depth + "]" * depth
    expect_error(fuzzer, '{"jsonrpc":"2.0","id":3,"method":"gateway.ping","params":{"x":' + nested + "}}",
                 -32600, None if depth > 1000 else 3)


@fuzz_settings(40)
@given(where=st.sampled_from(["id", "method", "key", "value", "nested", "prompt"]),
       code_point=st.integers(min_value=0xD800, max_value=0xDFFF))
def test_unpaired_surrogate_escapes_are_refused(fuzzer: SyncRpc, bystander: tuple[SyncRpc, str], where: str,
                                                code_point: int) -> None:
    bad = f"\\u{code_point:04x}"
    request_id: Any = 21
    if where == "id":
        text, request_id = '{"jsonrpc":"2.0","id":"a' + bad + '","method":"gateway.ping"}', None
    elif where == "method":
        text = '{"jsonrpc":"2.0","id":21,"method":"x' + bad + '"}'
    elif where == "key":
        text = '{"jsonrpc":"2.0","id":21,"method":"gateway.info","params":{"' + bad + '":1}}'
    elif where == "value":
        text = '{"jsonrpc":"2.0","id":21,"method":"session.close","params":{"session_id":"' + bad + '"}}'
    elif where == "nested":
        text = '{"jsonrpc":"2.0","id":21,"method":"gateway.info","params":{"a":[{"b":["' + bad + '"]}]}}'
    else:  # a prompt to a live session: must be refused before it reaches (and wedges) the session
        sid = bystander[1]
        text = ('{"jsonrpc":"2.0","id":21,"method":"prompt.submit","params":{"session_id":"' + sid +
                '","text":"hi ' + bad + '"}}')
    error = expect_error(fuzzer, text, -32600, request_id)
    assert "surrogate" in error["message"]


def test_paired_surrogate_escapes_are_fine(fuzzer: SyncRpc) -> None:
    fuzzer.send('{"jsonrpc":"2.0","id":"\\ud83d\\ude00","method":"gateway.ping"}')
    assert fuzzer.answer() == {"jsonrpc": "2.0", "id": "\U0001F600", "result": {"ok": True}}


any_chars = st.text(st.characters() | st.integers(0xD800, 0xDFFF).map(chr), max_size=12)
values_with_surrogates = st.recursive(any_chars | st.integers(), lambda children: st.lists(children, max_size=3) |
                                      st.dictionaries(any_chars, children, max_size=3), max_leaves=10)


@fuzz_settings(300)
@given(method=st.sampled_from(sorted(METHOD_PARAMS)) | any_chars, request_id=any_chars | st.integers(),
       params=st.dictionaries(any_chars, values_with_surrogates, max_size=4))
def test_every_answer_the_parser_leads_to_can_be_sent(method: str, request_id: Any, params: dict) -> None:
    """Pure (no server): whatever strings a request holds, the error it gets, or the request it parses to,
    encodes as UTF-8, so neither the connection's sender nor a worker channel can choke on it later."""
    text = json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
    try:
        request = rpc.parse_request(text)
    except rpc.RequestError as exc:
        rpc.encode_error(exc.request_id, exc.error).encode("utf-8")
        return
    json.dumps([request.method, request.params, request.id], ensure_ascii=False).encode("utf-8")


@fuzz_settings(40)
@given(payload=st.binary(max_size=200))
def test_binary_frames_are_invalid_requests(fuzzer: SyncRpc, payload: bytes) -> None:
    expect_error(fuzzer, payload, -32600)


def test_zero_byte_frames(fuzzer: SyncRpc) -> None:
    expect_error(fuzzer, "", -32700)
    expect_error(fuzzer, b"", -32600)


@fuzz_settings(25)
@given(garbage=st.binary(min_size=1, max_size=40).filter(lambda b: not _is_utf8(b)))
def test_invalid_utf8_in_a_text_frame_closes_that_connection_with_1007(fuzz_gateway: GatewayProcess,
                                                                       garbage: bytes) -> None:
    """RFC 6455 section 8.1: an endpoint that receives invalid UTF-8 in a text message must fail the
    connection, so this is the one malformed frame that costs its connection (code 1007, "invalid frame
    payload data"); nothing else is affected.  Compliant clients cannot send it: a raw socket does."""
    raw = RawWebSocket(fuzz_gateway.port, fuzz_gateway.token or "")
    try:
        assert raw.recv_json()["params"]["type"] == "gateway.ready"
        raw.send_frame(OP_TEXT, b'{"jsonrpc":"2.0","id":1,"method":"gateway.ping","x":"' + garbage + b'"}')
        assert raw.close_code() == 1007
    finally:
        raw.close()


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_fragmented_and_binary_invalid_utf8_frames_over_a_raw_socket(fuzz_gateway: GatewayProcess) -> None:
    raw = RawWebSocket(fuzz_gateway.port, fuzz_gateway.token or "")
    try:
        assert raw.recv_json()["params"]["type"] == "gateway.ready"
        # A text message in three fragments is one request.
        raw.send_frame(OP_TEXT, b'{"jsonrpc":"2.0",', fin=False)
        raw.send_frame(OP_CONT, b'"id":1,"method":', fin=False)
        raw.send_frame(OP_CONT, b'"gateway.ping"}')
        assert raw.recv_json() == {"jsonrpc": "2.0", "id": 1, "result": {"ok": True}}
        # Invalid UTF-8 in a binary frame is just a binary frame: -32600, and the connection stays.
        raw.send_frame(OP_BINARY, b"\xff\xfe\x80")
        assert raw.recv_json()["error"]["code"] == -32600
        assert raw.call("gateway.ping", request_id=2)["result"] == {"ok": True}
    finally:
        raw.close()


def test_the_fuzzing_connection_was_never_closed(fuzzer: SyncRpc) -> None:
    try:
        assert_usable(fuzzer)
    except ConnectionClosed as exc:  # pragma: no cover - the failure message is the point
        raise AssertionError(f"the fuzzing connection was closed: {exc}") from None
