"""The OpenAI-compatible API against a real server process and a real model."""

from __future__ import annotations

import asyncio
import json
import shutil

import httpx
import pytest

from tests.serve._helpers_server import (
    ServerProcess,
    StrictSSEParser,
    metric_value,
    split_lines,
)

pytestmark = pytest.mark.timeout(120)

KEY = "test-api-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module", params=["engine here", "engine process"])
def server(model_dir, tmp_path_factory, request):
    """The server, with its engine in its own process too (``XIAOX_ENGINE_PROCESS``): the
    same API either way."""
    env = {"XIAOX_API_KEY": KEY, "XIAOX_ENGINE_PROCESS": str(int(request.param != "engine here"))}
    process = ServerProcess(model_dir, tmp_path_factory.mktemp("openai"), env=env).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def model_name(model_dir) -> str:
    return json.loads((model_dir / "manifest.json").read_text())["name"]


def parse_openai_stream(raw: str) -> list[str]:
    """Strict: only ``data:`` fields and blank lines; returns each event's data."""
    parser = StrictSSEParser(fields=("data",), comments=False)
    assert raw.endswith("\n\n"), "the stream must end with a complete event"
    events = []
    for line in split_lines(raw)[:-1]:
        event = parser.feed(line)
        if event is not None:
            assert set(event) == {"data"}
            events.append(event["data"])
    assert not parser.data, "data left without a dispatching blank line"
    return events


def post(c: httpx.Client, body: dict, headers: dict | None = None) -> httpx.Response:
    return c.post("/v1/chat/completions", json=body, headers=AUTH if headers is None else headers)


def ask(text: str = "你好", **extra) -> dict:
    model = extra.pop("model", None)  # none: the one the server serves
    return {**({"model": model} if model else {}),
            "messages": [{"role": "system", "content": "你是小X"},
                         {"role": "user", "content": text}], **extra}


def test_models_lists_the_loaded_model_and_needs_the_key(server, model_name):
    with httpx.Client(base_url=server.url) as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        body = c.get("/v1/models", headers=AUTH).json()
        assert body["object"] == "list"
        assert [m["id"] for m in body["data"]] == [model_name]
        assert body["data"][0]["object"] == "model"


def test_the_shipped_model_is_called_xiaox(model_dir, model_name):
    if model_dir.name == "xiaox":
        assert model_name == "xiaox"
    else:
        pytest.skip("the shipped model is not built yet: tested with the tiny model")


def test_a_completion(server, model_name):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        response = post(c, ask(model=model_name))
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
        assert body["model"] == model_name
        choice = body["choices"][0]
        assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
        assert isinstance(choice["message"]["content"], str)
        assert choice["finish_reason"] in ("stop", "length")
        usage = body["usage"]
        assert usage["prompt_tokens"] >= 1 and usage["completion_tokens"] >= 1
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert post(c, ask(model=model_name), headers={}).status_code == 401


def test_reply_mode_is_an_extra_field_and_logprobs_show_the_candidates(server, model_name,
                                                                       model_dir):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        if not (model_dir / "index").is_dir():
            bad = post(c, ask("今天好冷", model=model_name, reply_mode="hybrid"))
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "reply_mode"
            pytest.skip("the model folder has no reply index")
        hybrid = post(c, ask("今天好冷", model=model_name, reply_mode="hybrid", logprobs=True,
                             temperature=0.7, seed=3)).json()["choices"][0]
        sources = {cand["source"] for cand in hybrid["xiaox_candidates"]}
        assert sources == {"retrieved", "generated"}
        best = hybrid["xiaox_candidates"][0]
        assert hybrid["message"]["content"] == best["text"]
        assert hybrid["xiaox_source"] == best["source"]
        assert {"score", "forward", "backward", "retrieval"} <= set(best)
        plain = post(c, ask("今天好冷", model=model_name, reply_mode="generate",
                            temperature=0, logprobs=True)).json()
        assert "xiaox_candidates" not in plain["choices"][0]  # one greedy reply: no choice
        bad = post(c, ask("今天好冷", model=model_name, reply_mode="retrieve"))
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_decoding_option"


def test_a_stream_parses_strictly_and_matches_the_completion(server, model_name):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        # greedy (temperature 0), whatever the folder's defaults: the same reply twice
        whole = post(c, ask("今天天气怎么样", model=model_name, temperature=0)).json()
        response = post(c, ask("今天天气怎么样", model=model_name, temperature=0, stream=True,
                               stream_options={"include_usage": True}))
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = parse_openai_stream(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)
    assert len({ch["id"] for ch in chunks}) == 1 and chunks[0]["model"] == model_name
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]
    content_chunks = chunks[:-1]
    finishes = [ch["choices"][0]["finish_reason"] for ch in content_chunks]
    assert finishes[:-1] == [None] * (len(finishes) - 1)
    assert finishes[-1] == whole["choices"][0]["finish_reason"]
    text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in content_chunks)
    assert text == whole["choices"][0]["message"]["content"]  # greedy: the same reply


def test_no_usage_chunk_unless_asked(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        events = parse_openai_stream(post(c, ask(stream=True)).text)
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" not in ch for ch in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_max_tokens_ends_with_length(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        # Decoded replies (a retrieved reply that fits max_tokens ends with "stop": it was
        # never cut).
        body = post(c, ask(max_tokens=3, min_tokens=3, reply_mode="generate")).json()
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 3
        events = parse_openai_stream(post(c, ask(max_tokens=3, min_tokens=3, stream=True,
                                                 reply_mode="generate")).text)
        last = json.loads(events[-2])
        assert last["choices"][0]["finish_reason"] == "length"


def test_sampling_fields_and_extra_decoding_fields_are_accepted(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        sampled = [post(c, ask(temperature=1.2, top_p=0.95, seed=11, max_tokens=8)).json()
                   for _ in range(2)]
        assert sampled[0]["choices"][0]["message"] == sampled[1]["choices"][0]["message"]
        extras = ask(beam_size=3, num_hypotheses=2, repetition_penalty=1.3,
                     no_repeat_ngram_size=2, length_penalty=0.8, max_completion_tokens=10,
                     user="someone", n=1, presence_penalty=0)
        response = post(c, extras)
        assert response.status_code == 200, response.text
        topk = post(c, ask(top_k=5, temperature=0.7, seed=1))
        assert topk.status_code == 200, topk.text
        beam_stream = parse_openai_stream(post(c, ask(beam_size=2, stream=True)).text)
        assert beam_stream[-1] == "[DONE]"


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"messages": []}, 400, "invalid_messages"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "invalid_messages"),
    ({"messages": [{"role": "user", "content": "   "}]}, 400, "invalid_content"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "invalid_content"),
    ({"messages": "hi"}, 400, "invalid_messages"),
    (ask(model="gpt-4"), 404, "model_not_found"),
    (ask(beam_size=0), 400, "invalid_decoding_option"),
    (ask(temperature=-1), 400, "invalid_decoding_option"),
    (ask(top_p=2), 400, "invalid_decoding_option"),
    (ask(max_tokens="many"), 400, "invalid_decoding_option"),
    (ask(beam_size=2, top_k=5), 400, "invalid_decoding_option"),
    (ask(colour="blue"), 400, "unknown_field"),
    (ask(n=5), 400, "invalid_n"),
    (ask(tools=[{"type": "function"}]), 400, "unsupported_field"),
    (ask(max_tokens=300), 400, "invalid_max_tokens"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_role"),
    (ask(stream="yes"), 400, "invalid_stream"),
])
def test_bad_requests_get_openai_errors(server, body, status, code):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        response = post(c, body)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["code"] == code and error["message"] and error["type"]


def test_refusals_before_the_routes_are_in_openais_shape_too(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        big = c.post("/v1/chat/completions", headers={**AUTH, "Content-Type": "application/json"},
                     content=b"{" + b" " * (128 * 1024) + b"}")
        assert big.status_code == 413
        error = big.json()["error"]
        assert error["code"] == "body_too_large" and error["message"] and error["type"]
        chat = c.post("/send", content=b"x" * (128 * 1024))  # the chat routes keep theirs
        assert chat.status_code == 413 and chat.json()["reason"] == "body_too_large"


def test_content_as_parts_and_bad_bodies(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "你好"}]}]}
        assert post(c, parts).status_code == 200
        for raw, ctype, status in ((b"{", "application/json", 400),
                                   (b'{"messages": "\xff"}', "application/json", 400),
                                   (b'{"messages": [{"role": "user", "content": "\\udc00"}]}',
                                    "application/json", 400),
                                   (b"[]", "application/json", 400),
                                   (b"hi", "text/plain", 415)):
            response = c.post("/v1/chat/completions", content=raw,
                              headers={**AUTH, "content-type": ctype})
            assert response.status_code == status, (raw, response.text)
            assert "error" in response.json()


async def test_a_client_leaving_a_stream_cancels_its_request(server):
    async with server.client(timeout=60) as c:
        before = metric_value((await c.get("/metrics")).text, "xiaox_engine_cancelled_total")
        # one greedy reply, streamed token by token (not candidates chosen at the end)
        long = ask(min_tokens=256, max_tokens=256, stream=True, reply_mode="generate",
                   temperature=0)
        async with c.stream("POST", "/v1/chat/completions", json=long, headers=AUTH) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data:") and '"content"' in line and '""' not in line:
                    break  # leave after the first piece
        page = ""
        for _ in range(100):
            page = (await c.get("/metrics")).text
            if (metric_value(page, "xiaox_engine_cancelled_total") > before
                    and metric_value(page, "xiaox_engine_batch_size") == 0):
                break
            await asyncio.sleep(0.05)
        assert metric_value(page, "xiaox_engine_cancelled_total") == before + 1
        assert metric_value(page, "xiaox_engine_batch_size") == 0


async def test_an_overloaded_engine_answers_429(model_dir, tmp_path):
    # One row in the batch and one place in the queue: a long reply takes the row, a
    # second request takes the place, and a third finds the queue full.
    # (the API's cap raised to the runtime's ceiling, 1024; one place in the API's queue)
    process = ServerProcess(model_dir, tmp_path,
                            env={"XIAOX_MAX_BATCH_SIZE": "1", "XIAOX_MAX_QUEUE": "1",
                                 "XIAOX_API_MAX_TOKENS": "1024"})
    long = ask(min_tokens=1024, max_tokens=1024, stream=True, reply_mode="generate",
               temperature=0)  # one greedy reply, streamed token by token
    try:
        process.start()
        async with process.client(timeout=60) as c:
            first_piece = asyncio.Event()

            async def occupy():
                async with c.stream("POST", "/v1/chat/completions", json=long) as response:
                    async for line in response.aiter_lines():
                        if '"content"' in line:
                            first_piece.set()

            running = asyncio.create_task(occupy())
            await asyncio.wait_for(first_piece.wait(), 30)
            waiting = asyncio.create_task(c.post("/v1/chat/completions", json=long))
            for _ in range(200):
                page = (await c.get("/metrics")).text
                if metric_value(page, "xiaox_engine_queue_size") == 1:
                    break
                await asyncio.sleep(0.05)
            assert metric_value(page, "xiaox_engine_queue_size") == 1
            for stream in (False, True):
                response = await c.post("/v1/chat/completions", json=ask(stream=stream))
                assert response.status_code == 429, response.text
                assert response.json()["error"]["code"] == "overloaded"
                assert "retry-after" in response.headers
            page = (await c.get("/metrics")).text
            assert metric_value(page, 'xiaox_errors_total{reason="api_overloaded"}') == 2
            for task in (running, waiting):
                task.cancel()
            await asyncio.gather(running, waiting, return_exceptions=True)
    finally:
        process.stop()


def _folder_with_generation(model_dir, tmp_path, generation: dict):
    """A copy of the model folder whose manifest's default generation settings are
    ``generation`` (manifest.json is not among the hashed files)."""
    folder = tmp_path / "folder"
    shutil.copytree(model_dir, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["generation"] = generation
    (folder / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False))
    return folder


def test_the_folders_generation_settings_are_the_apis_defaults(model_dir, tmp_path):
    # Sampling with a seed, and replies of at least 6 tokens: observable defaults.
    generation = {"reply_mode": "generate", "sampling_topk": 0, "sampling_temperature": 1.5,
                  "seed": 7, "min_length": 6, "max_length": 2}
    folder = _folder_with_generation(model_dir, tmp_path, generation)
    process = ServerProcess(folder, tmp_path).start()
    try:
        with httpx.Client(base_url=process.url, timeout=60) as c:
            models = c.get("/v1/models").json()["data"][0]
            assert models["xiaox_generation"] == generation
            text = "今天天气怎么样"
            defaults = [post(c, ask(text), headers={}).json() for _ in range(2)]
            explicit = post(c, ask(text, reply_mode="generate", top_k=0, temperature=1.5,
                                   seed=7, min_tokens=6), headers={}).json()
            content = [b["choices"][0]["message"]["content"] for b in defaults + [explicit]]
            assert content[0] == content[1] == content[2]  # the folder's seeded sampling
            # not the folder's max_length (2) but the API's default; its min_length holds
            assert defaults[0]["usage"]["completion_tokens"] >= 6
            completion = c.post("/v1/completions", json={"prompt": text}).json()
            assert completion["choices"][0]["text"] == content[0]
            # the request wins: greedy drops the folder's sampling (not its min_length)
            greedy = post(c, ask(text, temperature=0), headers={}).json()
            plain = post(c, ask(text, reply_mode="generate", top_k=1, min_tokens=6),
                         headers={}).json()
            assert greedy["choices"][0]["message"] == plain["choices"][0]["message"]
            assert greedy["usage"]["completion_tokens"] >= 6
            # a shorter max_tokens caps the folder's min_length; a seed of its own
            short = post(c, ask(text, max_tokens=3), headers={}).json()
            assert short["usage"]["completion_tokens"] == 3
            assert short["choices"][0]["finish_reason"] == "length"
            other = post(c, ask(text, seed=8), headers={}).json()
            again = post(c, ask(text, seed=8, reply_mode="generate", top_k=0,
                                temperature=1.5, min_tokens=6), headers={}).json()
            assert other["choices"][0]["message"] == again["choices"][0]["message"]
    finally:
        process.stop()
