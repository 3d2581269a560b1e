"""The server's guards: secret key, origin check, body cap, rate limit, text validation.

The middlewares are pure ASGI (``BaseHTTPMiddleware`` breaks the disconnect handling
that SSE and streamed replies rely on).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
import unicodedata
from collections.abc import Iterable
from pathlib import Path

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; "
            "img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
            "form-action 'self'")
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
ROOM_PATTERN = re.compile(r"^[0-9A-Za-z_\-\u3400-\u9fff]{1,32}$")
BOT_NAME = "小X"


class InvalidInput(ValueError):
    """Input that gets a 4xx JSON error; ``status`` says which."""

    def __init__(self, message: str, status: int = 400, reason: str = "invalid_input"):
        super().__init__(message)
        self.status = status
        self.reason = reason


# --- the secret key -----------------------------------------------------------------

def load_or_create_secret_key(path: Path) -> str:
    """The key stored at ``path``; created once (random, mode 0600) when absent."""
    path = Path(path)
    try:
        key = path.read_text(encoding="utf-8").strip()
        if len(key) >= 32:
            return key
        raise ValueError(f"{path}: the secret key is too short; delete it to make a new one")
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = secrets.token_urlsafe(48)
    try:
        # O_EXCL: of several workers starting at once exactly one writes the key.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):  # another process is writing it right now
            existing = path.read_text(encoding="utf-8").strip()
            if existing:
                return existing
            time.sleep(0.02)
        raise ValueError(f"{path}: empty secret key file") from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(key + "\n")
    return key


# --- text --------------------------------------------------------------------------------

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


# --- rate limit --------------------------------------------------------------------------

class RateLimiter:
    """A token bucket per key: ``rate`` events per ``per`` seconds, bursts up to ``rate``."""

    def __init__(self, rate: int, per: float, *, max_keys: int = 100_000):
        self.rate, self.per, self.max_keys = rate, per, max_keys
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, key: str, now: float | None = None) -> tuple[bool, float]:
        """(allowed, seconds until the next token when not)."""
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.get(key, (float(self.rate), now))
        tokens = min(float(self.rate), tokens + (now - last) * self.rate / self.per)
        if len(self._buckets) >= self.max_keys and key not in self._buckets:
            self._buckets.clear()  # bounded memory: forgetting everyone is the safe side
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return True, 0.0
        self._buckets[key] = (tokens, now)
        return False, (1.0 - tokens) * self.per / self.rate


# --- ASGI middlewares -------------------------------------------------------------------

async def send_json_error(send: Send, status: int, message: str, reason: str,
                          headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"error": message, "reason": reason}, ensure_ascii=False).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


class BodyLimitMiddleware:
    """413 for a request body over ``max_bytes`` (declared or streamed), before any parser."""

    drain_bytes = 4 << 20

    def __init__(self, app: ASGIApp, max_bytes: int, on_reject=None):
        self.app, self.max_bytes, self.on_reject = app, max_bytes, on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in UNSAFE_METHODS:
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._reject(send, receive)
            return
        # Read the (small, capped) body here so a chunked upload cannot exceed the cap.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(send, receive, more=message.get("more_body", False))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, send: Send, receive: Receive, more: bool = True) -> None:
        # Read and drop what the client is still sending (up to a bound): answering while
        # it writes makes the closing socket reset the connection before it reads the 413.
        dropped = 0
        with anyio.move_on_after(2.0):
            while more and dropped < self.drain_bytes:
                message = await receive()
                if message["type"] != "http.request":
                    break
                dropped += len(message.get("body", b""))
                more = message.get("more_body", False)
        if self.on_reject is not None:
            self.on_reject("body_too_large")
        await send_json_error(send, 413, f"the request body is over {self.max_bytes} bytes",
                              "body_too_large", [(b"connection", b"close")])


class OriginCheckMiddleware:
    """CSRF guard: a browser POST must come from this site (``Origin``/``Sec-Fetch-Site``).

    Requests without either header (curl, scripts) pass: they carry no ambient cookie
    risk. ``exempt_prefixes`` (the bearer-authenticated API) are not checked.
    """

    def __init__(self, app: ASGIApp, allowed_origins: Iterable[str] = (),
                 exempt_prefixes: tuple[str, ...] = ("/v1/",), on_reject=None):
        self.app = app
        self.allowed = {o.rstrip("/").lower() for o in allowed_origins}
        self.exempt_prefixes = exempt_prefixes
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and scope["method"] in UNSAFE_METHODS
                and not scope["path"].startswith(self.exempt_prefixes)
                and not self.same_site(scope)):
            if self.on_reject is not None:
                self.on_reject("bad_origin")
            await send_json_error(send, 403, "cross-site request refused", "bad_origin")
            return
        await self.app(scope, receive, send)

    def same_site(self, scope: Scope) -> bool:
        origin = _header(scope, b"origin")
        if origin is not None:
            origin = origin.rstrip("/").lower()
            if origin in self.allowed:
                return True
            host = (_header(scope, b"x-forwarded-host") or _header(scope, b"host") or "")
            host = host.split(",")[0].strip().lower()
            return origin in (f"http://{host}", f"https://{host}")
        fetch_site = _header(scope, b"sec-fetch-site")
        return fetch_site is None or fetch_site.lower() in ("same-origin", "none")


class SecurityHeadersMiddleware:
    """nosniff everywhere; the page CSP on HTML responses."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                extra = [(b"x-content-type-options", b"nosniff"),
                         (b"referrer-policy", b"same-origin"),
                         (b"x-frame-options", b"DENY")]
                if b"content-security-policy" not in names:
                    extra.append((b"content-security-policy", PAGE_CSP.encode()))
                headers.extend(h for h in extra if h[0] not in names)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
