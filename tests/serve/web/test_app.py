"""The chat app end to end: one ``python -m serve`` process (in-process broker), real model."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from serve.web.broker import parse_id
from serve.web.settings import parse_settings, settings_from_env
from tests.conftest import ROOT
from tests.serve._helpers_server import (
    ChatStream,
    ServerProcess,
    bot_reply_to,
    login,
    metric_value,
    running,
    send,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    process = ServerProcess(model_dir, tmp_path_factory.mktemp("app"),
                            env={"XIAOX_PING_SECONDS": "0.3"}).start()
    yield process
    process.stop()


async def test_login_me_logout_and_the_pages(server):
    async with server.client() as c:
        page = await c.get("/")
        assert page.status_code == 303 and page.headers["location"] == "/login"
        assert (await c.get("/me")).status_code == 401
        login_page = await c.get("/login")
        assert login_page.status_code == 200 and "username" in login_page.text
        assert "script-src 'self'" in login_page.headers["content-security-policy"]
        await login(c, "阿明")
        assert (await c.get("/me")).json() == {"user": "阿明"}
        chat_page = await c.get("/", params={"room": "lobby"})
        assert chat_page.status_code == 200 and "text/html" in chat_page.headers["content-type"]
        assert chat_page.headers["x-content-type-options"] == "nosniff"
        assert (await c.get("/static/chat.js")).status_code == 200
        assert (await c.post("/logout")).status_code == 200
        assert (await c.get("/me")).status_code == 401


async def test_a_browser_form_login_redirects(server):
    async with server.client() as c:
        html = {"Accept": "text/html"}
        ok = await c.post("/login", data={"username": "form user"}, headers=html)
        assert ok.status_code == 303 and ok.headers["location"] == "/"
        assert (await c.get("/me")).json() == {"user": "form user"}
        bad = await c.post("/login", data={"username": "   "}, headers=html)
        # a code the login page knows, never the message text (the page shows its own)
        assert bad.status_code == 303 and bad.headers["location"] == "/login?error=invalid_input"
        taken = await c.post("/login", data={"username": "小X"}, headers=html)
        assert taken.headers["location"] == "/login?error=name_reserved"


async def test_send_streams_the_message_then_the_bots_reply_token_by_token(server):
    async with server.client() as watcher, server.client() as sender:
        await login(watcher, "watcher")
        await login(sender, "sender")
        async with ChatStream(watcher, room="r-send") as stream:
            assert stream.status == 200
            assert stream.response_headers["content-type"].startswith("text/event-stream")
            sent = await send(sender, "你好", room="r-send")
            await stream.wait_for(bot_reply_to(sent["id"]))
        events = stream.events
        ids = [e["id"] for e in events]
        assert all(e["id"] == e["data"]["id"] for e in events)
        assert ids == sorted(ids, key=parse_id)
        assert len(set(ids)) == len(ids)
        user_message = next(e for e in events if e["id"] == sent["id"])
        assert user_message["event"] == "message"
        assert user_message["data"] | {"ts": 0, "tag": ""} == {
            "id": sent["id"], "room": "r-send", "ts": 0, "role": "user", "user": "sender",
            "tag": "", "text": "你好"}
        assert re.fullmatch("[0-9a-f]{6}", user_message["data"]["tag"])  # the session's
        reply = [e for e in events if e["data"].get("reply_id") == sent["reply_id"]]
        kinds = [e["event"] for e in reply]
        assert kinds[0] == "typing" and kinds[-1] == "message"
        assert set(kinds[1:-1]) <= {"token"}
        final = reply[-1]["data"]
        assert final["role"] == "bot" and final["user"] == "小X"
        assert final["text"] == "".join(e["data"]["delta"] for e in reply if e["event"] == "token")
        assert ids.index(sent["id"]) < ids.index(reply[0]["id"])


async def test_a_retrieved_reply_reaches_the_room_in_several_token_events(model_dir, tmp_path):
    # A copy of the model folder whose selection always takes the best retrieved reply (the
    # manifest is not among the files it hashes).
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    manifest["selection"] = {"forward": 0.0, "backward": 0.0, "retrieval": 1.0}
    (folder / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False))
    with running(ServerProcess(folder, tmp_path / "work")) as (server,):
        async with server.client() as c:
            await login(c, "冷冷")
            async with ChatStream(c, room="r-retrieved") as stream:
                sent = await send(c, "今天好冷", room="r-retrieved")
                await stream.wait_for(bot_reply_to(sent["id"]))
    reply = [e for e in stream.events if e["data"].get("reply_id") == sent["reply_id"]]
    tokens = [e["data"]["delta"] for e in reply if e["event"] == "token"]
    final = reply[-1]["data"]["text"]
    assert len(tokens) > 1 and "".join(tokens) == final
    from serve.runtime.model import OnnxSeq2Seq
    from serve.runtime.retrieval import ReplyIndex

    index = ReplyIndex.load(folder, OnnxSeq2Seq.load(folder).tokenizer)
    assert final in {hit.reply for hit in index.search("今天好冷", 8)}


async def test_join_and_leave_notices(server):
    async with server.client() as a, server.client() as b:
        await login(a, "alice")
        await login(b, "bob")
        async with ChatStream(a, room="r-join") as stream_a:
            await stream_a.wait_for(lambda ev: any(e["event"] == "join" for e in ev))
            async with ChatStream(b, room="r-join"):
                await stream_a.wait_for(lambda ev: any(
                    e["event"] == "join" and e["data"]["user"] == "bob" for e in ev))
            await stream_a.wait_for(lambda ev: any(
                e["event"] == "leave" and e["data"]["user"] == "bob" for e in ev))


async def test_history_returns_the_last_messages_and_a_cursor(server):
    async with server.client() as c:
        await login(c, "historian")
        async with ChatStream(c, room="r-history") as stream:
            sent = [await send(c, f"第{i}条", room="r-history") for i in range(3)]
            for s in sent:
                await stream.wait_for(bot_reply_to(s["id"]))
        body = (await c.get("/history", params={"room": "r-history", "limit": 4})).json()
        assert body["room"] == "r-history"
        messages = body["messages"]
        assert len(messages) == 4
        assert all(m["room"] == "r-history" and "text" in m for m in messages)
        everything = (await c.get("/history", params={"room": "r-history"})).json()["messages"]
        assert [m["text"] for m in everything if m["role"] == "user"] == ["第0条", "第1条", "第2条"]
        assert len(everything) == 6  # three messages and three replies, no typing/token
        assert messages == everything[-4:]
        # The cursor is the log's last id: replaying after it gives nothing old.
        assert parse_id(body["cursor"]) >= max(parse_id(e["id"]) for e in stream.events[:-1])
        empty = (await c.get("/history", params={"room": "empty-room"})).json()
        assert empty | {"you": None} == {
            "room": "empty-room", "messages": [], "cursor": "0-0", "you": None}
        assert empty["you"]["user"] == "historian"
        assert (await c.get("/history", params={"limit": "-1"})).status_code == 400


async def test_replay_after_a_reconnect_is_complete_in_order_and_without_duplicates(server):
    async with server.client() as c, server.client() as other:
        await login(c, "reconnecter")
        await login(other, "talker")
        async with ChatStream(other, room="r-replay") as witness:
            async with ChatStream(c, room="r-replay") as first:
                one = await send(other, "第一", room="r-replay")
                await first.wait_for(bot_reply_to(one["id"]))
            last_seen = first.events[-1]["id"]
            # Gone: meanwhile two more exchanges happen.
            two = await send(other, "第二", room="r-replay")
            three = await send(other, "第三", room="r-replay")
            await witness.wait_for(bot_reply_to(two["id"]))
            await witness.wait_for(bot_reply_to(three["id"]))
            for via_header in (True, False):
                async with ChatStream(c, room="r-replay", last_event_id=last_seen,
                                      via_header=via_header) as second:
                    await second.wait_for(bot_reply_to(three["id"]))
                    await asyncio.sleep(0.3)
                end = next(e["id"] for e in witness.events
                           if e["data"].get("reply_to") == three["id"])
                window = (parse_id(last_seen), parse_id(end))
                missed = [e["id"] for e in witness.events
                          if window[0] < parse_id(e["id"]) <= window[1]]
                replayed = [e["id"] for e in second.events if parse_id(e["id"]) <= window[1]]
                assert replayed == missed  # complete, in order, nothing twice
                assert [e["id"] for e in second.events[:len(replayed)]] == replayed
                assert "第二" in [e["data"].get("text") for e in second.events]


async def test_a_client_leaving_mid_reply_stops_nothing_and_leaks_nothing(server):
    async with server.client() as metrics_client:
        before = metric_value((await metrics_client.get("/metrics")).text, "xiaox_sse_clients")
    async with server.client() as watcher:
        await login(watcher, "stayer")
        async with ChatStream(watcher, room="r-leave") as stream:
            sender = server.client()
            await login(sender, "leaver")
            leaver_stream = await ChatStream(sender, room="r-leave").__aenter__()
            sent = await send(sender, "说完就走", room="r-leave")
            await leaver_stream.close()
            await sender.aclose()  # the sender's connection is gone before the reply ends
            await stream.wait_for(bot_reply_to(sent["id"]))
    async with server.client() as metrics_client:
        for _ in range(150):  # the server notices the disconnects
            page = (await metrics_client.get("/metrics")).text
            if metric_value(page, "xiaox_sse_clients") == before:
                break
            await asyncio.sleep(0.1)
        assert metric_value(page, "xiaox_sse_clients") == before
        assert metric_value(page, "xiaox_active_replies") == 0


async def test_a_quiet_stream_gets_keepalive_pings(server):
    async with server.client() as c:
        await login(c, "quiet one")
        async with ChatStream(c, room="r-quiet") as stream:
            await asyncio.sleep(1.0)
            assert stream.parser.comment_count >= 2  # ": ping" comment lines
            assert [e["event"] for e in stream.events] == ["join"]


async def test_rooms_are_separate(server):
    async with server.client() as c:
        await login(c, "roomy")
        async with ChatStream(c, room="r-a") as a, ChatStream(c, room="r-b") as b:
            sent = await send(c, "只在A", room="r-a")
            await a.wait_for(bot_reply_to(sent["id"]))
            await asyncio.sleep(0.3)
            assert all(e["data"]["room"] == "r-b" for e in b.events)
            assert all(e["event"] in ("join", "leave") for e in b.events)


async def test_messages_are_data_not_html(server):
    async with server.client() as c:
        await login(c, "<b>mallory</b>")
        text = "<img src=x onerror=alert(1)>"
        sent = await send(c, text, room="r-xss")
        body = (await c.get("/history", params={"room": "r-xss"})).json()
        mine = next(m for m in body["messages"] if m["id"] == sent["id"])
        assert mine["text"] == text and mine["user"] == "<b>mallory</b>"
        response = await c.get("/history", params={"room": "r-xss"})
        assert response.headers["content-type"] == "application/json"


async def test_stream_and_history_need_a_login_and_a_valid_room(server):
    async with server.client() as c:
        assert (await c.get("/stream")).status_code == 401
        assert (await c.get("/history")).status_code == 401
        assert (await c.post("/send", json={"message": "hi"})).status_code == 401
        await login(c, "checker")
        bad_room = await c.get("/history", params={"room": "a/b"})
        assert bad_room.status_code == 400 and "room" in bad_room.json()["error"]
        bad_id = await c.get("/stream", headers={"Last-Event-ID": "yesterday"})
        assert bad_id.status_code == 400


async def test_healthz_and_metrics(server):
    async with server.client() as c:
        health = await c.get("/healthz")
        assert health.status_code == 200
        assert health.json()["status"] == "ok" and health.json()["broker"] == "in-process"
        await login(c, "measured")
        await send(c, "量一量", room="r-metrics")
        page = ""
        for _ in range(50):
            page = (await c.get("/metrics")).text
            if metric_value(page, "xiaox_end_to_end_latency_seconds_count") > 0:
                break
            await asyncio.sleep(0.1)
        for name in ("xiaox_http_requests_total", "xiaox_errors_total",
                     "xiaox_engine_queue_size", "xiaox_engine_batch_size",
                     "xiaox_time_to_first_token_seconds_count",
                     "xiaox_inter_token_latency_seconds_count",
                     "xiaox_end_to_end_latency_seconds_count", "xiaox_sse_clients"):
            assert name in page, name
        assert metric_value(page, "xiaox_end_to_end_latency_seconds_count") >= 1
        assert metric_value(page, "xiaox_generated_tokens_total") >= 1


# --- the command line and settings -------------------------------------------------------

def run_serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("XIAOX_")}
    return subprocess.run([sys.executable, "-m", "serve", *args], cwd=ROOT, timeout=60,
                          env={**clean, **(env or {})}, capture_output=True, text=True)


def test_bad_options_are_clear_errors(model_dir, tmp_path):
    missing = run_serve("--model", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no such model folder" in missing.stderr
    assert "Traceback" not in missing.stderr
    corrupt = tmp_path / "corrupt"
    shutil.copytree(model_dir, corrupt)
    with open(corrupt / "decoder.onnx", "ab") as f:
        f.write(b"\0")
    broken = run_serve("--model", str(corrupt))
    assert broken.returncode == 2 and "sha256" in broken.stderr
    assert "Traceback" not in broken.stderr
    bad_env = run_serve(env={"XIAOX_PORT": "eighty"})
    assert bad_env.returncode == 2 and "XIAOX_PORT" in bad_env.stderr
    assert run_serve("--port", "x").returncode == 2
    helped = run_serve("run", "--help")  # the server's flags (``--help`` lists the commands)
    assert helped.returncode == 0 and "--redis-url" in helped.stdout


def test_settings_come_from_flags_then_env_then_defaults(tmp_path):
    env = {"XIAOX_PORT": "9001", "XIAOX_HOST": "0.0.0.0", "XIAOX_REDIS_URL": "redis://r:1/0",
           "XIAOX_COOKIE_SECURE": "true", "XIAOX_ALLOWED_ORIGINS": "https://a, https://b",
           "XIAOX_API_KEY": "k", "XIAOX_MODEL": str(tmp_path)}
    settings = parse_settings(["--port", "9002", "--workers", "2"], env)
    assert settings.port == 9002 and settings.host == "0.0.0.0" and settings.workers == 2
    assert settings.redis_url == "redis://r:1/0" and settings.cookie_secure is True
    assert settings.allowed_origins == ("https://a", "https://b")
    assert settings.api_key == "k" and settings.model_dir == tmp_path
    assert settings_from_env(settings.to_env()) == settings  # what workers read back
    defaults = parse_settings([], {})
    assert (defaults.host, defaults.port, defaults.redis_url) == ("127.0.0.1", 8000, None)
    assert defaults.model_dir == ROOT / "artifacts" / "xiaox"
    with pytest.raises(ValueError, match="redis"):
        parse_settings(["--workers", "3"], {})


def test_serving_never_imports_tensorflow(model_dir):
    code = ("import asyncio, sys\n"
            "from serve.web.app import create_app\n"
            "from serve.web.settings import Settings\n"
            "app = create_app(Settings(model_dir=sys.argv[1], secret_key='k' * 40))\n"
            "async def run():\n"
            "    await app.state.chat.start()\n"
            "    await app.state.chat.engine.generate('你好')\n"
            "    await app.state.chat.stop()\n"
            "asyncio.run(run())\n"
            "print('tensorflow' in sys.modules, 'keras' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code, str(model_dir)], cwd=ROOT, timeout=120,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]
