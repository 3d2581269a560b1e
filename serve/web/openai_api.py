"""An OpenAI-compatible API: ``POST /v1/chat/completions`` and ``GET /v1/models``.

The seq2seq model answers one message, so the reply is to the last ``user`` message.
OpenAI's sampling fields are mapped onto ``DecodingOptions``; every ``DecodingOptions``
field (beam_size, repetition_penalty, no_repeat_ngram_size, ...) and the usual short names
(top_k, min_tokens) are accepted as extra fields. Errors use OpenAI's error shape.
"""

from __future__ import annotations

import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from serve.web.security.text import InvalidInput, clean_text, decode_utf8

MAX_INPUT_CHARS = 2_000
# Fields of OpenAI's request that have no meaning for this model: accepted, ignored.
IGNORED_FIELDS = {"model", "messages", "stream", "stream_options", "n", "user", "stop",
                  "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty",
                  "logit_bias", "response_format", "tools", "tool_choice", "parallel_tool_calls",
                  "service_tier", "store", "metadata", "modalities", "reasoning_effort"}


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str,
                 error_type: str = "invalid_request_error", param: str | None = None):
        # Messages may quote the client's own strings: a lone surrogate in them must not
        # break the JSON encoder, so anything UTF-8 cannot carry is escaped.
        super().__init__(_printable(message))
        param = _printable(param) if param is not None else None
        self.status, self.code, self.error_type, self.param = status, code, error_type, param

    def response(self) -> JSONResponse:
        body = {"error": {"message": str(self), "type": self.error_type, "param": self.param,
                          "code": self.code}}
        headers = {"Retry-After": "1"} if self.status == 429 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


def _check_key(request: Request) -> None:
    expected = request.app.state.chat.settings.api_key
    if not expected:
        return
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                             expected.encode()):
        raise ApiError(401, "a valid API key is required (Authorization: Bearer ...)",
                       "invalid_api_key", "authentication_error")


def _engine_error(error: Exception) -> ApiError:
    """The engine refusing a request, as OpenAI's clients expect it."""
    from serve.runtime.engine import Overloaded

    if isinstance(error, Overloaded):
        return ApiError(429, "the server is busy; retry shortly", "overloaded", "rate_limit_error")
    return ApiError(503, "the model is not available", "model_unavailable", "server_error")


def _model_ready(request: Request):
    chat = request.app.state.chat
    if chat.engine is None or not chat.engine.running or chat.closing:
        raise ApiError(503, "the model is not available", "model_unavailable", "server_error")
    return chat


def decoding_options(body: dict[str, Any], default_max_tokens: int) -> dict[str, Any]:
    """OpenAI request fields -> ``DecodingOptions`` keyword arguments."""
    from serve.runtime.options import DecodingOptions

    known = {f.name for f in fields(DecodingOptions)}
    options: dict[str, Any] = {"max_length": default_max_tokens}
    aliases = {"max_tokens": "max_length", "max_completion_tokens": "max_length",
               "min_tokens": "min_length", "top_k": "sampling_topk",
               "top_p": "sampling_topp", "temperature": "sampling_temperature"}
    for key, value in body.items():
        if key in known:
            options[key] = value
        elif key in aliases:
            if value is not None:
                options[aliases[key]] = value
        elif key not in IGNORED_FIELDS:
            raise ApiError(400, f"unknown field '{key}'", "unknown_field", param=key)
    # OpenAI's temperature/top_p mean sampling: sample from the whole vocabulary unless
    # top_k narrows it. temperature 0 means greedy.
    temperature = options.get("sampling_temperature")
    if temperature == 0:
        options.pop("sampling_temperature")
        options.setdefault("sampling_topk", 1)
    elif ("sampling_temperature" in options or "sampling_topp" in options) \
            and "sampling_topk" not in options and options.get("beam_size", 1) == 1:
        options["sampling_topk"] = 0
    if body.get("logprobs") is True:  # the scores we have: each candidate reply's
        options["return_candidates"] = True
    try:
        DecodingOptions.from_kwargs(**options)
    except (ValueError, TypeError) as e:
        raise ApiError(400, str(e), "invalid_decoding_option") from None
    return options


def _last_user_text(body: dict[str, Any]) -> str:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "invalid_messages",
                       param="messages")
    for message in reversed(messages):
        if not isinstance(message, dict):
            raise ApiError(400, "every message must be an object", "invalid_messages",
                           param="messages")
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            content = "".join(part.get("text", "") for part in content
                              if isinstance(part, dict) and part.get("type") == "text"
                              and isinstance(part.get("text"), str))
        try:
            return clean_text(content, field="content", max_chars=MAX_INPUT_CHARS)
        except InvalidInput as e:
            raise ApiError(400, str(e), "invalid_content", param="messages") from None
    raise ApiError(400, "no message with role 'user'", "invalid_messages", param="messages")


async def _read_body(request: Request) -> dict[str, Any]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise ApiError(415, "the body must be application/json", "unsupported_media_type")
    try:
        body = json.loads(decode_utf8(await request.body()))
    except InvalidInput as e:
        raise ApiError(400, str(e), "invalid_utf8") from None
    except (ValueError, RecursionError):  # incl. ints over Python's digit limit
        raise ApiError(400, "the body is not valid JSON", "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", "invalid_json")
    return body


def _chunk(completion_id: str, created: int, model: str, delta: dict[str, Any],
           finish_reason: str | None) -> bytes:
    chunk = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
             "model": model, "system_fingerprint": None,
             "choices": [{"index": 0, "delta": delta, "logprobs": None,
                          "finish_reason": finish_reason}]}
    return _data(chunk)


def _data(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() \
        + b"\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass(frozen=True)
class _CompletionRequest:
    """A checked chat completion request: what to answer, and how."""

    text: str
    options: dict[str, Any]
    prompt_tokens: int
    stream: bool
    include_usage: bool
    completion_id: str
    created: int


def _parse(request: Request, body: dict[str, Any]) -> _CompletionRequest:
    """The request's body checked against this server and its model: ApiError if wrong."""
    from serve.runtime.search import source_ids

    chat = request.app.state.chat
    text = _last_user_text(body)
    model_name = body.get("model")
    if model_name not in (None, "", chat.model_name):
        raise ApiError(404, f"the model '{model_name}' does not exist; "
                       f"this server serves '{chat.model_name}'", "model_not_found",
                       param="model")
    if body.get("n", 1) not in (1, None):
        raise ApiError(400, "only n=1 is supported", "unsupported_n", param="n")
    options = decoding_options(body, chat.settings.reply_max_tokens)
    chat = _model_ready(request)
    try:
        prompt_tokens = len(source_ids(chat.engine.model, text))
    except ValueError as e:
        raise ApiError(400, str(e), "invalid_content", param="messages") from None
    completion_id = "chatcmpl-" + secrets.token_hex(12)
    created = int(time.time())
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "invalid_stream")
    stream_options = body.get("stream_options") or {}
    include_usage = isinstance(stream_options, dict) and bool(
        stream_options.get("include_usage"))
    return _CompletionRequest(text, options, prompt_tokens, stream, include_usage,
                    completion_id, created)


async def _complete(chat, req: _CompletionRequest) -> Response:
    """The whole reply in one JSON ``chat.completion``."""
    from serve.runtime.engine import EngineStopped, Overloaded

    record = chat.metrics.request(req.prompt_tokens)
    with record.guard():  # refused, failed or cancelled: counted as such
        try:
            result = await chat.engine.generate(req.text, **req.options)
        except (Overloaded, EngineStopped) as e:
            raise _engine_error(e) from None
    record.finish_with(result)
    return JSONResponse({
        "id": req.completion_id, "object": "chat.completion", "created": req.created,
        "model": chat.model_name, "system_fingerprint": None,
        "choices": [{"index": 0, "logprobs": None,
                     "message": {"role": "assistant", "content": result.text},
                     "finish_reason": result.finish_reason, **_candidates(result)}],
        "usage": _usage(req.prompt_tokens, len(result.token_ids)),
    })


def _candidates(result) -> dict[str, Any]:
    """With ``return_candidates`` (or ``logprobs``): every candidate reply and its scores,
    best first (an extension field: OpenAI's clients ignore it)."""
    if not result.candidates:
        return {}
    top = max((c.retrieval_score for c in result.candidates if c.source == "retrieved"),
              default=0.0)
    out = []
    for c in result.candidates:
        forward, backward, retrieval = c.features(top)
        out.append({"text": c.text, "source": c.source, "score": c.score,
                    "forward": forward, "backward": backward, "retrieval": retrieval})
    return {"xiaox_source": result.source, "xiaox_candidates": out}


async def _stream(chat, req: _CompletionRequest) -> Response:
    """The reply as ``chat.completion.chunk`` events, once the engine has begun it."""
    from serve.runtime.engine import EngineStopped, Overloaded

    engine_stream = chat.engine.stream(req.text, **req.options)
    deltas = aiter(engine_stream)
    record = chat.metrics.request(req.prompt_tokens)
    # Wait for the first piece before the 200: a full queue is still a clean 429.
    with record.guard():
        try:
            first: str | None = await anext(deltas)
        except StopAsyncIteration:
            first = None
        except (Overloaded, EngineStopped) as e:
            raise _engine_error(e) from None
    return StreamingResponse(_chunks(chat.model_name, req, engine_stream, deltas, first,
                                     record),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


async def _chunks(name: str, req: _CompletionRequest, engine_stream, deltas,
                  first: str | None, record) -> AsyncIterator[bytes]:
    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        return _chunk(req.completion_id, req.created, name, delta, finish_reason)

    try:
        with record.guard():  # the client leaving: cancelled
            yield chunk({"role": "assistant", "content": ""})
            if first is not None:
                yield chunk({"content": first})
                async for delta in deltas:
                    yield chunk({"content": delta})
        result = engine_stream.result
        record.finish_with(result)
        yield chunk({}, result.finish_reason if result is not None else "stop")
        if req.include_usage:
            completion_tokens = len(result.token_ids) if result is not None else 0
            yield _data({"id": req.completion_id, "object": "chat.completion.chunk",
                         "created": req.created, "model": name, "system_fingerprint": None,
                         "choices": [], "usage": _usage(req.prompt_tokens, completion_tokens)})
        yield b"data: [DONE]\n\n"
    finally:
        # A client that left: closing the iterator cancels the request in the engine.
        await deltas.aclose()


async def chat_completions(request: Request) -> Response:
    chat = request.app.state.chat
    try:
        _check_key(request)
        req = _parse(request, await _read_body(request))
        return await (_stream if req.stream else _complete)(chat, req)
    except ApiError as e:
        chat.metrics.errors.labels(f"api_{e.code}").inc()
        return e.response()


async def list_models(request: Request) -> Response:
    chat = request.app.state.chat
    try:
        _check_key(request)
    except ApiError as e:
        return e.response()
    return JSONResponse({"object": "list", "data": [
        {"id": chat.model_name, "object": "model", "created": 0, "owned_by": "xiaox"}]})


def routes() -> list[Route]:
    return [Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", list_models, methods=["GET"])]
