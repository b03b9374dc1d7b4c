"""JSON-RPC 2.0 framing: requests, ids, parse errors, the encoder (agent/wire/jsonrpc.py)."""

import json

import pytest

from agent import errors
from agent.wire import jsonrpc
from agent.wire.jsonrpc import MAX_ID_LENGTH


def parse(text: str):
    return jsonrpc.parse_request(jsonrpc.loads(text.encode()))


def test_plain_request_and_notification():
    req = parse('{"jsonrpc": "2.0", "method": "Host.ping", "id": "a1", "params": []}')
    assert (req.id, req.task_id, req.method, req.params) == ("a1", "a1", "Host.ping", [])
    assert not req.is_notification
    req = parse('{"jsonrpc": "2.0", "method": "Host.ping", "id": -42}')
    assert (req.id, req.task_id, req.params) == (-42, "-42", None)
    note = parse('{"jsonrpc": "2.0", "method": "Host.ping"}')
    assert note.is_notification and note.task_id is None


@pytest.mark.parametrize("id_", ["1" * 1001, "true", "false", "null", "1.5", '""', "[]", "{}",
                                 json.dumps("x" * (MAX_ID_LENGTH + 1))])
def test_ids_that_cannot_name_a_task_are_refused(id_):
    with pytest.raises(jsonrpc.BadRequest) as bad:
        parse(f'{{"jsonrpc": "2.0", "method": "Host.ping", "id": {id_}}}')
    assert isinstance(bad.value.error, errors.InvalidRequest) and bad.value.id is None


def test_huge_int_is_kept_as_text_then_refused():
    value = jsonrpc.loads(b"1" + b"0" * 1000)
    assert isinstance(value, jsonrpc.HugeInt) and len(value) == 1001
    assert jsonrpc.loads(b"9" * 1000) == int("9" * 1000)  # long, but int() takes it
    assert jsonrpc.task_id_of("x" * MAX_ID_LENGTH) == "x" * MAX_ID_LENGTH
    assert jsonrpc.task_id_of(7) == "7"
    for bad in (True, False, jsonrpc.HugeInt("1" * 1001), 1.0, None, "", b"7"):
        with pytest.raises(errors.InvalidRequest):
            jsonrpc.task_id_of(bad)


@pytest.mark.parametrize("body", [b"NaN", b"[Infinity]", b'{"a": -Infinity}', b"\xff\xfe",
                                  b"{", b"", b"[" * 100000 + b"]" * 100000])
def test_parse_errors(body):
    with pytest.raises(errors.ParseError) as err:
        jsonrpc.loads(body)
    assert err.value.code == -32700


@pytest.mark.parametrize("obj, answer_id", [
    ([], None), ("x", None),
    ({"method": "Host.ping", "id": 3}, 3),
    ({"jsonrpc": "1.0", "method": "Host.ping", "id": "i"}, "i"),
    ({"jsonrpc": "2.0", "method": 5, "id": "i"}, "i"),
    ({"jsonrpc": "2.0", "id": "i"}, "i"),
    ({"jsonrpc": "2.0", "method": "Host.ping", "params": "x", "id": "i"}, "i"),
    ({"jsonrpc": "2.0", "method": "Host.ping", "params": None, "id": "i"}, "i"),
    ({"jsonrpc": "2.0", "method": "Host.ping", "params": 1}, None),
])
def test_invalid_requests_answer_with_their_id(obj, answer_id):
    with pytest.raises(jsonrpc.BadRequest) as bad:
        jsonrpc.parse_request(obj)
    assert bad.value.error.code == -32600 and bad.value.id == answer_id


def test_dumps_writes_only_what_a_strict_parser_reads():
    assert jsonrpc.dumps({"a": [1, "b"]}) == b'{"a":[1,"b"]}'
    # NaN and Infinity are not JSON: null, as events send them.
    assert jsonrpc.dumps({"x": float("nan"), "y": [float("inf"), 2.5]}) == \
        b'{"x":null,"y":[null,2.5]}'
    # What the fast encoder refuses, the standard one writes: huge integers, integer keys.
    assert json.loads(jsonrpc.dumps({"n": 10 ** 30, 7: "k"})) == {"n": 10 ** 30, "7": "k"}
    assert jsonrpc.dumps([jsonrpc.HugeInt("1" * 1200)]) == b'["' + b"1" * 1200 + b'"]'
    with pytest.raises((TypeError, ValueError)):
        jsonrpc.dumps({"x": object()})
    for value in ({"x": float("nan"), "n": 10 ** 30}, {"s": "\u2028\x00é", "t": (1, 2)}):
        out = jsonrpc.dumps(value)
        assert json.loads(out, parse_constant=lambda c: pytest.fail(c)) is not None
