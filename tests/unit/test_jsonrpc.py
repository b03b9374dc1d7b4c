"""JSON-RPC 2.0 framing: requests, ids, parse errors, the encoder (agent/wire/jsonrpc.py)."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


def _reference(body: bytes):
    """What the standard library alone reads (the parse before orjson read first)."""
    try:
        return jsonrpc._DECODER.decode(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return errors.ParseError


def _same(a, b) -> bool:
    """Equal, and of the same types throughout (1 is not 1.0, -0.0 is not 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return repr(a) == repr(b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(map(_same, a, b))
    return a == b


_scalars = (st.none() | st.booleans() | st.floats(allow_nan=False) | st.text()
            | st.integers() | st.integers(min_value=-(1 << 70), max_value=1 << 70)
            | st.sampled_from([0, -0.0, 1e308, 5e-324, 2 ** 63, -(2 ** 63) - 1, 2 ** 64,
                               10 ** 1000, "\ud800", "\x00\u2028\U0001f600"]))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)


def _texts(value) -> list[bytes]:
    """`value` written as JSON several ways: compact, spaced, ASCII-escaped."""
    return [json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode(
                "utf-8", "surrogatepass"),
            json.dumps(value, indent=1).encode()]


@settings(max_examples=400, deadline=None)
@given(_values, st.data())
def test_loads_reads_exactly_what_the_standard_library_reads(value, data):
    """orjson reads first; whatever it reads must be what the standard library reads, of
    the same types (an integer beyond 64 bits stays an integer), and whatever is not JSON
    stays a ParseError: for valid documents and for bytes cut or changed from them."""
    for body in _texts(value):
        cut = data.draw(st.integers(0, len(body)))
        flip = data.draw(st.binary(max_size=3))
        for text in (body, body[:cut], body[:cut] + flip + body[cut:]):
            want = _reference(text)
            if want is errors.ParseError:
                with pytest.raises(errors.ParseError):
                    jsonrpc.loads(text)
            else:
                assert _same(jsonrpc.loads(text), want), text


@pytest.mark.parametrize("body", [
    b"1E+2", b"1e-2", b"0e0", b"-0", b"-0.0", b"1.0e-400", b"2.5e308", b"123456789012345678",
    b"-123456789012345678", b"9" * 18 + b".5", b'"\\u00e9\\ud83d\\ude00"', b'"\\/"', b" \t\n[ ]\r ",
    b'{"a":{"b":[1,{"c":null}]},"a":true}', b"[1,]", b"01", b"+1", b".5", b"1.", b'"\t"',
    b"\xef\xbb\xbf[]", b'"\xc3\x28"', b"true false", b"nul", b"[" * 1100 + b"]" * 1100])
def test_loads_agrees_with_the_standard_library_on_the_edges(body):
    """Number forms, escapes, whitespace, duplicate keys, and what is not JSON at all: read
    as the standard library reads them, or refused as it refuses them."""
    want = _reference(body)
    if want is errors.ParseError:
        with pytest.raises(errors.ParseError):
            jsonrpc.loads(body)
    else:
        assert _same(jsonrpc.loads(body), want)
