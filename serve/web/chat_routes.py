"""The chat routes: the pages, ``/login``, ``/logout``, ``/me``, ``/send``, ``/history``,
``/stream`` (SSE).

A message sent to ``/send`` is published at once and 小X's reply is left to a task of its
own (``Chat.start_reply``). Everything a client sees comes from the broker, so every
process and every reconnecting client sees the same events in order.
"""

from __future__ import annotations

import math
from pathlib import Path

import anyio
from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from serve.web.broker import BrokerUnavailable, parse_id
from serve.web.chat import chat_of
from serve.web.fields import int_param, read_fields
from serve.web.idempotency import HEADER as IDEMPOTENCY_HEADER
from serve.web.idempotency import send_uid
from serve.web.reply import try_publish
from serve.web.security.client import client_ip
from serve.web.security.session import (
    current_user,
    log_in,
    log_out,
    require_user,
    session_id,
)
from serve.web.security.text import InvalidInput, clean_room, clean_text, clean_username

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
    clean_room(request.query_params.get("room"))
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


async def send(request: Request) -> Response:
    chat = chat_of(request)
    user = require_user(request)
    fields = await read_fields(request)
    room = clean_room(request.query_params.get("room") or fields.get("room"))
    if "message" not in fields:
        raise InvalidInput("'message' is missing")
    text = clean_text(fields["message"], field="message",
                      max_chars=chat.settings.max_message_chars)
    uid = send_uid(request.headers.get(IDEMPOTENCY_HEADER), user, room)
    if uid is not None and (sent := await _sent_before(chat, room, uid)) is not None:
        # A resend of a message already stored (its first answer was a 503 or was lost):
        # answered by 小X only if the first attempt never got as far.
        reply_id = chat.start_reply(room, text, sent) if await _claim(chat, room, uid) else None
        return JSONResponse({"id": sent, "room": room, "reply_id": reply_id,
                             "duplicate": True}, status_code=202)
    allowed, retry_after = await chat.allow_send(user)
    if not allowed:
        raise InvalidInput(f"too many messages: wait {retry_after:.0f} s",
                           status=429, reason="rate_limited")
    if chat.closing or chat.broker is None:
        raise InvalidInput("the server is shutting down", status=503, reason="shutting_down")
    try:
        event = await chat.broker.publish(room, "message", {"role": "user", "user": user,
                                                             "text": text},
                                          timeout=chat.settings.send_wait_seconds, uid=uid)
    except BrokerUnavailable:
        raise InvalidInput("chat storage is unavailable; try again", status=503,
                           reason="broker_unavailable") from None
    chat.metrics.messages.labels("user").inc()
    if uid is not None and not await _claim(chat, room, uid):
        return JSONResponse({"id": event.id, "room": room, "reply_id": None,
                             "duplicate": True}, status_code=202)  # a concurrent resend
    reply_id = chat.start_reply(room, text, event.id)
    return JSONResponse({"id": event.id, "room": room, "reply_id": reply_id}, status_code=202)


async def _sent_before(chat, room: str, uid: str) -> str | None:
    if chat.broker is None:
        return None  # not started: the send answers 503 below
    try:
        return await chat.broker.published_id(room, uid,
                                              timeout=chat.settings.send_wait_seconds)
    except BrokerUnavailable:
        raise InvalidInput("chat storage is unavailable; try again", status=503,
                           reason="broker_unavailable") from None


async def _claim(chat, room: str, uid: str) -> bool:
    """Whether this request starts the message's reply (the first to ask does)."""
    try:
        return await chat.broker.claim(room, uid, "reply")
    except BrokerUnavailable:
        return True  # Redis gone again: a reply (perhaps a second) beats none


async def history(request: Request) -> Response:
    chat = chat_of(request)
    require_user(request)
    room = clean_room(request.query_params.get("room"))
    limit = int_param(request, "limit", chat.settings.history_limit, 0,
                      chat.settings.history_max_messages)
    assert chat.broker is not None
    try:
        messages, cursor = await chat.broker.history(room, limit)
    except BrokerUnavailable:
        raise InvalidInput("chat storage is unavailable", status=503,
                           reason="broker_unavailable") from None
    return JSONResponse({"room": room, "messages": [e.data for e in messages],
                         "cursor": cursor}, headers={"Cache-Control": "no-store"})


async def stream(request: Request) -> Response:
    chat = chat_of(request)
    user = require_user(request)
    room = clean_room(request.query_params.get("room"))
    last_id = (request.headers.get("last-event-id")
               or request.query_params.get("last_event_id") or None)
    if last_id is not None:
        try:
            parse_id(last_id)
        except ValueError:
            raise InvalidInput("Last-Event-ID is not an event id of this server") from None
    broker = chat.broker
    if broker is None or not broker.healthy:
        raise InvalidInput("chat storage is unavailable", status=503,
                           reason="broker_unavailable")

    async def events():
        chat.metrics.sse_clients.inc()
        try:
            async with broker.subscribe(room, last_id) as live:
                await try_publish(broker, room, "join", {"user": user})
                async for event in live:
                    yield event.sse()
        except BrokerUnavailable:
            return  # the client reconnects with its Last-Event-ID
        finally:
            chat.metrics.sse_clients.dec()
            # The stream is being cancelled: only a shielded scope may still await.
            with anyio.move_on_after(2, shield=True):
                await try_publish(broker, room, "leave", {"user": user})

    return EventSourceResponse(events(), ping=chat.settings.ping_seconds, send_timeout=30,
                               headers={"Cache-Control": "no-store"},
                               shutdown_event=chat.sse_shutdown, shutdown_grace_period=2)


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
