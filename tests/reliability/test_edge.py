"""The public edge, probed on real ``python -m serve`` processes (issue 16, items 2, 6, 7,
8, 10, 11): the login budget per client address and who may choose that address, names
that only look like 小X's, the Host and Origin a rebinding page sends, /metrics and the
health answers, logout on every process and the streams it ends, key rotation, and what
binding off loopback requires.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from base64 import b64encode

import httpx
import itsdangerous
import pytest

from tests.conftest import ROOT, free_port
from tests.serve._helpers_server import ChatStream, ServerProcess, login, running

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]

LOGINS = 8  # the per-address login budget of these servers (per 10 minutes)
LIMITED = {"XIAOX_LOGIN_RATE_LIMIT": str(LOGINS), "XIAOX_LOGIN_RATE_WINDOW": "600"}


async def logins(c: httpx.AsyncClient, n: int, headers: dict | None = None) -> list[int]:
    return [(await c.post("/login", json={"username": f"u{i}"}, headers=headers)).status_code
            for i in range(n)]


# --- item 2: the login limit, client addresses, reserved names ---------------------------

async def test_login_is_limited_per_address_and_a_spoofed_forwarded_for_is_not_believed(
        model_dir, tmp_path):
    with running(ServerProcess(model_dir, tmp_path, env=LIMITED)) as (server,):
        async with server.client() as c:
            assert await logins(c, LOGINS) == [200] * LOGINS
            refused = await c.post("/login", json={"username": "one more"})
            assert refused.status_code == 429 and refused.json()["reason"] == "rate_limited"
            assert 1 <= int(refused.headers["retry-after"]) <= 600
            # No trusted proxy: X-Forwarded-For is the client's own word, not a new budget.
            spoofed = await logins(c, 3, {"X-Forwarded-For": "203.0.113.9"})
            assert spoofed == [429] * 3
            form = await c.post("/login", data={"username": "x"},
                                headers={"Accept": "text/html"})
            assert form.status_code == 303
            assert form.headers["location"] == "/login?error=rate_limited"


async def test_behind_the_trusted_proxy_the_forwarded_address_is_the_key(model_dir, tmp_path):
    env = {**LIMITED, "XIAOX_TRUSTED_PROXIES": "127.0.0.1",
           "XIAOX_METRICS_ALLOW": "198.51.100.0/24"}
    with running(ServerProcess(model_dir, tmp_path, env=env)) as (server,):
        async with server.client() as c:
            first = {"X-Forwarded-For": "203.0.113.1"}
            assert await logins(c, LOGINS, first) == [200] * LOGINS
            assert (await c.post("/login", json={"username": "u"}, headers=first)
                    ).status_code == 429
            second = {"X-Forwarded-For": "203.0.113.2"}  # another client behind the proxy
            assert await logins(c, 2, second) == [200, 200]
            # /metrics follows the real client too: the proxy's own address is not enough.
            assert (await c.get("/metrics")).status_code == 404
            assert (await c.get("/metrics", headers={"X-Forwarded-For": "198.51.100.7"})
                    ).status_code == 200
            # The scheme the proxy reports sets the cookie's Secure flag.
            https = await c.post("/login", json={"username": "tls"},
                                 headers={"X-Forwarded-For": "203.0.113.3",
                                          "X-Forwarded-Proto": "https"})
            assert https.status_code == 200 and "secure" in _cookie_flags(https)
            plain = await c.post("/login", json={"username": "plain"},
                                 headers={"X-Forwarded-For": "203.0.113.4"})
            assert plain.status_code == 200 and "secure" not in _cookie_flags(plain)


def _cookie_flags(response: httpx.Response) -> set[str]:
    cookie = response.headers["set-cookie"]
    return {part.strip().lower() for part in cookie.split(";")[1:]}


async def test_the_login_budget_is_shared_through_redis(model_dir, redis_server, tmp_path):
    with running(*(ServerProcess(model_dir, tmp_path, redis_url=redis_server.url, env=LIMITED)
                   for _ in range(2))) as (a, b):
        async with a.client() as on_a, b.client() as on_b:
            half = LOGINS // 2
            assert await logins(on_a, half) + await logins(on_b, LOGINS - half) == [200] * LOGINS
            for c in (on_a, on_b):  # one address, one budget, whichever process answers
                assert (await c.post("/login", json={"username": "u"})).status_code == 429


NAMES_OF_THE_BOT = ["小X\u200b", "小Ｘ", "小\u2060X", "\u200e小X", "ｘｉａｏ ｘ", "XIAOX"]


async def test_names_that_only_look_like_the_bots_are_refused_and_names_are_normalised(
        model_dir, tmp_path):
    with running(ServerProcess(model_dir, tmp_path)) as (server,):
        async with server.client() as c:
            for name in NAMES_OF_THE_BOT:
                r = await c.post("/login", json={"username": name})
                assert r.status_code == 400 and r.json()["reason"] == "name_reserved", name
            form = await c.post("/login", data={"username": "小Ｘ"},
                                headers={"Accept": "text/html"})
            # item 10: a code the page knows, never the message text, in the URL
            assert form.headers["location"] == "/login?error=name_reserved"
            r = await c.post("/login", json={"username": "ａｌｉ\u200bｃｅ"})
            assert r.status_code == 200 and r.json() == {"user": "alice"}
            assert (await c.get("/me")).json() == {"user": "alice"}


# --- item 6: metrics labels, /metrics, health answers ---------------------------------

async def test_metrics_labels_come_from_known_sets_and_health_names_no_address(
        model_dir, redis_server, tmp_path):
    with running(ServerProcess(model_dir, tmp_path, redis_url=redis_server.url)) as (server,):
        async with server.client() as c:
            for method in ("FOOBAR", "X-ANY-TOKEN", "PROPFIND"):
                r = await c.request(method, f"/nowhere/{method}")
                assert 400 <= r.status_code < 500, (method, r.status_code)
            text = (await c.get("/metrics")).text  # from loopback: allowed by default
            assert 'method="OTHER"' in text
            for raw in ("FOOBAR", "X-ANY-TOKEN", "PROPFIND", "/nowhere"):
                assert raw not in text
            redis_server.kill()  # the health answers during an outage: no address in them
            deadline = time.monotonic() + 20
            while (health := await c.get("/healthz")).status_code != 503:
                assert time.monotonic() < deadline, health.text
                await asyncio.sleep(0.2)
            for path in ("/healthz", "/readyz"):
                body = (await c.get(path)).text
                assert str(redis_server.port) not in body and "127.0.0.1" not in body, body
                assert "redis" in body or "broker" in body


# --- item 7: Host, Origin, X-Forwarded-Host --------------------------------------------

async def test_an_unknown_host_is_refused_and_a_rebinding_login_fails(model_dir, tmp_path):
    with running(ServerProcess(model_dir, tmp_path)) as (server,):
        async with server.client() as c:
            for host in ("evil.example", "", "127.0.0.1.evil.example", "evil.example:80",
                         "[::1", "127.0.0.1@evil.example"):
                evil = await c.get("/healthz", headers={"Host": host})
                assert evil.status_code == 400 and evil.json()["reason"] == "bad_host", host
            rebinding = await c.post("/login", json={"username": "victim"},
                                     headers={"Host": "evil.example",
                                              "Origin": "http://evil.example"})
            assert rebinding.status_code in (400, 403) and "set-cookie" not in rebinding.headers
            forwarded = await c.post("/login", json={"username": "victim"},
                                     headers={"X-Forwarded-Host": "evil.example",
                                              "Origin": "http://evil.example"})
            assert forwarded.status_code == 403 and forwarded.json()["reason"] == "bad_origin"
            own = await c.post("/login", json={"username": "me"},
                               headers={"Origin": server.url})
            assert own.status_code == 200
            for host in (f"localhost:{server.port}", f"[::1]:{server.port}"):
                assert (await c.get("/livez", headers={"Host": host})).status_code == 200


def run_serve(args: list[str], env: dict[str, str], tmp_path) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("XIAOX_")}
    environ.update({"XIAOX_SECRET_KEY_FILE": str(tmp_path / "secret_key"), **env})
    return subprocess.run([sys.executable, "-m", "serve", *args], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=60)


# --- item 11 (and 7's required setting): binding off loopback ----------------------------

def test_off_loopback_the_server_needs_allowed_hosts_and_an_api_key(model_dir, tmp_path):
    args = ["--model", str(model_dir), "--host", "0.0.0.0", "--port", str(free_port())]
    bare = run_serve(args, {}, tmp_path)
    assert bare.returncode == 2
    assert "XIAOX_ALLOWED_HOSTS" in bare.stderr and "XIAOX_API_KEY" in bare.stderr
    no_key = run_serve(args, {"XIAOX_ALLOWED_HOSTS": "chat.example.com"}, tmp_path)
    assert no_key.returncode == 2 and "XIAOX_PUBLIC_API=1" in no_key.stderr
    assert "XIAOX_ALLOWED_HOSTS" not in no_key.stderr
    short = run_serve(["--model", str(model_dir), "--port", str(free_port())],
                      {"XIAOX_SECRET_KEY": "too short"}, tmp_path)
    assert short.returncode == 2 and "at least 32" in short.stderr


async def test_a_public_api_off_loopback_starts_when_said_so(model_dir, tmp_path):
    env = {"XIAOX_HOST": "0.0.0.0", "XIAOX_ALLOWED_HOSTS": "127.0.0.1",
           "XIAOX_PUBLIC_API": "1"}
    with running(ServerProcess(model_dir, tmp_path, env=env)) as (server,):
        async with server.client() as c:
            assert (await c.get("/readyz")).status_code == 200


# --- item 8: logout revokes, on every process; key rotation ---------------------------

async def test_logout_revokes_the_session_on_every_process_and_ends_its_streams(
        model_dir, redis_server, tmp_path):
    with running(*(ServerProcess(model_dir, tmp_path, redis_url=redis_server.url)
                   for _ in range(2))) as (a, b):
        async with a.client() as on_a:
            await login(on_a, "leaver")
            async with b.client(cookies=on_a.cookies) as copy_on_b, \
                    a.client(cookies=on_a.cookies) as copy_on_a:
                assert (await copy_on_b.get("/me")).status_code == 200
                async with ChatStream(copy_on_b) as far, ChatStream(copy_on_a) as near:
                    assert far.status == near.status == 200
                    await asyncio.sleep(0.5)
                    assert (await on_a.post("/logout")).status_code == 200
                    t0 = time.monotonic()
                    for stream in (near, far):  # the logout's process, and the other one
                        await asyncio.wait_for(asyncio.shield(stream._task), 10)
                    ended_after = time.monotonic() - t0
                assert ended_after < 5
                for copy in (copy_on_a, copy_on_b):  # the stolen cookie: logged out too
                    assert (await copy.get("/me")).status_code == 401


def sign(key: str, session: dict) -> str:
    """A session cookie as Starlette's SessionMiddleware writes it, signed with ``key``."""
    data = b64encode(json.dumps(session).encode())
    return itsdangerous.TimestampSigner(key).sign(data).decode()


async def test_a_rotated_key_still_verifies_old_cookies_and_signs_with_the_new(
        model_dir, tmp_path):
    old, new = "o" * 40, "n" * 40
    env = {"XIAOX_SECRET_KEYS": f"{new},{old}"}
    with running(ServerProcess(model_dir, tmp_path, env=env)) as (server,):
        session = {"user": "veteran", "sid": "s" * 24}
        async with server.client(cookies={"xiaox_session": sign(old, session)}) as c:
            assert (await c.get("/me")).json() == {"user": "veteran"}
        async with server.client(cookies={"xiaox_session": sign("x" * 40, session)}) as c:
            assert (await c.get("/me")).status_code == 401
        async with server.client() as c:
            await login(c, "newcomer")
            cookie = c.cookies["xiaox_session"].encode()
            itsdangerous.TimestampSigner(new).unsign(cookie)  # raises if not the new key
            with pytest.raises(itsdangerous.BadSignature):
                itsdangerous.TimestampSigner(old).unsign(cookie)


def test_processes_starting_together_read_one_whole_key_file(tmp_path):
    """Rounds of eight processes racing to create one key file, while this one reads it as
    fast as it can: the file is never seen empty or short, no process fails (before: one
    that read the file between its creation and its write died, "too short"), and all
    the processes of a round get the same key."""
    code = ("import sys; from serve.web.security.secret_key import load_or_create_secret_key"
            " as f; print(f(sys.argv[1]))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for round_ in range(8):
        path = tmp_path / f"state-{round_}" / "secret_key"
        procs = [subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(8)]
        seen: set[int] = set()
        while any(p.poll() is None for p in procs):
            try:
                seen.add(len(path.read_text()))
            except FileNotFoundError:
                pass
        outputs = [p.communicate() for p in procs]
        assert all(p.returncode == 0 for p in procs), [err for _, err in outputs if err]
        keys = {out.strip() for out, _ in outputs}
        assert len(keys) == 1 and len(keys.pop()) >= 32
        assert seen <= {len(path.read_text())}, seen
