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


# Names only 小X may use, compared by ``name_key`` (so 小Ｘ, 小X\u200b, "Xiao X" match).
RESERVED_NAMES = frozenset({"小x", "xiaox", "小叉", "小艾克斯", "system", "admin"})


def normalize_name(value: str) -> str:
    """NFKC with the format characters (Unicode Cf: zero-width, joiners, bidi marks)
    removed: what is stored and shown, so two names that look alike are alike."""
    text = unicodedata.normalize("NFKC", value)
    return "".join(ch for ch in text if unicodedata.category(ch) != "Cf")


def name_key(name: str) -> str:
    """The form reserved names are compared in: normalised, no spaces, case-folded."""
    return "".join(normalize_name(name).split()).casefold()


def clean_username(value: object, *, max_chars: int = 32) -> str:
    """A display name, NFKC-normalised without format characters; 400 when reserved."""
    name = clean_text(value, field="username", max_chars=max_chars)
    if any(ch in "\n\t" or unicodedata.category(ch).startswith("Z") and ch != " "
           for ch in name):
        raise InvalidInput("'username' must be one line", reason="name_not_one_line")
    # NFKC can lengthen a name (one ligature is 18 characters): checked again after.
    name = clean_text(normalize_name(name), field="username", max_chars=max_chars)
    if name_key(name) in RESERVED_NAMES:
        raise InvalidInput(f"'{name}' is the bot's name", reason="name_reserved")
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
