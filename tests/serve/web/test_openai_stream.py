"""The streamed completion's wire format and response: chunks from templates are byte for
byte what ``json.dumps`` of OpenAI's chunk objects gives; ``EventStream`` sends one ASGI
message a chunk, ends the body with the last, and a client hanging up cancels (and
closes) the chunks' generator while any other cancellation goes on up."""

from __future__ import annotations

import asyncio
import json

import pytest

from serve.runtime.options import DecodingOptions
from serve.web.openai_stream import DONE, ChunkFormat, ClientWatch, EventStream, Last

TEXTS = ["", "你好", 'a "quoted" \\ back\\slash', "line\nbreak\ttab\r", "\x00\x1f\x7f",
         "😀 non-BMP", "</script><b>", "\u2028\u2029", "ünïcödé"]


def _dumps(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() \
        + b"\n\n"


def _envelope(chat_api: bool) -> dict:
    return {"id": "chatcmpl-0123abc", "object": "chat.completion.chunk" if chat_api
            else "text_completion", "created": 1764590000, "model": 'xiao"x',
            "system_fingerprint": None}


@pytest.mark.parametrize("chat_api", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_a_text_chunk_is_what_json_dumps_gives(chat_api, text):
    fmt = ChunkFormat("chatcmpl-0123abc", 1764590000, 'xiao"x', chat_api)
    logprobs = {"content": [{"token": text, "logprob": -0.5, "bytes": [1, 2],
                             "top_logprobs": []}], "refusal": None}
    for index in (0, 3):
        for lp in (None, logprobs):
            choice = ({"index": index, "delta": {"content": text}} if chat_api
                      else {"index": index, "text": text})
            choice.update({"logprobs": lp, "finish_reason": None})
            assert fmt.text(index, text, lp) == _dumps({**_envelope(chat_api),
                                                        "choices": [choice]})


@pytest.mark.parametrize("chat_api", [True, False])
def test_first_end_and_usage_chunks_are_what_json_dumps_gives(chat_api):
    fmt = ChunkFormat("chatcmpl-0123abc", 1764590000, 'xiao"x', chat_api)
    env = _envelope(chat_api)
    if chat_api:
        first = {"index": 1, "delta": {"content": "", "role": "assistant"},
                 "logprobs": None, "finish_reason": None}
        assert fmt.first(1) == _dumps({**env, "choices": [first]})
    for finish in ("stop", "length"):
        end = ({"index": 2, "delta": {}} if chat_api else {"index": 2, "text": ""})
        end.update({"logprobs": None, "finish_reason": finish})
        assert fmt.end(2, finish) == _dumps({**env, "choices": [end]})
    usage = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    assert fmt.usage(usage) == _dumps({**env, "choices": [], "usage": usage})


class _Client:
    """An ASGI connection in memory: what the server sends, and a hang-up on demand."""

    def __init__(self):
        self.sent: list[dict] = []
        self.leave = asyncio.Event()

    async def receive(self) -> dict:
        await self.leave.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        self.sent.append(message)


async def test_each_chunk_is_one_message_and_the_last_ends_the_body():
    async def chunks():
        yield b"data: 1\n\n"
        yield Last(b"data: 2\n\n" + DONE)

    client = _Client()
    await EventStream(chunks(), ClientWatch(client.receive))({"type": "http"},
                                                              client.receive, client.send)
    assert client.sent[0]["type"] == "http.response.start"
    assert (b"content-type", b"text/event-stream; charset=utf-8") in client.sent[0]["headers"]
    bodies = [(m["body"], m["more_body"]) for m in client.sent[1:]]
    assert bodies == [(b"data: 1\n\n", True), (b"data: 2\n\n" + DONE, False)]
    assert type(bodies[-1][0]) is bytes  # not the marker class


async def test_a_client_hanging_up_closes_the_chunks_and_the_response_returns():
    closed = asyncio.Event()

    async def chunks():
        try:
            yield b"data: 1\n\n"
            await asyncio.sleep(30)  # an engine step that never comes
            yield b"never"
        finally:
            closed.set()

    client = _Client()
    watches = []

    async def serve():  # the watch belongs to the task that answers, as in the route
        watches.append(ClientWatch(client.receive))
        await EventStream(chunks(), watches[0])({"type": "http"}, client.receive,
                                                client.send)

    answer = asyncio.ensure_future(serve())
    await asyncio.sleep(0.05)
    client.leave.set()
    await asyncio.wait_for(answer, 5)  # returned, not cancelled
    assert closed.is_set() and watches[0].gone
    assert [m.get("body") for m in client.sent[1:]] == [b"data: 1\n\n"]


async def test_a_cancellation_not_from_the_client_goes_on_up():
    closed = asyncio.Event()

    async def chunks():
        try:
            await asyncio.sleep(30)
            yield b"never"
        finally:
            closed.set()

    client = _Client()

    async def serve():
        await EventStream(chunks(), None)({"type": "http"}, client.receive, client.send)

    task = asyncio.ensure_future(serve())
    await asyncio.sleep(0.05)
    task.cancel()  # the server stopping
    with pytest.raises(asyncio.CancelledError):
        await task
    assert closed.is_set()


def test_validated_values_are_remembered_with_their_types():
    DecodingOptions(beam_size=2, num_hypotheses=1)
    DecodingOptions(max_length=5, min_length=1)
    with pytest.raises(ValueError, match="beam_size"):
        DecodingOptions(beam_size=True)  # == 1, but a bool
    with pytest.raises(ValueError, match="max_length"):
        DecodingOptions(max_length=5.0, min_length=1)  # == 5, but a float
    with pytest.raises(ValueError, match="suppress_words"):
        DecodingOptions(suppress_words=[["a"]])  # unhashable: refused, not cached
