"""The metrics with ``--workers 2``: every scrape, whichever worker answers it, counts the
requests of both (prometheus_client's multiprocess mode, in a directory of the server's own)."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from serve.web.metrics import FINISH_REASONS
from tests.serve._helpers_server import ServerProcess, login, metric_value, running, send

pytestmark = pytest.mark.timeout(240)

MESSAGES = ["你好", "今天天气怎么样", "你喜欢什么", "我们去吃饭吧", "晚安", "你是谁"]


def samples(page: str, name: str) -> dict[str, float]:
    """Every sample of ``name`` on a Prometheus text page: labels -> value."""
    out = {}
    for line in page.splitlines():
        match = re.fullmatch(re.escape(name) + r"(\{[^}]*\})? (\S+)", line)
        if match:
            out[match.group(1) or ""] = float(match.group(2))
    return out


def successes_per_worker(directory: Path) -> dict[int, float]:
    """Each worker's own ``xiaox_request_success_total``, from its file."""
    out = {}
    for path in directory.glob("counter_*.db"):
        pid = int(path.stem.split("_")[1])
        out[pid] = sum(s.value for metric in MultiProcessCollector.merge([str(path)])
                       if metric.name == "xiaox_request_success" for s in metric.samples
                       if s.name == "xiaox_request_success_total")
    return out


async def complete(client: httpx.AsyncClient, i: int) -> dict:
    """One small API request (streamed for odd ``i``): its usage."""
    body = {"messages": [{"role": "user", "content": MESSAGES[i % len(MESSAGES)]}],
            "max_tokens": 2 + i % 3, "temperature": 0, "reply_mode": "generate"}
    if i % 2:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        response = await client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        return next(chunk["usage"] for chunk in _chunks(response.text) if chunk.get("usage"))
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["usage"]


def _chunks(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines()
            if line.startswith("data: {")]


async def scrape(server: ServerProcess) -> str:
    # A new connection each time: either worker may accept it.
    async with server.client(headers={"Connection": "close"}) as c:
        response = await c.get("/metrics")
        assert response.status_code == 200
        return response.text


async def test_two_workers_count_every_request_on_every_scrape(model_dir, redis_server,
                                                               tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    server = ServerProcess(model_dir, tmp_path, redis_url=redis_server.url,
                           env={"XIAOX_WORKERS": "2", "TMPDIR": str(tmp)})
    with running(server):
        [directory] = tmp.glob("xiaox-metrics-*")  # made by python -m serve
        usages: list[dict] = []
        # Concurrent batches (new connections) until both workers have answered some.
        while len(usages) < 40:
            async with server.client(headers={"Connection": "close"}) as c:
                usages += await asyncio.gather(*(complete(c, len(usages) + k)
                                                 for k in range(4)))
            per_worker = successes_per_worker(directory)
            if len([n for n in per_worker.values() if n > 0]) >= 2:
                break
        assert len([n for n in per_worker.values() if n > 0]) == 2, per_worker
        n = len(usages)
        prompt = sum(u["prompt_tokens"] for u in usages)
        generated = sum(u["completion_tokens"] for u in usages)
        for _ in range(8):
            page = await scrape(server)
            by_reason = samples(page, "xiaox_request_success_total")
            assert set(by_reason) == {f'{{finish_reason="{r}"}}' for r in FINISH_REASONS}
            assert sum(by_reason.values()) == n
            assert by_reason['{finish_reason="cancelled"}'] == 0
            assert by_reason['{finish_reason="error"}'] == 0
            assert metric_value(page, "xiaox_prompt_tokens_total") == prompt
            assert metric_value(page, "xiaox_generation_tokens_total") == generated
            assert 0 < metric_value(page, "xiaox_request_queue_time_seconds_count") <= n
            assert 'pid="' not in page  # every gauge says how workers add up
        await _a_client_leaving_counts_as_cancelled(server, n)
        await _a_chat_reply_counts_too(server, n + 1)
        await _idle_gauges_come_back_to_zero(server, n + 2)
    assert not list(tmp.glob("xiaox-metrics-*"))  # removed at exit


async def _a_client_leaving_counts_as_cancelled(server: ServerProcess, n: int) -> None:
    long = {"messages": [{"role": "user", "content": "你好"}], "stream": True,
            "min_tokens": 250, "max_tokens": 250, "reply_mode": "generate",
            "temperature": 0}
    async with server.client() as c:
        async with c.stream("POST", "/v1/chat/completions", json=long) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data:") and '"content"' in line and '""' not in line:
                    break  # leave after the first piece
    deadline = time.monotonic() + 20
    while True:
        by_reason = samples(await scrape(server), "xiaox_request_success_total")
        if by_reason['{finish_reason="cancelled"}'] == 1:
            break
        assert time.monotonic() < deadline, by_reason
        await asyncio.sleep(0.1)
    assert sum(by_reason.values()) == n + 1


async def _a_chat_reply_counts_too(server: ServerProcess, n: int) -> None:
    async with server.client() as c:
        await login(c, "counted")
        sent = await send(c, "你好", room="r-metrics")
        deadline = time.monotonic() + 60
        while True:
            history = (await c.get("/history", params={"room": "r-metrics"})).json()
            if any(m.get("reply_to") == sent["id"] for m in history["messages"]):
                break
            assert time.monotonic() < deadline, "no reply"
            await asyncio.sleep(0.2)
    for _ in range(4):
        page = await scrape(server)
        assert sum(samples(page, "xiaox_request_success_total").values()) == n + 1


async def _idle_gauges_come_back_to_zero(server: ServerProcess, requests: int) -> None:
    """The gauges, and the engine's counters (copied from engine.stats), once idle."""
    names = ("xiaox_num_requests_running", "xiaox_num_requests_waiting",
             "xiaox_active_replies", "xiaox_engine_batch_size")
    deadline = time.monotonic() + 10  # the other worker copies its values every second
    while True:
        page = await scrape(server)
        values = {name: metric_value(page, name) for name in names}
        # a chat reply's engine requests: its proposals (one, or several samples)
        values["engine requests"] = metric_value(page, "xiaox_engine_requests_total")
        if (all(values[name] == 0 for name in names) and all(name in page for name in names)
                and values["engine requests"] >= requests):
            break
        assert time.monotonic() < deadline, values
        await asyncio.sleep(0.3)
    assert metric_value(page, "xiaox_broker_healthy") == 1


async def test_request_labels_come_from_known_sets_only():
    """Any token is a valid HTTP method and any path can be asked for: neither may make a
    new series. Unknown methods count as OTHER, unknown paths as other."""
    from serve.web.metrics import Metrics, RequestMetricsMiddleware

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def ignore(message):
        pass

    metrics = Metrics()
    counted = RequestMetricsMiddleware(app, metrics, routes={"/send"})
    for method, path in [("FOOBAR", "/x"), ("get", "/y"), ("GET", "/send"),
                         ("PROPFIND", "/static/a.js")]:
        await counted({"type": "http", "method": method, "path": path}, None, ignore)
    labels = {tuple(s.labels.values()) for s in metrics.requests.collect()[0].samples
              if s.name.endswith("_total")}
    assert labels == {("OTHER", "other", "404"), ("GET", "/send", "404"),
                      ("OTHER", "/static", "404")}
