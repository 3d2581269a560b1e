"""What a client sends: a JSON object or a form, query parameters and headers.

Everything is decoded strictly: invalid UTF-8 or JSON is an ``InvalidInput`` (a 400), a
body of another media type a 415.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request

from serve.web.broker import parse_id
from serve.web.security.text import ROOM_PATTERN, InvalidInput, clean_room, decode_utf8

_DIGITS = re.compile(r"[0-9]{1,9}")
_IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")


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
    """The query parameter ``name`` as an integer from ``low`` to ``high`` (absent: default).
    ASCII digits only: ``"²".isdigit()`` is true and ``int("²")`` fails, ``int("٣")`` is 3."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if not _DIGITS.fullmatch(raw) or not low <= int(raw) <= high:
        raise InvalidInput(f"'{name}' must be an integer from {low} to {high}")
    return int(raw)


def room_param(request: Request, fields: dict[str, Any] | None = None) -> str:
    """``?room=`` (or the body's ``room``), whole: a trailing newline is not a room name."""
    raw = request.query_params.get("room") or (fields or {}).get("room")
    room = clean_room(raw)
    if not ROOM_PATTERN.fullmatch(room):
        raise InvalidInput("a room name is 1-32 letters, digits, '_' or '-'")
    return room


def last_event_id(request: Request) -> str | None:
    """The ``Last-Event-ID`` header (or ``?last_event_id=``): an event id of this server,
    ``<ms>-<seq>`` in ASCII digits within 2^64-1, or a 400."""
    raw = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    if not raw:
        return None
    try:
        parse_id(raw)
    except ValueError:
        raise InvalidInput("Last-Event-ID is not an event id of this server") from None
    return raw


def idempotency_key(request: Request) -> str | None:
    """The ``Idempotency-Key`` header: 1-64 of ``A-Z a-z 0-9 _ - . :``, or a 400."""
    raw = request.headers.get("idempotency-key")
    if raw is None:
        return None
    if not _IDEMPOTENCY_KEY.fullmatch(raw):
        raise InvalidInput("Idempotency-Key must be 1-64 of A-Z a-z 0-9 _ - . :")
    return raw


def try_later(message: str, seconds: float, *, status: int = 429,
              reason: str = "rate_limited") -> InvalidInput:
    """A 429/503 whose ``Retry-After`` is ``seconds`` rounded up (at least 1)."""
    error = InvalidInput(message, status=status, reason=reason)
    error.retry_after = max(1, math.ceil(seconds))  # read by serve.web.errors
    return error
