"""Reading what a client sends: JSON, forms, integer query parameters, strictly decoded."""

from __future__ import annotations

import pytest
from starlette.requests import Request

from serve.web.fields import (
    idempotency_key,
    int_param,
    last_event_id,
    read_fields,
    room_param,
    try_later,
)
from serve.web.security.text import InvalidInput


def request(body: bytes = b"", content_type: str = "", query: bytes = b"",
            extra: list[tuple[bytes, bytes]] = ()) -> Request:
    headers = [(b"content-type", content_type.encode())] if content_type else []
    headers += list(extra)

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers,
             "query_string": query}
    return Request(scope, receive)


async def test_json_and_forms_become_dicts():
    assert await read_fields(request('{"a": "你好"}'.encode(), "application/json")) == {
        "a": "你好"}
    form = request(b"a=%E4%BD%A0&b=", "application/x-www-form-urlencoded")
    assert await read_fields(form) == {"a": "你", "b": ""}


@pytest.mark.parametrize(("body", "content_type", "status"), [
    (b"[1]", "application/json", 400),
    (b"{", "application/json", 400),
    (b'{"a": "\xff"}', "application/json", 400),
    (b"a=%FF", "application/x-www-form-urlencoded", 400),
    (b"a", "text/plain", 415),
])
async def test_bad_bodies_are_invalid_input(body, content_type, status):
    with pytest.raises(InvalidInput) as e:
        await read_fields(request(body, content_type))
    assert e.value.status == status


def test_int_param_is_bounded():
    assert int_param(request(query=b""), "limit", 7, 0, 10) == 7
    assert int_param(request(query=b"limit=3"), "limit", 7, 0, 10) == 3
    for bad in (b"limit=11", b"limit=-1", b"limit=x"):
        with pytest.raises(InvalidInput):
            int_param(request(query=bad), "limit", 7, 0, 10)


@pytest.mark.parametrize("raw", ["²", "٣", "１", "-1", "+1", "1e3", " 1", "9" * 10])
def test_integers_are_ascii_digits_only(raw):
    from urllib.parse import quote

    with pytest.raises(InvalidInput):
        int_param(request(query=f"limit={quote(raw)}".encode()), "limit", 5, 0, 10**12)


def test_event_ids_rooms_and_idempotency_keys_are_strict():
    assert last_event_id(request(extra=[(b"last-event-id", b"5-1")])) == "5-1"
    assert last_event_id(request(query=b"last_event_id=5-2")) == "5-2"
    assert last_event_id(request()) is None
    for bad in ("١-0".encode(), b"18446744073709551616-0", b"1-"):
        with pytest.raises(InvalidInput):
            last_event_id(request(extra=[(b"last-event-id", bad)]))
    assert room_param(request(query=b"room=a-b")) == "a-b"
    with pytest.raises(InvalidInput):
        room_param(request(query=b"room=lobby%0A"))
    assert idempotency_key(request(extra=[(b"idempotency-key", b"k-1.2:3")])) == "k-1.2:3"
    for bad in (b"", b"a b", b"x" * 65, "é".encode()):
        with pytest.raises(InvalidInput):
            idempotency_key(request(extra=[(b"idempotency-key", bad)]))


def test_try_later_rounds_the_window_up():
    assert try_later("wait", 12.01).retry_after == 13
    assert try_later("wait", 0.0).retry_after == 1
    assert try_later("busy", 5, status=503).status == 503
