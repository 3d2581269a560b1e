"""Each guard of serve/web/security/, against a real server process (one section a module);
bad input is a 4xx JSON, never a 500."""

from __future__ import annotations

import asyncio
import json
import os
import stat

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve.web.app import create_app
from serve.web.security.hosts import effective_allowed_hosts, is_loopback, startup_problems
from serve.web.security.origin import OriginCheckMiddleware
from serve.web.security.rate_limit import RateLimiter, SharedRateLimiter
from serve.web.security.revocation import Revocations
from serve.web.security.secret_key import load_or_create_secret_key, signing_keys
from serve.web.security.session import SESSION_MAX_AGE
from serve.web.security.text import InvalidInput, clean_text, clean_username, normalize_name
from serve.web.settings import Settings, settings_from_env
from tests.conftest import ROOT
from tests.serve._helpers_server import ServerProcess, login

pytestmark = pytest.mark.timeout(120)

RATE = 3


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    env = {"XIAOX_RATE_LIMIT_MESSAGES": str(RATE), "XIAOX_RATE_LIMIT_WINDOW": "600",
           "XIAOX_RATE_LIMIT_IP_MESSAGES": "100000",  # every session here is 127.0.0.1
           "XIAOX_MAX_BODY_BYTES": "4096", "XIAOX_MAX_MESSAGE_CHARS": "100",
           "XIAOX_ALLOWED_ORIGINS": "https://chat.example.org"}
    process = ServerProcess(model_dir, tmp_path_factory.mktemp("security"), env=env).start()
    yield process
    process.stop()


def assert_json_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body["error"], str) and body["error"]
    return body


# --- secret_key -------------------------------------------------------------------------

def test_the_secret_key_file_is_created_once_with_mode_0600(tmp_path):
    path = tmp_path / "state" / "xiaox" / "secret_key"
    key = load_or_create_secret_key(path)
    assert len(key) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_secret_key(path) == key  # read back, not regenerated
    assert load_or_create_secret_key(tmp_path / "other") != key


def test_a_too_short_key_file_is_refused(tmp_path):
    path = tmp_path / "secret_key"
    path.write_text("short\n")
    with pytest.raises(ValueError, match="too short"):
        load_or_create_secret_key(path)


def test_the_key_from_the_environment_wins_and_no_file_is_written(model_dir, tmp_path):
    process = ServerProcess(model_dir, tmp_path, env={"XIAOX_SECRET_KEY": "k" * 40})
    try:
        process.start()
        assert not (tmp_path / "secret_key").exists()
        with httpx.Client(base_url=process.url) as c:
            assert c.post("/login", json={"username": "env"}).status_code == 200
            assert c.get("/me").json() == {"user": "env"}
    finally:
        process.stop()


def test_the_server_creates_its_key_file_once_with_mode_0600(server):
    path = server.workdir / "secret_key"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(path.read_text().strip()) >= 32


def test_no_secret_in_the_code():
    web = ROOT / "serve" / "web"
    for path in [*web.glob("*.py"), *(web / "security").glob("*.py")]:
        source = path.read_text(encoding="utf-8")
        assert "secret_key=\"" not in source and "SECRET_KEY = \"" not in source, path


# --- session ----------------------------------------------------------------------------

async def test_the_session_cookie_is_signed_and_http_only(server):
    async with server.client() as c:
        response = await c.post("/login", json={"username": "signed"})
        cookie = response.headers["set-cookie"]
        assert "httponly" in cookie.lower() and "samesite=lax" in cookie.lower()
        value = c.cookies["xiaox_session"]
        payload, _, signature = value.partition(".")
        tampered = payload[:-2] + ("AA" if payload[-2:] != "AA" else "BB") + "." + signature
        c.cookies.set("xiaox_session", tampered)
        assert_json_error(await c.get("/me"), 401)
    async with server.client() as forger:
        import base64

        fake = base64.b64encode(json.dumps({"user": "admin"}).encode()).decode()
        forger.cookies.set("xiaox_session", fake + ".x.y")
        assert_json_error(await forger.get("/me"), 401)



def _session_payload(client: httpx.AsyncClient) -> dict:
    import base64

    payload = client.cookies["xiaox_session"].partition(".")[0]
    return json.loads(base64.b64decode(payload + "=" * (-len(payload) % 4)))


async def test_each_login_gets_its_own_random_session_id(server):
    async with server.client() as first, server.client() as second:
        await login(first, "same-name")
        await login(second, "same-name")
        ids = {_session_payload(first)["sid"], _session_payload(second)["sid"]}
        assert len(ids) == 2 and all(len(sid) >= 24 for sid in ids)
        await login(first, "same-name")  # a new login is a new session
        assert _session_payload(first)["sid"] not in ids


async def test_a_signed_cookie_without_a_session_id_is_not_logged_in(server):
    """Cookies signed before session ids existed (a name alone) no longer log in."""
    import base64

    from itsdangerous import TimestampSigner

    key = (server.workdir / "secret_key").read_text().strip()
    payload = base64.b64encode(json.dumps({"user": "old"}).encode())
    async with server.client() as c:
        c.cookies.set("xiaox_session", TimestampSigner(key).sign(payload).decode())
        assert_json_error(await c.get("/me"), 401)


def test_forwarded_headers_are_believed_only_from_trusted_proxies():
    from serve.web.server import _proxy_options
    from serve.web.settings import Settings

    assert _proxy_options(Settings()) == {"proxy_headers": False}
    assert _proxy_options(Settings(trusted_proxies=("127.0.0.1",))) == {
        "proxy_headers": True, "forwarded_allow_ips": ["127.0.0.1"]}

# --- origin -----------------------------------------------------------------------------

@pytest.mark.parametrize(("headers", "status"), [
    ({"Origin": "http://evil.example"}, 403),
    ({"Origin": "null"}, 403),
    ({"Sec-Fetch-Site": "cross-site"}, 403),
    ({"Sec-Fetch-Site": "same-site"}, 403),
    ({"Origin": "https://chat.example.org"}, 202),  # XIAOX_ALLOWED_ORIGINS
    ({"Sec-Fetch-Site": "same-origin"}, 202),
    ({}, 202),  # not a browser: no ambient credentials to abuse
])
async def test_posts_from_another_origin_are_refused(server, headers, status):
    async with server.client() as c:
        await login(c, f"origin-{status}-{len(headers)}-{sorted(headers.items())}"[:32])
        response = await c.post("/send", json={"message": "hello"}, headers=headers,
                                params={"room": "origin"})
        assert response.status_code == status, response.text
        if status == 403:
            assert response.json()["reason"] == "bad_origin"


async def test_the_same_origin_passes_and_login_is_checked_too(server):
    async with server.client() as c:
        own = {"Origin": server.url}
        assert (await c.post("/login", json={"username": "own"}, headers=own)).status_code == 200
        assert_json_error(await c.post("/login", json={"username": "x"},
                                       headers={"Origin": "http://evil.example"}), 403)
        assert_json_error(await c.post("/logout", headers={"Origin": "http://evil.example"}), 403)
        assert (await c.get("/me")).json() == {"user": "own"}


# --- rate_limit -------------------------------------------------------------------------

def test_the_rate_limiter_refills_over_time():
    limiter = RateLimiter(2, 10.0)
    assert limiter.allow("a", now=0.0)[0] and limiter.allow("a", now=0.0)[0]
    allowed, wait = limiter.allow("a", now=0.0)
    assert not allowed and wait == pytest.approx(5.0)
    assert limiter.allow("a", now=5.0)[0]
    assert limiter.allow("b", now=5.0)[0]


async def test_each_user_has_a_rate_limit(server):
    async with server.client() as c, server.client() as other:
        await login(c, "chatty")
        await login(other, "quiet")
        for i in range(RATE):
            sent = await c.post("/send", json={"message": f"第{i}条"}, params={"room": "rl"})
            assert sent.status_code == 202
        limited = await c.post("/send", json={"message": "one more"}, params={"room": "rl"})
        body = assert_json_error(limited, 429)
        assert body["reason"] == "rate_limited" and "retry-after" in limited.headers
        # Another user is not affected.
        sent = await other.post("/send", json={"message": "hi"}, params={"room": "rl"})
        assert sent.status_code == 202


# --- body_limit -------------------------------------------------------------------------

async def test_bodies_over_the_cap_get_413(server):
    async with server.client() as c:
        await login(c, "big")
        megabyte = b'{"message": "' + b"x" * (1 << 20) + b'"}'
        response = await c.post("/send", content=megabyte,
                                headers={"content-type": "application/json"})
        assert_json_error(response, 413)

        async def chunks():  # no Content-Length: the cap holds while streaming too
            for _ in range(64):
                yield b"x" * 1024

        response = await c.post("/send", content=chunks(),
                                headers={"content-type": "application/json"})
        assert_json_error(response, 413)
        form = await c.post("/login", data={"username": "y" * 10_000})
        assert_json_error(form, 413)


# --- text: InvalidInput and the text checks ---------------------------------------------

def test_clean_text_rules():
    assert clean_text("  你好 \n", field="m", max_chars=5) == "你好"
    for bad in ("", "  ", "\ud800", "x" * 6, "a\x07"):
        with pytest.raises(ValueError):
            clean_text(bad, field="m", max_chars=5)


BAD_SENDS = [
    ("empty", {"json": {"message": ""}}, 400),
    ("whitespace only", {"json": {"message": " \n\t\u3000 "}}, 400),
    ("zero-width only", {"json": {"message": "\u200b\ufeff\u00ad"}}, 400),
    ("too long", {"json": {"message": "长" * 101}}, 400),
    ("missing field", {"json": {"text": "hi"}}, 400),
    ("not a string", {"json": {"message": 42}}, 400),
    ("null", {"json": {"message": None}}, 400),
    ("a list", {"json": ["message"]}, 400),
    ("invalid JSON", {"content": b'{"message": ', "ct": "application/json"}, 400),
    ("invalid UTF-8", {"content": b'{"message": "\xff\xfe"}', "ct": "application/json"}, 400),
    ("lone surrogate", {"content": b'{"message": "a\\ud800b"}', "ct": "application/json"}, 400),
    ("control char", {"json": {"message": "a\u0000b"}}, 400),
    ("deep JSON", {"content": b"[" * 100_0 + b"]" * 100_0, "ct": "application/json"}, 400),
    ("form with bad UTF-8", {"content": b"message=%ff%fe",
                             "ct": "application/x-www-form-urlencoded"}, 400),
    ("wrong content type", {"content": b"message=hi", "ct": "text/plain"}, 415),
    ("no content type", {"content": b"hi", "ct": None}, 415),
]


@pytest.mark.parametrize(("case", "request_args", "status"), BAD_SENDS,
                         ids=[c[0] for c in BAD_SENDS])
async def test_bad_input_is_a_4xx_json_error(server, case, request_args, status):
    async with server.client() as c:
        await login(c, "bad input")
        kwargs = {}
        if "json" in request_args:
            kwargs["json"] = request_args["json"]
        else:
            kwargs["content"] = request_args["content"]
            kwargs["headers"] = ({"content-type": request_args["ct"]}
                                 if request_args["ct"] else {})
        assert_json_error(await c.post("/send", params={"room": "bad"}, **kwargs), status)


async def test_a_form_message_is_accepted(server):
    async with server.client() as c:
        await login(c, "former")
        response = await c.post("/send", data={"message": "表单"}, params={"room": "form"})
        assert response.status_code == 202
        history = (await c.get("/history", params={"room": "form"})).json()["messages"]
        assert history[0]["text"] == "表单"


@pytest.mark.parametrize("username", ["", "   ", "a" * 33, "小X", "xiaox", "a\nb", "\ud800"])
async def test_bad_usernames_are_refused(server, username):
    async with server.client() as c:
        body = json.dumps({"username": username})  # ASCII escapes: "\ud800" survives
        response = await c.post("/login", content=body,
                                headers={"content-type": "application/json"})
        assert_json_error(response, 400)
        assert (await c.get("/me")).status_code == 401


async def test_bad_queries_and_unknown_routes_are_json(server):
    async with server.client() as c:
        await login(c, "prober")
        assert_json_error(await c.get("/history", params={"limit": "many"}), 400)
        assert_json_error(await c.get("/history", params={"room": "x" * 40}), 400)
        assert_json_error(await c.get("/stream", params={"last_event_id": "1-2-3"}), 400)
        assert_json_error(await c.get("/nowhere"), 404)
        assert_json_error(await c.get("/send"), 405)


# --- headers ----------------------------------------------------------------------------

def test_pages_send_a_content_security_policy(server):
    with httpx.Client(base_url=server.url) as c:
        for path in ("/login", "/static/chat.js", "/healthz"):
            response = c.get(path)
            assert response.headers["x-content-type-options"] == "nosniff"
        csp = c.get("/login").headers["content-security-policy"]
        for directive in ("default-src 'self'", "script-src 'self'", "style-src 'self'",
                          "connect-src 'self'"):
            assert directive in csp
        assert "unsafe-inline" not in csp


# --- every guard together: no input gets a 500 ------------------------------------------

TEXT_BODIES = st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass"))
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                           lambda kids: st.lists(kids) | st.dictionaries(st.text(), kids),
                           max_leaves=10)
JSON_BODIES = JSON_VALUES.map(lambda v: json.dumps({"message": v}).encode())


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(st.binary(max_size=300), TEXT_BODIES, JSON_BODIES),
       content_type=st.sampled_from(["application/json", "application/x-www-form-urlencoded",
                                     "multipart/form-data; boundary=x", "text/plain", ""]),
       path=st.sampled_from(["/send", "/login", "/v1/chat/completions"]))
def test_no_input_gets_a_500(server, body, content_type, path):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        c.post("/login", json={"username": "fuzzer"})
        headers = {"content-type": content_type} if content_type else {}
        response = c.post(path, content=body, headers=headers)
        assert response.status_code < 500, (response.status_code, response.text)
        if response.status_code >= 400:
            assert "error" in response.json()


# --- text: names --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["小X\u200b", "小Ｘ", "小\u2060X", "\u202e小X", "ｘｉａｏｘ",
                                  "Xiao X", "小 x", "ADMIN"])
def test_names_that_only_look_reserved_are_reserved(name):
    with pytest.raises(InvalidInput) as refused:
        clean_username(name)
    assert refused.value.reason == "name_reserved"


def test_names_are_stored_nfkc_without_format_characters():
    assert clean_username("ａｌｉ\u200bｃｅ") == "alice"
    assert clean_username("  小\u2060明 ") == "小明"
    assert normalize_name("①\u00ad") == "1"
    with pytest.raises(InvalidInput, match="longer"):  # NFKC lengthens: checked after it
        clean_username("\ufdfa" * 2, max_chars=32)
    with pytest.raises(InvalidInput, match="empty"):
        clean_username("\u200b\u2060")


# --- hosts ----------------------------------------------------------------------------------

def test_the_default_hosts_are_the_loopback_names_only_on_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.1")
    assert not is_loopback("chat.example.com")
    assert effective_allowed_hosts((), "127.0.0.1") == ("127.0.0.1", "localhost", "[::1]")
    assert effective_allowed_hosts((), "0.0.0.0") == ()
    assert effective_allowed_hosts(("Chat.Example.com", "::1"), "0.0.0.0") == (
        "chat.example.com", "[::1]")


def test_off_loopback_hosts_and_an_api_key_are_required():
    ok = dict(allowed_hosts=("a.example",), api_key="k", public_api=False)
    assert startup_problems(bind="127.0.0.1", allowed_hosts=(), api_key=None,
                            public_api=False) == []
    assert startup_problems(bind="0.0.0.0", **ok) == []
    assert len(startup_problems(bind="0.0.0.0", allowed_hosts=(), api_key=None,
                                public_api=False)) == 2
    assert startup_problems(bind="0.0.0.0", **{**ok, "api_key": None, "public_api": True}) == []
    with pytest.raises(ValueError, match="XIAOX_ALLOWED_HOSTS"):
        create_app(Settings(host="0.0.0.0", secret_key="k" * 40))


def _scope(headers: dict[str, str]) -> dict:
    return {"type": "http", "method": "POST", "path": "/login",
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}


@pytest.mark.parametrize(("headers", "same"), [
    ({"Host": "127.0.0.1:8000", "Origin": "http://127.0.0.1:8000"}, True),
    ({"Host": "localhost", "Origin": "https://localhost"}, True),  # nginx's $host: no port
    ({"Host": "[::1]:8000", "Origin": "http://[::1]:8000"}, True),
    ({"Host": "evil.example", "Origin": "http://evil.example"}, False),  # DNS rebinding
    ({"Host": "127.0.0.1:8000", "X-Forwarded-Host": "evil.example",
      "Origin": "http://evil.example"}, False),
    ({"Host": "127.0.0.1:8000", "Origin": "http://127.0.0.1:9999"}, False),
    ({"Host": "127.0.0.1:8000", "Origin": "http://localhost:8000"}, False),
    ({"Host": "127.0.0.1:8000", "Origin": "http://127.0.0.1:8000/path"}, False),
    ({"Host": "127.0.0.1:8000", "Origin": "http://127.0.0.1:99999"}, False),
    ({"Host": "x", "Origin": "https://chat.example.org"}, True),  # allowed_origins
])
def test_the_origin_check_compares_with_the_allowed_hosts(headers, same):
    check = OriginCheckMiddleware(None, allowed_origins=("https://chat.example.org",),
                                  allowed_hosts=LOOPBACK)
    assert check.same_site(_scope(headers)) is same


LOOPBACK = ("127.0.0.1", "localhost", "[::1]")


# --- session keys --------------------------------------------------------------------------

def test_the_newest_key_signs_and_every_key_verifies(tmp_path):
    assert signing_keys(("new", "old"), "single", tmp_path / "k") == ["new", "old"]
    assert signing_keys((), "single", tmp_path / "k") == ["single"]
    from_file = signing_keys((), None, tmp_path / "k")
    assert from_file == [load_or_create_secret_key(tmp_path / "k")]
    with pytest.raises(ValueError, match="at least 32"):
        settings_from_env({"XIAOX_SECRET_KEY": "short"})
    with pytest.raises(ValueError, match="at least 32"):
        settings_from_env({"XIAOX_SECRET_KEYS": "n" * 40 + ",old"})
    assert settings_from_env({"XIAOX_SECRET_KEYS": "n" * 40 + "," + "o" * 40}
                             ).secret_keys == ("n" * 40, "o" * 40)


# --- revocation ------------------------------------------------------------------------------

async def test_in_process_revocations_are_bounded_and_expire():
    revocations = Revocations(max_local=3)
    for sid in ("a", "b", "c", "d"):
        await revocations.revoke(sid)
    assert [await revocations.is_revoked(s) for s in "abcd"] == [False, True, True, True]
    short = Revocations(ttl=0.05)
    await short.revoke("x")
    assert await short.is_revoked("x")
    await asyncio.sleep(0.1)
    assert not await short.is_revoked("x")


async def test_a_watched_session_is_told_at_once():
    revocations = Revocations()
    with revocations.watch("s") as revoked, revocations.watch("other") as untouched:
        assert not revoked.is_set()
        await revocations.revoke("s")
        assert revoked.is_set() and not untouched.is_set()
    assert revocations._watchers == {}  # nothing kept for streams that ended
    await revocations.close()


@pytest.mark.redis
async def test_revocations_are_shared_through_redis_one_key_each_with_a_ttl(redis_server):
    import redis as redis_py

    from serve.web.broker import RedisBroker

    brokers = [RedisBroker(redis_server.url) for _ in range(2)]
    for broker in brokers:
        await broker.start()
    here, there = (Revocations(lambda b=b: b, poll_seconds=0.1) for b in brokers)
    try:
        with there.watch("sid-1") as revoked_there:
            await here.revoke("sid-1")
            await asyncio.wait_for(revoked_there.wait(), 2)  # polled from Redis
        assert await there.is_revoked("sid-1") and not await there.is_revoked("sid-2")
        keys = redis_py.Redis.from_url(redis_server.url).keys("xiaox:revoked:*")
        assert len(keys) == 1
        ttl = redis_py.Redis.from_url(redis_server.url).ttl(keys[0])
        assert SESSION_MAX_AGE - 60 < ttl <= SESSION_MAX_AGE
        redis_server.stop()  # an outage: no one is logged out by it, and nothing raises
        assert not await there.is_revoked("sid-3")
        await here.revoke("sid-4")
        assert await here.is_revoked("sid-4")
    finally:
        for r in (here, there):
            await r.close()
        for broker in brokers:
            await broker.close()


async def test_the_login_limiter_counts_in_process_without_redis():
    limiter = SharedRateLimiter("login", 2, 60.0, lambda: None)
    assert [(await limiter.allow("203.0.113.1"))[0] for _ in range(3)] == [True, True, False]
    assert (await limiter.allow("203.0.113.2"))[0]
