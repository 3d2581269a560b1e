"""What a client sends: a JSON object or a form, and integer query parameters.

Everything is decoded strictly: invalid UTF-8 or JSON is an ``InvalidInput`` (a 400), a
body of another media type a 415.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request

from serve.web.security.text import InvalidInput, decode_utf8


async def read_fields(request: Request) -> dict[str, Any]:
    """A JSON object or a form as a dict, decoded strictly (invalid UTF-8 is a 400)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        text = decode_utf8(await request.body())
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):  # incl. ints over Python's digit limit
            raise InvalidInput("the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise InvalidInput("the body must be a JSON object")
        return data
    if content_type == "application/x-www-form-urlencoded":
        body = decode_utf8(await request.body())
        try:
            # Percent-escapes must decode as UTF-8 too (Starlette's parser would
            # silently turn bad bytes into replacement characters).
            return dict(parse_qsl(body, keep_blank_values=True, encoding="utf-8",
                                  errors="strict", max_num_fields=50))
        except (UnicodeDecodeError, ValueError):
            raise InvalidInput("the form is not valid UTF-8") from None
    if content_type == "multipart/form-data":
        try:
            form = await request.form(max_files=0, max_fields=50)
        except Exception:
            raise InvalidInput("the multipart form cannot be parsed") from None
        return {k: v for k, v in form.items() if isinstance(v, str)}
    raise InvalidInput("send JSON or a form (application/json, "
                       "application/x-www-form-urlencoded)",
                       status=415, reason="unsupported_media_type")


def int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    """The query parameter ``name`` as an integer from ``low`` to ``high`` (absent: default)."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise InvalidInput(f"'{name}' must be an integer from {low} to {high}")
    return int(raw)
