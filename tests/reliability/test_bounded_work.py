"""Bounded work (issue 16, item 1), against real ``python -m serve`` processes:

- every cap is a 400 in OpenAI's shape that names the field, and a request at the caps
  is answered while the server stays responsive;
- a client that hangs up frees its rows of the decoder batch (non-streamed and
  streamed, decoded and beam search), counted on ``/metrics``;
- the API and the chat room each have their lane: a flood of one gets 429s (API) or
  busy notices (chat) of its own while the other is still answered beside it.
"""

from __future__ import annotations

import asyncio
import json
import os
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
)

pytestmark = [pytest.mark.timeout(180)]

LONG = 1024  # the runtime's ceiling of max_tokens, which these servers allow the API
# Small lanes: 4 rows (2 each, 1 of them reserved), 4 places in the queue (2 each). The
# engine in the server's process: the floods' replies must outlast the flood, and in a
# process of its own the engine ends three LONG replies at once in half a second (the
# lanes are the engine's own, the same in either process).
LANES = {"XIAOX_MAX_BATCH_SIZE": "4", "XIAOX_MAX_QUEUE": "4",
         "XIAOX_API_MAX_TOKENS": str(LONG), "XIAOX_ENGINE_PROCESS": "0"}


def ask(text: str = "你好", **fields) -> dict:
    return {"messages": [{"role": "user", "content": text}], **fields}


def long_ask(**fields) -> dict:
    """A reply that only its end (or a cancel) stops: LONG tokens of greedy decoding."""
    return ask(min_tokens=LONG, max_tokens=LONG, reply_mode="generate", **
               {"temperature": 0, **fields})


async def scrape(metrics: httpx.AsyncClient, *names: str) -> dict[str, float]:
    """Samples of ``/metrics``, read with ``metrics`` (one connection: polls are fast)."""
    page = (await metrics.get("/metrics")).text
    return {name: metric_value(page, name) for name in names}


async def until_metrics(metrics: httpx.AsyncClient, predicate, timeout: float = 60.0,
                        *names: str) -> dict[str, float]:
    names = names or ("xiaox_num_requests_running", "xiaox_num_requests_waiting")
    deadline = time.monotonic() + timeout
    while True:
        values = await scrape(metrics, *names)
        if predicate(values):
            return values
        assert time.monotonic() < deadline, values
        await asyncio.sleep(0.005)


@pytest.fixture(scope="module")
def api_server(model_dir, tmp_path_factory):
    # (reply_max_tokens too: before the API had caps of its own, it raised the API's)
    server = ServerProcess(model_dir, tmp_path_factory.mktemp("bounded"),
                           env={"XIAOX_API_MAX_TOKENS": str(LONG),
                                "XIAOX_REPLY_MAX_TOKENS": str(LONG)})
    with running(server):
        yield server


CAPPED = [  # (path, body, the field named)
    ("/v1/chat/completions", ask(max_tokens=1_000_000), "max_tokens"),
    ("/v1/chat/completions", ask(min_tokens=1_000_000), "min_tokens"),
    ("/v1/chat/completions", ask(beam_size=9), "beam_size"),
    ("/v1/chat/completions", ask(beam_size=8, num_hypotheses=9), "num_hypotheses"),
    ("/v1/chat/completions", ask(n=5, temperature=1), "n"),
    ("/v1/chat/completions", ask(no_repeat_ngram_size=9), "no_repeat_ngram_size"),
    ("/v1/chat/completions", ask(suppress_words=[f"词{i}" for i in range(17)]),
     "suppress_words"),
    ("/v1/chat/completions", ask(suppress_words=["长" * 17]), "suppress_words"),
    ("/v1/chat/completions",
     {"messages": [{"role": "system", "content": "设" * 1999},
                   {"role": "user", "content": "你好"}]}, "messages"),
    ("/v1/completions", {"prompt": "字" * 2001}, "prompt"),
    ("/v1/completions", {"prompt": "你好", "max_tokens": LONG + 1}, "max_tokens"),
]


async def test_every_cap_is_a_400_that_names_its_field(api_server):
    async with api_server.client() as c:
        for path, body, param in CAPPED:
            response = await c.post(path, json=body)
            assert response.status_code == 400, (body, response.text[:200])
            error = response.json()["error"]
            assert error["param"] == param and error["type"] == "invalid_request_error", error
        # At the caps: 16 new words of 16 characters (their vocabulary scan runs in a
        # worker thread), answered while /healthz answers beside it.
        words = [f"{i:02d}" + "长" * 14 for i in range(16)]
        capped = asyncio.create_task(c.post("/v1/chat/completions", json=ask(
            suppress_words=words, max_tokens=5, temperature=0, reply_mode="generate")))
        health = await c.get("/healthz", timeout=10)
        assert health.status_code == 200
        assert (await capped).status_code == 200


async def _hang_up(server: ServerProcess, metrics: httpx.AsyncClient, body: dict,
                   rows: int) -> None:
    """POST ``body`` on a raw connection, close it once ``rows`` rows are running."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    payload = json.dumps(body).encode()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                 % len(payload) + payload)
    await writer.drain()
    await until_metrics(metrics, lambda m: m["xiaox_num_requests_running"] >= rows, 30)
    await asyncio.sleep(0.3)  # the client hangs up while the rows decode
    writer.close()
    await writer.wait_closed()


HANG_UPS = [  # (body, rows it holds, counts its generated tokens as it goes)
    (long_ask(n=4, temperature=1.0, seed=1), 4, True),  # non-streamed, decoded
    (long_ask(beam_size=4), 1, False),  # non-streamed beam search
    (long_ask(beam_size=4, stream=True), 1, False),  # streamed, the beam in its start
    (long_ask(n=2, temperature=1.0, seed=1, stream=True), 2, True),  # streamed, decoded
]


@pytest.mark.parametrize(("body", "rows", "tokens_counted"), HANG_UPS,
                         ids=["non-streamed-n4", "non-streamed-beam", "streamed-beam",
                              "streamed-n2"])
async def test_a_client_hanging_up_frees_its_rows(api_server, body, rows, tokens_counted):
    names = ("xiaox_engine_cancelled_total", "xiaox_generated_tokens_total",
             "xiaox_num_requests_running")
    async with api_server.client() as metrics:
        before = await until_metrics(metrics, lambda m: m["xiaox_num_requests_running"] == 0,
                                     60, *names)
        await _hang_up(api_server, metrics, body, rows)
        after = await until_metrics(metrics, lambda m: m["xiaox_num_requests_running"] == 0,
                                    60, *names)
    # Cancelled, not run to its end: each row counted as cancelled, and (decoded rows)
    # fewer tokens made than the LONG each would have taken.
    cancelled = after["xiaox_engine_cancelled_total"] - before["xiaox_engine_cancelled_total"]
    assert cancelled == rows, (before, after)
    if tokens_counted:
        made = after["xiaox_generated_tokens_total"] - before["xiaox_generated_tokens_total"]
        assert made < rows * LONG, (before, after)


async def _one_at_a_time(metrics: httpx.AsyncClient, submit, count: int, settled) -> list:
    """``count`` submissions, each once the one before is running, waiting or refused
    (``settled(metrics, submitted)``): all at once, they would all meet the queue before
    any joined the batch."""
    submitted: list = []
    for _ in range(count):
        submitted.append(await submit())
        await until_metrics(metrics, lambda m: settled(m, submitted), 60)
    return submitted


def _in_engine(m: dict) -> float:
    return m["xiaox_num_requests_running"] + m["xiaox_num_requests_waiting"]


@pytest.mark.redis
async def test_an_api_flood_leaves_the_chat_room_its_rows_and_queue(model_dir, redis_server,
                                                                    tmp_path):
    server = ServerProcess(model_dir, tmp_path, redis_url=redis_server.url, env=LANES)
    with running(server):
        async with server.client(timeout=120) as api, server.client() as user, \
                server.client() as metrics:
            await login(user, "alice")

            async def submit() -> asyncio.Task:
                return asyncio.create_task(api.post("/v1/chat/completions", json=long_ask()))

            def settled(m: dict, tasks: list) -> bool:
                ended = sum(1 for t in tasks if t.done())  # refused (or, late, finished)
                return _in_engine(m) + ended == len(tasks)

            async with ChatStream(user, "lanes") as stream:
                await stream.wait_for(lambda events: bool(events), 20)
                flood = await _one_at_a_time(metrics, submit, 8, settled)
                refused = [t for t in flood if t.done()]
                statuses = [t.result().status_code for t in refused]
                assert statuses and set(statuses) == {429}, statuses
                state = await scrape(metrics, "xiaox_num_requests_running",
                                     "xiaox_num_requests_waiting")
                # the API's 2 rows and 1 lent (the room's reserve is not), 2 places
                assert (state["xiaox_num_requests_running"],
                        state["xiaox_num_requests_waiting"]) == (3, 2), state
                waiting = [t for t in flood if not t.done()][-2:]
                sent = await send(user, "你好", room="lanes")
                await stream.wait_for(bot_reply_to(sent["id"]), 60)
                reply = [e["data"] for e in stream.of_type("message")
                         if e["data"].get("reply_to") == sent["id"]][0]
                assert "error" not in reply, reply  # a reply, not the busy notice
                # answered before the API requests queued ahead of it even began
                assert not any(t.done() for t in waiting)
            for task in flood:
                task.cancel()  # the clients hang up: their rows are freed
            await until_metrics(metrics, lambda m: _in_engine(m) == 0, 30)


def _long_replies_folder(model_dir: Path, folder: Path) -> Path:
    """The model folder with chat replies of LONG tokens (its manifest's generation
    defaults): the other files linked, not copied."""
    folder.mkdir()
    for entry in model_dir.iterdir():
        if entry.name != "manifest.json":
            os.symlink(entry.resolve(), folder / entry.name)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    manifest["generation"] = {**manifest.get("generation", {}), "reply_mode": "generate",
                              "min_length": LONG, "max_length": LONG,
                              "no_repeat_ngram_size": 0}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.redis
async def test_a_chat_flood_leaves_the_api_its_rows_and_queue(model_dir, redis_server,
                                                              tmp_path):
    folder = _long_replies_folder(model_dir, tmp_path / "long-replies")
    env = {**LANES, "XIAOX_REPLY_MAX_TOKENS": str(LONG), "XIAOX_RATE_LIMIT_MESSAGES": "100"}
    server = ServerProcess(folder, tmp_path, redis_url=redis_server.url, env=env)
    with running(server):
        async with server.client() as user, server.client(timeout=60) as api, \
                server.client() as metrics:
            await login(user, "bob")
            async with ChatStream(user, "flood") as stream:
                await stream.wait_for(lambda events: bool(events), 20)

                def ended(sent: list) -> list[dict]:
                    ids = {s["id"] for s in sent}
                    return [e["data"] for e in stream.of_type("message")
                            if e["data"].get("reply_to") in ids]

                async def submit() -> dict:
                    return await send(user, "你好", room="flood")

                def settled(m: dict, sent: list) -> bool:
                    return _in_engine(m) + len(ended(sent)) == len(sent)

                sent = await _one_at_a_time(metrics, submit, 8, settled)
                busy = ended(sent)
                assert busy and all(d.get("error") == "overloaded" for d in busy), busy
                state = await scrape(metrics, "xiaox_num_requests_running",
                                     "xiaox_num_requests_waiting")
                assert (state["xiaox_num_requests_running"],
                        state["xiaox_num_requests_waiting"]) == (3, 2), state
                accepted = [s["id"] for s in sent
                            if s["id"] not in {d["reply_to"] for d in busy}]
                waiting = set(accepted[-2:])
                answer = await api.post("/v1/chat/completions", json=ask(
                    max_tokens=5, temperature=0, reply_mode="generate"))
                assert answer.status_code == 200, answer.text  # not a 429
                assert answer.json()["usage"]["completion_tokens"] <= 5
                # answered before the room's replies queued ahead of it even began
                assert not [d for d in ended(sent) if d["reply_to"] in waiting]
