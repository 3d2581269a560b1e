"""Reading what a client sends: JSON, forms, integer query parameters, strictly decoded."""

from __future__ import annotations

import pytest
from starlette.requests import Request

from serve.web.fields import int_param, read_fields
from serve.web.security.text import InvalidInput


def request(body: bytes = b"", content_type: str = "", query: bytes = b"") -> Request:
    headers = [(b"content-type", content_type.encode())] if content_type else []

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
