"""Bad input to every endpoint: a 4xx with a clear JSON error or a correct reply, never a
500, never a broken stream.

One ``python -m serve`` process with Redis, an API key, a small engine queue and a
per-user rate limit. Each text of ``TEXTS`` goes into every place an endpoint reads text
(JSON fields, query parameters, a header); each accepted chat message must come back on a
strictly parsed stream unchanged, followed by 小X's reply, with no event it did not send.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
import unicodedata
from dataclasses import dataclass
from urllib.parse import quote_from_bytes

import httpx
import itsdangerous
import pytest

from serve.web.security.text import ROOM_PATTERN
from tests.conftest import RedisServer
from tests.reliability._support import ReconnectingStream
from tests.serve._helpers_server import (
    ServerProcess,
    StrictSSEParser,
    bot_reply_to,
    login,
    sse_lines,
)

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]

KEY = "reliability-api-key-0123456789"
BEARER = {"Authorization": f"Bearer {KEY}"}
RATE = 40  # messages per user per window: each case logs in as its own user
MAX_QUEUE = 8
MEGABYTE = 1 << 20


@dataclass(frozen=True)
class Text:
    name: str
    utf8: bytes  # the text's bytes (not always valid UTF-8)
    json_literal: bytes  # the text as a JSON string literal, as sent on the wire

    @property
    def text(self) -> str | None:
        """The Python string, or None when the bytes are not valid Unicode."""
        try:
            return json.loads(self.json_literal)
        except ValueError:
            return None


def text(name: str, value: str) -> Text:
    return Text(name, value.encode("utf-8"),
                json.dumps(value, ensure_ascii=False).encode("utf-8"))


TEXTS = [
    text("empty", ""),
    text("whitespace", " \t\u3000\n \u00a0"),
    text("1 MB", "长" * (MEGABYTE // 3)),
    Text("invalid UTF-8", b"ok\xff\xfe\xc3(", b'"ok\xff\xfe\xc3("'),
    Text("lone surrogate", b"a\xed\xa0\x80b", b'"a\\ud800b"'),
    text("NUL and controls", "a\x00b\x07c\x1b[31m"),
    text("SSE injection LF", "hi\n\nevent: x\ndata: y\n\n"),
    text("SSE injection CR", "hi\r\revent: x\rdata: y"),
    text("SSE injection CRLF", "hi\r\n\r\nid: 9999999999999-0\r\nevent: x\r\ndata: y"),
    text("line separators", "第一行\u2028event: x\u2029data: y"),
    text("RTL override", "\u202eolleh 你好"),
    text("emoji ZWJ", "👩\u200d👩\u200d👧\u200d👦🏳️\u200d🌈"),
    text("Traditional Chinese", "你們今天過得怎麼樣？我覺得還不錯。"),
    text("only punctuation", "？！。，、……——《》"),
    text("only unknown words", "龘靐齉爩䨻"),
    text("HTML and script", "<script>alert(1)</script><img src=x onerror=alert(1)>"),
]
# What /send must answer for each text (max_message_chars is 500, the body cap 64 KiB).
SEND_STATUS = {"empty": 400, "whitespace": 400, "1 MB": 413, "invalid UTF-8": 400,
               "lone surrogate": 400, "NUL and controls": 400, "SSE injection CR": 400,
               "SSE injection CRLF": 400}


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    redis = RedisServer(tmp_path_factory.mktemp("redis"))
    redis.start()
    env = {"XIAOX_API_KEY": KEY, "XIAOX_RATE_LIMIT_MESSAGES": str(RATE),
           "XIAOX_RATE_LIMIT_WINDOW": "600", "XIAOX_MAX_QUEUE": str(MAX_QUEUE),
           "XIAOX_RATE_LIMIT_IP_MESSAGES": "100000"}  # every session here is 127.0.0.1
    process = ServerProcess(model_dir, tmp_path_factory.mktemp("bad_input"),
                            redis_url=redis.url, env=env)
    try:
        process.start()
        yield process
    finally:
        process.stop()
        redis.stop()


def client(server: ServerProcess, **kwargs) -> httpx.AsyncClient:
    return server.client(timeout=60, **kwargs)


_users = iter(range(1_000_000))


async def fresh_user(c: httpx.AsyncClient) -> str:
    name = f"user{next(_users)}"
    await login(c, name)
    return name


def assert_clear_error(response: httpx.Response) -> None:
    """A 4xx whose JSON says what is wrong (the app's or OpenAI's error shape)."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json"), response.headers
    error = response.json()["error"]
    message = error["message"] if isinstance(error, dict) else error
    assert isinstance(message, str) and message.strip(), response.text


def assert_no_server_error(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        assert_clear_error(response)


def query(name: str, value: Text) -> str:
    return f"{name}={quote_from_bytes(value.utf8, safe='')}"


def raw_request(port: int, head: bytes) -> tuple[int, bytes]:
    """A request httpx refuses to send (a 1 MB request line): the status and the body."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head)
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except ConnectionResetError:  # the server answered and closed mid-upload
            pass
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


async def get_with_query(c: httpx.AsyncClient, server: ServerProcess, path: str,
                         name: str, value: Text, headers: dict | None = None
                         ) -> httpx.Response | None:
    """GET path?name=value; None when the URL was too long to send with httpx (the raw
    request was sent and checked instead)."""
    q = query(name, value)
    if len(q) < 60_000:
        return await c.get(f"{path}?{q}", headers=headers or {})
    cookie = "; ".join(f"{k}={v}" for k, v in c.cookies.items())
    head = (f"GET {path}?{q} HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {cookie}\r\n"
            f"Connection: close\r\n\r\n").encode()
    status, body = await asyncio.to_thread(raw_request, server.port, head)
    # Refused by uvicorn's HTTP parser before the app (text/plain): a 4xx, never a 500.
    assert 400 <= status < 500 or status == 200, (status, body[:200])
    return None


async def read_stream_start(c: httpx.AsyncClient, url: str, headers: dict) -> httpx.Response:
    """Open /stream; when it is a 200, parse strictly up to the first event (the join)."""
    async with c.stream("GET", url, headers={"Accept": "text/event-stream", **headers}) as r:
        if r.status_code != 200:
            await r.aread()
            return r
        parser, pending = StrictSSEParser(), ""
        async with asyncio.timeout(10):
            async for chunk in r.aiter_text():
                lines, pending = sse_lines(pending + chunk)
                events = [e for e in map(parser.feed, lines) if e is not None]
                if events:
                    assert events[0]["event"] == "join", events
                    return r
    raise AssertionError("the stream ended without an event")


# --- every text, every place ------------------------------------------------------------


@pytest.mark.parametrize("value", TEXTS, ids=[t.name for t in TEXTS])
async def test_send_message(server, value):
    async with client(server) as c:
        user = await fresh_user(c)
        room = "bad-send"
        watcher = await ReconnectingStream(c.cookies, [server.url], room).start()
        try:
            response = await c.post("/send", params={"room": room},
                                    content=b'{"message": ' + value.json_literal + b"}",
                                    headers={"content-type": "application/json"})
            expected = SEND_STATUS.get(value.name, 202)
            assert response.status_code == expected, (response.status_code, response.text)
            if expected != 202:
                assert_clear_error(response)
                return
            sent = response.json()
            await watcher.wait_for(bot_reply_to(sent["id"]), 30)
            await asyncio.sleep(0.2)  # anything forged would come right after
        finally:
            await watcher.close()
        assert watcher.protocol_error is None
        mine = next(e for e in watcher.events if e["id"] == sent["id"])
        assert mine["event"] == "message"
        assert mine["data"]["text"] == value.text.strip() and mine["data"]["user"] == user
        reply = next(e for e in watcher.events if e["data"].get("reply_to") == sent["id"])
        assert reply["data"]["role"] == "bot" and reply["data"]["text"]
        # Nothing but what the server published: the ids are the log's, in order, once.
        assert all(e["event"] != "x" for e in watcher.events)
        assert "9999999999999-0" not in watcher.ids
        assert len(set(watcher.ids)) == len(watcher.ids)
        history = (await c.get("/history", params={"room": room, "limit": 1000})).json()
        assert any(m["id"] == sent["id"] and m["text"] == value.text.strip()
                   for m in history["messages"])


@pytest.mark.parametrize("value", TEXTS, ids=[t.name for t in TEXTS])
async def test_login_username(server, value):
    async with client(server) as c:
        response = await c.post("/login", content=b'{"username": ' + value.json_literal + b"}",
                                headers={"content-type": "application/json"})
        assert_no_server_error(response)
        me = await c.get("/me")
        if response.status_code == 200:
            # names are kept NFKC-normalised without format characters (Unicode Cf)
            name = "".join(ch for ch in unicodedata.normalize("NFKC", value.text.strip())
                           if unicodedata.category(ch) != "Cf").strip()
            assert me.json() == {"user": name}
            assert response.json() == {"user": name}
            # The name travels in every join event: the stream must stay well formed.
            started = await read_stream_start(c, "/stream?room=names", {})
            assert started.status_code == 200
        else:
            assert me.status_code == 401


@pytest.mark.parametrize("value", TEXTS, ids=[t.name for t in TEXTS])
async def test_logout_with_a_body(server, value):
    async with client(server) as c:
        await fresh_user(c)
        response = await c.post("/logout", content=b'{"note": ' + value.json_literal + b"}",
                                headers={"content-type": "application/json"})
        if value.name == "1 MB":
            assert response.status_code == 413
            assert_clear_error(response)
        else:
            assert response.status_code == 200 and response.json() == {"user": None}
            assert (await c.get("/me")).status_code == 401


PLACES = [("/send", "room"), ("/stream", "room"), ("/stream", "last_event_id"),
          ("/history", "room"), ("/history", "limit"), ("/v1/models", "q"),
          ("/healthz", "q"), ("/metrics", "q")]


@pytest.mark.parametrize("value", TEXTS, ids=[t.name for t in TEXTS])
@pytest.mark.parametrize(("path", "name"), PLACES, ids=[f"{p}?{n}" for p, n in PLACES])
async def test_query_parameters(server, path, name, value):
    async with client(server) as c:
        await fresh_user(c)
        q = query(name, value)
        if path == "/send":
            response = await c.post(f"/send?{q}", json={"message": "房间名"}) \
                if len(q) < 60_000 else None
        elif path == "/stream" and len(q) < 60_000:
            response = await read_stream_start(c, f"/stream?{q}", {})
        else:
            headers = BEARER if path.startswith("/v1/") else {}
            response = await get_with_query(c, server, path, name, value, headers)
        if response is None:
            return  # sent raw: checked in get_with_query
        assert_no_server_error(response)
        if value.name == "empty" or name == "q" or (
                name == "room" and ROOM_PATTERN.match(value.text or "")):
            assert response.status_code in (200, 202), response.text
        else:  # not a room name, an event id or a number
            assert response.status_code == 400, response.text


@pytest.mark.parametrize("value", [t for t in TEXTS if not {0, 10, 13} & set(t.utf8)],
                         ids=[t.name for t in TEXTS if not {0, 10, 13} & set(t.utf8)])
async def test_last_event_id_header(server, value):
    async with client(server) as c:
        await fresh_user(c)
        response = await read_stream_start(c, "/stream", {"Last-Event-ID": value.utf8})
        if value.name == "1 MB":
            # Refused by uvicorn's HTTP parser (h11's header size limit) before the app:
            # a 400 in text/plain, not the app's JSON.
            assert response.status_code == 400
            return
        assert_no_server_error(response)
        expected = 200 if value.name in ("empty", "whitespace") else 400
        assert response.status_code == expected, response.text


def parse_openai_stream(raw: str) -> list[dict]:
    parser = StrictSSEParser(fields=("data",), comments=False)
    lines, rest = sse_lines(raw)
    assert rest == "" and raw.endswith("\n\n"), "the stream must end with a complete event"
    datas = [e["data"] for e in map(parser.feed, lines) if e is not None]
    assert datas[-1] == "[DONE]"
    return [json.loads(d) for d in datas[:-1]]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("value", TEXTS, ids=[t.name for t in TEXTS])
async def test_openai_content(server, value, stream):
    body = (b'{"model": "xiaox", "stream": ' + (b"true" if stream else b"false")
            + b', "max_tokens": 8, "messages": [{"role": "user", "content": '
            + value.json_literal + b"}]}")
    async with client(server) as c:
        response = await c.post("/v1/chat/completions", content=body,
                                headers={**BEARER, "content-type": "application/json"})
    assert_no_server_error(response)
    if response.status_code != 200:
        assert response.status_code in (400, 413), response.text
        assert value.name in SEND_STATUS or value.name in ("emoji ZWJ", "only punctuation"), (
            value.name, response.text)
        return
    assert value.name not in SEND_STATUS
    if stream:
        chunks = parse_openai_stream(response.text)
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    else:
        assert isinstance(response.json()["choices"][0]["message"]["content"], str)


@pytest.mark.parametrize("value", TEXTS, ids=[t.name for t in TEXTS])
async def test_openai_model_name(server, value):
    body = b'{"model": ' + value.json_literal + b', "messages": [{"role": "user", ' \
           b'"content": "\xe4\xbd\xa0\xe5\xa5\xbd"}]}'
    async with client(server) as c:
        response = await c.post("/v1/chat/completions", content=body,
                                headers={**BEARER, "content-type": "application/json"})
    assert_no_server_error(response)
    expected = {"empty": 200, "1 MB": 413, "invalid UTF-8": 400}.get(value.name, 404)
    assert response.status_code == expected, response.text


async def test_openai_unknown_field_named_with_a_lone_surrogate(server):
    body = b'{"messages": [{"role": "user", "content": "hi"}], "x\\ud800": 1}'
    async with client(server) as c:
        response = await c.post("/v1/chat/completions", content=body,
                                headers={**BEARER, "content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert_clear_error(response)


# --- wrong requests ---------------------------------------------------------------------

WRONG_REQUESTS = [
    # (path, content type, body, expected status)
    ("/login", "text/plain", b"username=me", 415),
    ("/login", None, b"me", 415),
    ("/login", "application/json", b"{}", 400),
    ("/login", "application/json", b'{"user": "me"}', 400),
    ("/login", "application/json", b'["username", "me"]', 400),
    ("/login", "application/json", b'{"username": ["me"]}', 400),
    ("/login", "application/json", b'{"username": ', 400),
    ("/login", "application/x-www-form-urlencoded", b"name=me", 400),
    ("/login", "multipart/form-data; boundary=zz", b"--zz--\r\n", 400),
    ("/login", "multipart/form-data", b"no boundary", 400),
    ("/send", "application/json", b'{"room": "lobby"}', 400),
    ("/send", "application/xml", b"<message>hi</message>", 415),
    ("/send", "application/json", b'{"message": "hi", "room": 5}', 400),
    ("/send", "application/json", b'{"message": "hi", "room": "a b"}', 400),
    ("/v1/chat/completions", "text/plain", b"hello", 415),
    ("/v1/chat/completions", None, b"", 415),
    ("/v1/chat/completions", "application/json", b"{}", 400),
    ("/v1/chat/completions", "application/json", b'{"messages": []}', 400),
    ("/v1/chat/completions", "application/json", b'{"messages": "hi"}', 400),
    ("/v1/chat/completions", "application/json", b'{"messages": [{"role": "system", '
                                                  b'"content": "hi"}]}', 400),
    ("/v1/chat/completions", "application/json", b'{"messages": [{"role": "user"}]}', 400),
    ("/v1/chat/completions", "application/json", b'{"messages": [{"role": "user", '
                                                  b'"content": "hi"}], "stream": "yes"}', 400),
    ("/v1/chat/completions", "application/json", b'{"messages": [{"role": "user", '
                                                  b'"content": "hi"}], "beam_size": -1}', 400),
    ("/v1/chat/completions", "application/json", b'{"messages": [{"role": "user", '
                                                  b'"content": "hi"}], "colour": 1}', 400),
    ("/v1/chat/completions", "application/json", b'{"messages": [{"role": "user", '
                                                  b'"content": "hi"}], "n": 5}', 400),
]


@pytest.mark.parametrize(("path", "content_type", "body", "status"), WRONG_REQUESTS,
                         ids=[f"{p} {ct} {b[:24]!r}" for p, ct, b, _ in WRONG_REQUESTS])
async def test_wrong_content_types_and_missing_fields(server, path, content_type, body, status):
    async with client(server) as c:
        await fresh_user(c)
        headers = {**BEARER, **({"content-type": content_type} if content_type else {})}
        response = await c.post(path, content=body, headers=headers)
        assert response.status_code == status, response.text
        assert_clear_error(response)


ENDPOINTS = [("POST", "/login"), ("POST", "/logout"), ("POST", "/send"), ("GET", "/stream"),
             ("GET", "/history"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
             ("GET", "/healthz"), ("GET", "/metrics")]


@pytest.mark.parametrize(("method", "path"), ENDPOINTS, ids=[p for _, p in ENDPOINTS])
async def test_wrong_methods_are_405_json(server, method, path):
    async with client(server) as c:
        for wrong in ("PUT", "DELETE", "PATCH", "GET" if method == "POST" else "POST"):
            response = await c.request(wrong, path, headers=BEARER)
            if path == "/login" and wrong == "GET":
                assert response.status_code == 200  # the login page
                continue
            assert response.status_code == 405, (wrong, response.text)
            assert_clear_error(response)


# --- sessions and origins ---------------------------------------------------------------

def session_cookie(secret: str, payload: dict, *, age_seconds: float = 0) -> str:
    """A Starlette session cookie, signed like SessionMiddleware does (itsdangerous)."""

    class Signer(itsdangerous.TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time() - age_seconds)

    data = base64.b64encode(json.dumps(payload).encode())
    return Signer(secret).sign(data).decode()


NEEDS_LOGIN = [("POST", "/send"), ("GET", "/stream"), ("GET", "/history"), ("GET", "/me")]


@pytest.mark.parametrize("kind", ["wrong key", "expired", "unsigned", "garbage", "valid"])
@pytest.mark.parametrize(("method", "path"), NEEDS_LOGIN, ids=[p for _, p in NEEDS_LOGIN])
async def test_forged_and_expired_session_cookies(server, method, path, kind):
    secret = (server.workdir / "secret_key").read_text().strip()
    payload = {"user": "admin", "sid": "a-session-id-of-the-forger"}  # sessions have ids
    cookie = {
        "wrong key": lambda: session_cookie("not-the-key-" * 4, payload),
        "expired": lambda: session_cookie(secret, payload, age_seconds=15 * 24 * 3600),
        "unsigned": lambda: base64.b64encode(json.dumps(payload).encode()).decode(),
        "garbage": lambda: "\u00ff\u00fe" * 10 + ".x.y",
        "valid": lambda: session_cookie(secret, payload),  # the control: the forger's key
    }[kind]()
    headers = {"Cookie": b"xiaox_session=" + cookie.encode("latin-1")}
    async with client(server) as c:
        kwargs = {"json": {"message": "我是管理员"}} if method == "POST" else {}
        if path == "/stream" and kind == "valid":
            response = await read_stream_start(c, "/stream?room=forged", headers)
            assert response.status_code == 200
            return
        response = await c.request(method, path, params={"room": "forged"}, headers=headers,
                                   **kwargs)
        if kind == "valid":
            assert response.status_code in (200, 202), response.text
        else:
            assert response.status_code == 401, response.text
            assert_clear_error(response)


CROSS_SITE = [{"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}]


@pytest.mark.parametrize("headers", CROSS_SITE, ids=["Origin", "Sec-Fetch-Site"])
@pytest.mark.parametrize("path", ["/login", "/logout", "/send"])
async def test_cross_origin_posts_are_refused(server, path, headers):
    async with client(server) as c:
        user = await fresh_user(c)
        body = {"username": "evil"} if path == "/login" else {"message": "跨站"}
        response = await c.post(path, json=body, headers=headers)
        assert response.status_code == 403 and response.json()["reason"] == "bad_origin"
        assert (await c.get("/me")).json() == {"user": user}  # nothing changed


# --- floods -----------------------------------------------------------------------------


async def test_a_send_flood_gets_exactly_the_rate_then_429(server):
    async with client(server) as c:
        await fresh_user(c)
        responses = await asyncio.gather(*(
            c.post("/send", params={"room": "flood"}, json={"message": f"刷屏{i}"})
            for i in range(2 * RATE)))
    statuses = [r.status_code for r in responses]
    assert statuses.count(202) == RATE and statuses.count(429) == RATE, statuses
    for r in responses:
        if r.status_code == 429:
            assert_clear_error(r)
            assert r.json()["reason"] == "rate_limited" and int(r.headers["retry-after"]) > 0


async def test_an_api_flood_gets_answers_or_429_never_an_error(server):
    body = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 20}
    limits = httpx.Limits(max_connections=100)
    async with client(server, limits=limits) as c:
        responses = await asyncio.gather(*(c.post("/v1/chat/completions", json=body,
                                                  headers=BEARER) for _ in range(60)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    assert 200 in statuses
    for r in responses:
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "overloaded" and "retry-after" in r.headers
    async with client(server) as c:  # and the server is fine afterwards
        assert (await c.get("/healthz")).status_code == 200


async def test_a_login_flood_is_served(server):
    async with client(server, limits=httpx.Limits(max_connections=100)) as c:
        responses = await asyncio.gather(*(c.post("/login", json={"username": f"f{i}"})
                                           for i in range(100)))
    assert [r.status_code for r in responses] == [200] * 100
