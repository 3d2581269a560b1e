"""The server with its engine in a process of its own (``XIAOX_ENGINE_PROCESS=1``): the
same answers and metrics as with the engine in the server's process, a 503 when the
engine's process dies until another one serves, and no engine process left behind when
the server stops."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.serve._helpers_server import (
    ChatStream,
    ServerProcess,
    bot_reply_to,
    login,
    metric_value,
    running,
    send,
    wait_health,
)

pytestmark = pytest.mark.timeout(180)

KEY = "test-api-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY = {"messages": [{"role": "user", "content": "今天天气怎么样"}], "temperature": 0,
        "reply_mode": "generate", "max_tokens": 12}


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _answers(server: ServerProcess) -> tuple[str, str, str]:
    """A greedy reply, the same streamed, and /metrics afterwards."""
    with httpx.Client(base_url=server.url, timeout=60) as c:
        whole = c.post("/v1/chat/completions", json=BODY, headers=AUTH)
        streamed = c.post("/v1/chat/completions", json={**BODY, "stream": True},
                          headers=AUTH)
        time.sleep(0.3)  # the engine's counters trail it by a batch of events
        metrics = c.get("/metrics")
    assert whole.status_code == streamed.status_code == metrics.status_code == 200
    return whole.json()["choices"][0]["message"]["content"], streamed.text, metrics.text


def test_the_engine_process_answers_as_the_engine_here(model_dir, tmp_path):
    env = {"XIAOX_API_KEY": KEY}
    here = ServerProcess(model_dir, tmp_path / "here", env={**env, "XIAOX_ENGINE_PROCESS": "0"})
    there = ServerProcess(model_dir, tmp_path / "there",
                          env={**env, "XIAOX_ENGINE_PROCESS": "1"})
    with running(here, there):
        assert len(_children(there.proc.pid)) == 1 and not _children(here.proc.pid)
        text_here, _, _ = _answers(here)
        text, stream, metrics = _answers(there)
    assert text == text_here and text
    assert stream.rstrip().endswith("data: [DONE]")
    chunks = [json.loads(line[len("data: "):]) for line in stream.splitlines()
              if line.startswith("data: {")]
    assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks
                   if ch["choices"]) == text
    assert metric_value(metrics, "xiaox_engine_steps_total") > 0  # relayed counters
    assert metric_value(metrics, "xiaox_time_to_first_token_seconds_count") >= 2  # latencies


def test_a_dead_engine_process_is_a_503_until_another_serves_and_a_stop_leaves_none(
        model_dir, tmp_path):
    server = ServerProcess(model_dir, tmp_path, env={"XIAOX_API_KEY": KEY,
                                                     "XIAOX_ENGINE_PROCESS": "1"})
    with running(server):
        (engine,) = _children(server.proc.pid)
        os.kill(engine, signal.SIGKILL)
        # another process is started after half a second, then loads the model
        health = asyncio.run(wait_health(server, 503, 20))
        assert "model: stopped" in health["problems"]
        asyncio.run(wait_health(server, 200, 60))
        with httpx.Client(base_url=server.url, timeout=30) as c:
            answered = c.post("/v1/chat/completions", json=BODY, headers=AUTH)
            assert answered.status_code == 200, answered.text
            time.sleep(0.3)  # the engine's counters trail it by a batch of events
            metrics = c.get("/metrics").text
        (restarted,) = _children(server.proc.pid)
        assert restarted != engine
        assert metric_value(metrics, "xiaox_engine_restarts_total") == 1
        assert "the engine's process ended (exit code -9)" in server.log_tail()

    server = ServerProcess(model_dir, tmp_path / "again",
                           env={"XIAOX_ENGINE_PROCESS": "1"})
    with running(server):
        (engine,) = _children(server.proc.pid)
    deadline = time.monotonic() + 20
    while Path(f"/proc/{engine}").exists() and "Z" not in _state(engine):
        assert time.monotonic() < deadline, "the engine process outlived its server"
        time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


@pytest.mark.redis
async def test_sigterm_drains_a_chat_reply_made_in_the_engine_process(model_dir, redis_server,
                                                                    tmp_path):
    a = ServerProcess(model_dir, tmp_path, redis_url=redis_server.url,
                      env={"XIAOX_ENGINE_PROCESS": "1"})
    b = ServerProcess(model_dir, tmp_path, redis_url=redis_server.url)
    with running(a, b):
        (engine,) = _children(a.proc.pid)
        async with a.client() as on_a, b.client() as on_b:
            await login(on_a, "last words")
            await login(on_b, "witness")
            async with ChatStream(on_b) as stream:
                sent = await send(on_a, "再见")
                # The server and its engine process get it, as from a service manager;
                # the engine keeps serving until its server has drained.
                os.kill(engine, signal.SIGTERM)
                code = await asyncio.to_thread(a.terminate, 30)
                assert code in (0, -15), a.log_tail()
                assert "Traceback" not in a.log_tail() and "ERROR" not in a.log_tail()
                events = await stream.wait_for(bot_reply_to(sent["id"]))
    (reply,) = [e["data"] for e in events if e["event"] == "message"
                and e["data"].get("reply_to") == sent["id"]]
    assert "error" not in reply and reply["text"]  # made by A's engine while A drained
    assert not Path(f"/proc/{engine}").exists() or _state(engine) == "Z"
