"""The pure JSON-RPC layer: every error code of PROTOCOL section 4, without a server."""

from __future__ import annotations

import json

import pytest

from gateway import rpc


def parse_error(text: str | bytes) -> rpc.RequestError:
    with pytest.raises(rpc.RequestError) as exc:
        rpc.parse_request(text)
    return exc.value


def test_valid_request() -> None:
    req = rpc.parse_request('{"jsonrpc":"2.0","id":7,"method":"session.close","params":{"session_id":"s1"}}')
    assert (req.method, req.params, req.id, req.is_notification) == ("session.close", {"session_id": "s1"}, 7, False)


def test_params_may_be_omitted_and_notifications_have_no_id() -> None:
    req = rpc.parse_request('{"jsonrpc":"2.0","method":"gateway.ping"}')
    assert req.params == {} and req.is_notification


@pytest.mark.parametrize("text, code", [
    ("{not json", rpc.PARSE_ERROR),
    (b"\xff\xfe", rpc.PARSE_ERROR),
    ("[]", rpc.INVALID_REQUEST),
    ("42", rpc.INVALID_REQUEST),
    ('{"id":1,"method":"gateway.ping"}', rpc.INVALID_REQUEST),
    ('{"jsonrpc":"1.0","id":1,"method":"gateway.ping"}', rpc.INVALID_REQUEST),
    ('{"jsonrpc":"2.0","id":1,"method":5}', rpc.INVALID_REQUEST),
    ('{"jsonrpc":"2.0","id":[1],"method":"gateway.ping"}', rpc.INVALID_REQUEST),
    ('{"jsonrpc":"2.0","id":true,"method":"gateway.ping"}', rpc.INVALID_REQUEST),
    ('{"jsonrpc":"2.0","id":1,"method":"gateway.ping","extra":1}', rpc.INVALID_REQUEST),
    ('{"jsonrpc":"2.0","id":1,"method":"no.such"}', rpc.METHOD_NOT_FOUND),
    ('{"jsonrpc":"2.0","id":1,"method":"gateway.ping","params":[1]}', rpc.INVALID_PARAMS),
    ('{"jsonrpc":"2.0","id":1,"method":"session.close","params":{}}', rpc.INVALID_PARAMS),
    ('{"jsonrpc":"2.0","id":1,"method":"session.close","params":{"session_id":3}}', rpc.INVALID_PARAMS),
    ('{"jsonrpc":"2.0","id":1,"method":"session.close","params":{"session_id":"s","x":1}}', rpc.INVALID_PARAMS),
    ('{"jsonrpc":"2.0","id":1,"method":"session.resume","params":{"session_id":"s","after_seq":true}}',
     rpc.INVALID_PARAMS),
    ('{"jsonrpc":"2.0","id":1,"method":"terminal.open","params":{"argv":["sh",1]}}', rpc.INVALID_PARAMS),
])
def test_error_codes(text: str, code: int) -> None:
    assert parse_error(text).error.code == code


def test_error_keeps_the_request_id_when_readable() -> None:
    err = parse_error('{"jsonrpc":"2.0","id":"abc","method":"nope"}')
    assert err.request_id == "abc"
    assert "nope" in err.error.message


def test_invalid_params_names_the_key() -> None:
    err = parse_error('{"jsonrpc":"2.0","id":1,"method":"prompt.submit","params":{"session_id":"s","text":5}}')
    assert err.error.data == {"param": "text"} and "'text'" in err.error.message


def test_depth_limit() -> None:
    deep = {"a": 1}
    for _ in range(40):
        deep = {"a": deep}
    text = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "session.create", "params": {"options": deep}})
    err = parse_error(text)
    assert err.error.code == rpc.INVALID_REQUEST and "deeper" in err.error.message
    assert err.request_id == 1


def test_huge_nesting_does_not_crash() -> None:
    assert parse_error("[" * 100000 + "]" * 100000).error.code in (rpc.INVALID_REQUEST, rpc.PARSE_ERROR)


def test_encodings_are_valid_json() -> None:
    assert json.loads(rpc.encode_result(1, {"ok": True})) == {"jsonrpc": "2.0", "id": 1, "result": {"ok": True}}
    err = json.loads(rpc.encode_error(None, rpc.RpcError(4001, "gone", {"session_id": "s"})))
    assert err["error"] == {"code": 4001, "message": "gone", "data": {"session_id": "s"}}
    event = json.loads(rpc.wrap_event("message.delta", b'{"turn_id":"t","text":"hi \\"x\\""}', "s1", 5))
    assert event == {"jsonrpc": "2.0", "method": "event", "params": {
        "type": "message.delta", "session_id": "s1", "seq": 5, "payload": {"turn_id": "t", "text": 'hi "x"'}}}
    assert json.loads(rpc.encode_event("gateway.ready", {"a": 1}))["params"]["seq"] is None


def test_every_method_has_a_param_spec() -> None:
    from gateway.methods import HANDLERS

    assert set(HANDLERS) == set(rpc.METHOD_PARAMS)
