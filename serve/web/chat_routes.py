"""The chat routes: the pages, ``/login``, ``/logout``, ``/me``, ``/send``, ``/history``,
``/stream`` (SSE).

A message sent to ``/send`` is published at once and 小X's reply is left to a task of its
own (``Chat.start_reply``). Everything a client sees comes from the broker, so every
process and every reconnecting client sees the same events in order.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from pathlib import Path

import anyio
from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from serve.web.broker import BrokerUnavailable
from serve.web.chat import Chat, chat_of
from serve.web.fields import (
    idempotency_key,
    int_param,
    last_event_id,
    read_fields,
    room_param,
    try_later,
)
from serve.web.presence import TooManyStreams, public_tag
from serve.web.reply import try_publish
from serve.web.security.client import client_ip
from serve.web.security.session import (
    current_user,
    log_in,
    log_out,
    require_user,
    session_id,
)
from serve.web.security.text import InvalidInput, clean_text, clean_username

STATIC_DIR = Path(__file__).resolve().parent / "static"


def wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "")


def page(name: str, title: str) -> Response:
    path = STATIC_DIR / name
    headers = {"Cache-Control": "no-store"}
    if path.is_file():
        return FileResponse(path, media_type="text/html; charset=utf-8", headers=headers)
    return HTMLResponse(f"<!doctype html><meta charset='utf-8'><title>{title}</title>"
                        f"<p>{title}: {name} is missing from serve/web/static.</p>",
                        headers=headers)


async def index(request: Request) -> Response:
    if current_user(request) is None:
        return RedirectResponse("/login", status_code=303)
    room_param(request)
    return page("chat.html", "小X 聊天室")


async def login_page(request: Request) -> Response:
    return page("login.html", "登录 · 小X 聊天室")


# The ?error= codes the login page knows (login.js shows its own text for each): the
# redirect never carries text, so the page never shows text taken from the URL.
LOGIN_ERRORS = frozenset({"invalid_input", "too_long", "name_reserved", "name_not_one_line",
                          "rate_limited"})


def _login_refused(request: Request, e: InvalidInput, headers: dict[str, str]) -> Response:
    if wants_html(request) and e.status in (400, 429):  # a plain form post from the page
        chat_of(request).metrics.errors.labels(e.reason).inc()
        code = e.reason if e.reason in LOGIN_ERRORS else "invalid_input"
        return RedirectResponse(f"/login?error={code}", status_code=303)
    chat_of(request).metrics.errors.labels(e.reason).inc()
    return JSONResponse({"error": str(e), "reason": e.reason}, status_code=e.status,
                        headers=headers)


async def login(request: Request) -> Response:
    chat = chat_of(request)
    allowed, retry_after = await request.app.state.login_limiter.allow(
        client_ip(request.scope))
    if not allowed:  # per client address: many names from one place are one budget
        wait = max(1, math.ceil(retry_after))
        return _login_refused(request, InvalidInput(
            f"too many logins from this address: wait {wait} s", status=429,
            reason="rate_limited"), {"Retry-After": str(wait)})
    try:
        fields = await read_fields(request)
        if "username" not in fields:
            raise InvalidInput("'username' is missing")
        name = clean_username(fields["username"], max_chars=chat.settings.max_username_chars)
    except InvalidInput as e:
        if e.status != 400:
            raise
        return _login_refused(request, e, {})
    log_in(request, name)
    if wants_html(request):
        return RedirectResponse("/", status_code=303)
    return JSONResponse({"user": name})


async def logout(request: Request) -> Response:
    sid = session_id(request)
    if sid is not None:  # refused from now on, by every process; its streams end
        await request.app.state.revocations.revoke(sid)
    log_out(request)
    if wants_html(request):
        return RedirectResponse("/login", status_code=303)
    return JSONResponse({"user": None})


async def me(request: Request) -> Response:
    return JSONResponse({"user": require_user(request)},
                        headers={"Cache-Control": "no-store"})


def _unavailable() -> InvalidInput:
    return try_later("chat storage is unavailable; try again", 5, status=503,
                     reason="broker_unavailable")


def _session(request: Request) -> tuple[str, str]:
    """(name, session id) of the logged-in caller, or a 401."""
    user = require_user(request)
    return user, session_id(request) or ""  # require_user saw the id


async def send(request: Request) -> Response:
    chat = chat_of(request)
    user, sid = _session(request)
    key = idempotency_key(request)
    fields = await read_fields(request)
    room = room_param(request, fields)
    if "message" not in fields:
        raise InvalidInput("'message' is missing")
    text = clean_text(fields["message"], field="message",
                      max_chars=chat.settings.max_message_chars)
    allowed, retry_after = await chat.allow_send(sid, client_ip(request.scope))
    if not allowed:
        raise try_later(f"too many messages: wait {retry_after:.0f} s", retry_after)
    if chat.closing or chat.broker is None:
        raise try_later("the server is shutting down", 5, status=503, reason="shutting_down")
    # A retry with the same Idempotency-Key (scoped to the session) stores nothing new
    # and starts no second reply: the same ids come back.
    uid = reply_id = None
    if key is not None:
        uid = hashlib.sha256(f"{sid}\0{key}".encode()).hexdigest()[:32]
        reply_id = hashlib.sha256(f"reply\0{uid}".encode()).hexdigest()[:16]
    try:
        event = await chat.broker.publish(
            room, "message", {"role": "user", "user": user, "tag": public_tag(sid),
                              "text": text}, uid=uid, timeout=chat.settings.send_wait_seconds)
    except BrokerUnavailable:
        raise _unavailable() from None
    if not event.duplicate:
        chat.metrics.messages.labels("user").inc()
    if uid is None or await _claim(chat, room, uid):
        reply_id = chat.start_reply(room, text, event.id, reply_id=reply_id)
    return JSONResponse({"id": event.id, "room": room, "reply_id": reply_id}, status_code=202)


async def _claim(chat: Chat, room: str, uid: str) -> bool:
    """Whether this attempt starts the message's reply: the first to ask does (a retry
    whose first attempt stored the message but got a 503 never started one)."""
    try:
        return await chat.broker.claim(room, uid)
    except BrokerUnavailable:
        return True  # Redis gone again: a reply (perhaps a second one) beats none


async def history(request: Request) -> Response:
    chat = chat_of(request)
    user, sid = _session(request)
    room = room_param(request)
    limit = int_param(request, "limit", chat.settings.history_limit, 0,
                      chat.settings.history_max_messages)
    assert chat.broker is not None
    try:
        messages, cursor = await chat.broker.history(room, limit)
    except BrokerUnavailable:
        raise _unavailable() from None
    # "you": the page's own name and tag, to tell its messages from another's of that name.
    return JSONResponse({"room": room, "messages": [e.data for e in messages],
                         "cursor": cursor, "you": {"user": user, "tag": public_tag(sid)}},
                        headers={"Cache-Control": "no-store"})


async def stream(request: Request) -> Response:
    chat = chat_of(request)
    user, sid = _session(request)
    room = room_param(request)
    last_id = last_event_id(request)
    if chat.broker is None or chat.gate is None or not chat.broker.healthy:
        raise _unavailable()
    stack = contextlib.AsyncExitStack()
    try:
        live = await _open_stream(chat, stack, request, sid, user, room, last_id)
    except BaseException:
        await _close_shielded(stack)
        raise
    response = EventSourceResponse(_events(chat, live), ping=chat.settings.ping_seconds,
                                   send_timeout=30, headers={"Cache-Control": "no-store"},
                                   shutdown_event=chat.sse_shutdown, shutdown_grace_period=2)
    return _Releasing(response, stack)  # type: ignore[return-value]


async def _open_stream(chat: Chat, stack: contextlib.AsyncExitStack, request: Request,
                       sid: str, user: str, room: str, last_id: str | None):
    """Everything that can fail, done before the 200: the caps, the subscription, the
    replay (a Last-Event-ID from before the trimmed log gets a ``reset`` first)."""
    assert chat.broker is not None and chat.gate is not None
    try:
        ticket = await chat.gate.open(sid, client_ip(request.scope), room, user)
    except TooManyStreams as e:
        raise try_later(f"{e}: close one first", 5, reason="too_many_streams") from None
    except BrokerUnavailable:
        raise _unavailable() from None
    stack.push_async_callback(chat.gate.close, ticket)
    try:
        live = await stack.enter_async_context(chat.broker.subscribe(room, last_id))
    except BrokerUnavailable:
        raise _unavailable() from None
    if ticket.first:  # the session's first stream in the room: announced once
        await try_publish(chat.broker, room, "join", {"user": user, "tag": ticket.tag})
    return live


async def _events(chat: Chat, live):
    chat.metrics.sse_clients.inc()
    try:
        async for event in live:
            yield event.sse()
    except BrokerUnavailable:
        return  # the client reconnects with its Last-Event-ID
    finally:
        chat.metrics.sse_clients.dec()


async def _close_shielded(stack: contextlib.AsyncExitStack) -> None:
    # Also while the request is being cancelled: only a shielded scope may still await.
    with anyio.move_on_after(3, shield=True):
        await stack.aclose()


class _Releasing:
    """The SSE response, then the stream's claims and subscription released: also when
    the response never started (the client left first)."""

    def __init__(self, response: Response, stack: contextlib.AsyncExitStack):
        self.response, self.stack = response, stack

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.response(scope, receive, send)
        finally:
            await _close_shielded(self.stack)


def routes() -> list[Route]:
    return [
        Route("/", index, methods=["GET"]),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/me", me, methods=["GET"]),
        Route("/send", send, methods=["POST"]),
        Route("/history", history, methods=["GET"]),
        Route("/stream", stream, methods=["GET"]),
    ]
