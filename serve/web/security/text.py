"""User-supplied text: ``InvalidInput`` (a 4xx JSON error) and the checks that raise it."""

from __future__ import annotations

import re
import unicodedata

ROOM_PATTERN = re.compile(r"^[0-9A-Za-z_\-\u3400-\u9fff]{1,32}$")
BOT_NAME = "小X"


class InvalidInput(ValueError):
    """Input that gets a 4xx JSON error; ``status`` says which."""

    def __init__(self, message: str, status: int = 400, reason: str = "invalid_input"):
        super().__init__(message)
        self.status = status
        self.reason = reason


def clean_text(value: object, *, field: str, max_chars: int) -> str:
    """A user-supplied string, stripped; 400 when empty, too long or not valid Unicode."""
    if not isinstance(value, str):
        raise InvalidInput(f"'{field}' must be a string")
    try:
        value.encode("utf-8")  # strict: a lone surrogate would break every later replay
    except UnicodeEncodeError:
        raise InvalidInput(f"'{field}' is not valid Unicode (lone surrogate)") from None
    text = value.strip()
    if not any(unicodedata.category(ch)[0] not in "CZ" for ch in text):
        # nothing but spaces, zero-width or format characters: empty to a reader too
        raise InvalidInput(f"'{field}' is empty")
    if len(text) > max_chars:
        raise InvalidInput(f"'{field}' is longer than {max_chars} characters",
                           reason="too_long")
    if any(unicodedata.category(ch) == "Cc" and ch not in "\n\t" for ch in text):
        raise InvalidInput(f"'{field}' contains control characters")
    return text


def clean_username(value: object, *, max_chars: int = 32) -> str:
    name = clean_text(value, field="username", max_chars=max_chars)
    if any(ch in "\n\t" or unicodedata.category(ch).startswith("Z") and ch != " "
           for ch in name):
        raise InvalidInput("'username' must be one line")
    if name.casefold() in (BOT_NAME.casefold(), "xiaox", "小x"):
        raise InvalidInput(f"'{name}' is the bot's name")
    return name


def clean_room(value: object) -> str:
    room = value if value else "lobby"
    if not isinstance(room, str) or not ROOM_PATTERN.match(room):
        raise InvalidInput("a room name is 1-32 letters, digits, '_' or '-'")
    return room


def decode_utf8(body: bytes) -> str:
    try:
        return body.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        raise InvalidInput("the body is not valid UTF-8") from None
