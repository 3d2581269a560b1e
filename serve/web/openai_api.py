"""An OpenAI-compatible API: ``POST /v1/chat/completions``, ``POST /v1/completions``,
``GET /v1/models`` and ``GET /v1/models/{id}``.

The seq2seq model answers one message: the reply is to the last ``user`` message (system,
developer and assistant turns are accepted and checked, but the model does not read
them); ``/v1/completions`` answers its ``prompt``. OpenAI's sampling fields are mapped
onto ``DecodingOptions`` (``presence_penalty`` and ``frequency_penalty`` included); every
``DecodingOptions`` field (beam_size, repetition_penalty, reply_mode, ...) and the usual
short names (top_k, min_tokens) are accepted as extra fields. The options start from the
model folder's default generation settings (its manifest's ``generation``, shown by
``/v1/models`` as ``xiaox_generation``), then the request's fields win; a request asking
for greedy decoding (temperature 0, top_k 1) or beam search drops the folder's sampling
defaults (the rule in full: ``serve.web.openai_fields``). ``n`` (up to 4: the server's
``api_max_n``, as every cap there), ``stop`` (up to 4 strings) and
``logprobs``/``top_logprobs`` (up to 5) work streamed and not
(``serve.web.openai_choices`` says how, and what the log-probs of a reply chosen among
candidates are). A field this server does not implement is a 400 that names it
(``serve.web.openai_fields``), never silently ignored.

Every answer under ``/v1`` is OpenAI's shape, errors included (``{"error": {"message",
"type", "param", "code"}}``): unknown paths are a 404, a wrong method a 405. With
``logprobs: true`` a chat completion's first choice also has ``xiaox_source`` and
``xiaox_candidates`` (every candidate reply and its scores) when it was chosen among
candidates: extension fields OpenAI's clients ignore.

A client that hangs up cancels its request, streamed or not (a non-streamed one is
watched for ``http.disconnect`` while it is worked on), so its rows of the decoder batch
are freed at once. Requests go to the engine's ``api`` lane (``serve.web.lanes``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serve.web.openai_choices import start_choices
from serve.web.openai_fields import (
    ApiError,
    ApiLimits,
    Wanted,
    check_key,
    checked_options,
    decoding_options,
    last_user_text,
    prompt_text,
    read_body,
    wanted,
)
from serve.web.openai_stream import DONE, ChunkFormat, ClientWatch, EventStream, Last, data
from serve.web.reply import count_prompt_tokens

__all__ = ["ApiError", "decoding_options", "routes"]

log = logging.getLogger("xiaox.api")
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
# Completion ids: unique, not secret; one os.urandom seed, not a system call per request.
_ids = random.Random()


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


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass(frozen=True)
class _Request:
    """A checked request: what to answer, how to decode it, and what the API adds."""

    chat_api: bool  # /v1/chat/completions (else /v1/completions)
    text: str
    options: dict[str, Any]  # as the request spelt them (DecodingOptions' names)
    decoding: Any  # the DecodingOptions made of them, validated once
    want: Wanted
    prompt_tokens: int
    completion_id: str
    created: int


async def _parse(request: Request, body: dict[str, Any], chat_api: bool) -> _Request:
    """The body checked against this server and its model (within its ``api_max_*``
    settings): ApiError if wrong."""
    chat = request.app.state.chat
    limits = ApiLimits.of(chat.settings)
    text = last_user_text(body, limits.prompt_chars) if chat_api \
        else prompt_text(body, limits.prompt_chars)
    model_name = body.get("model")
    if model_name not in (None, "", chat.model_name):
        raise ApiError(404, f"the model '{model_name}' does not exist; "
                       f"this server serves '{chat.model_name}'", "model_not_found",
                       param="model")
    settings = chat.settings
    generation = chat.engine.model.manifest.generation if chat.engine is not None else {}
    options, decoding = checked_options(body, settings.reply_max_tokens, limits, generation)
    want = wanted(body, chat_api, limits.n)
    chat = _model_ready(request)
    try:
        prompt_tokens = await count_prompt_tokens(chat.engine, text)
    except ValueError as e:
        raise ApiError(400, str(e), "invalid_content",
                       param="messages" if chat_api else "prompt") from None
    prefix = "chatcmpl-" if chat_api else "cmpl-"
    return _Request(chat_api, text, options, decoding, want, prompt_tokens,
                    f"{prefix}{_ids.getrandbits(96):024x}", int(time.time()))


async def _begin(chat, req: _Request, record):
    """The request's choices, begun: the engine's refusals are still clean errors."""
    from serve.runtime.engine import EngineStopped, Overloaded

    with record.guard():  # refused, failed or cancelled: counted as such
        try:
            return await start_choices(chat.engine, req.text, req.decoding, req.want,
                                       req.options.keys())
        except (Overloaded, EngineStopped) as e:
            raise _engine_error(e) from None
        except ValueError as e:
            raise ApiError(400, str(e), "invalid_decoding_option") from None


def _finish_record(record, choices) -> int:
    tokens = sum(t for t, _ in choices.results)
    record.finish(choices.results[0][1] if choices.results else "stop", tokens)
    return tokens


def _candidates(result) -> dict[str, Any]:
    """Every candidate reply and its scores, best first (an extension field)."""
    if result is None or not result.candidates:
        return {}
    top = max((c.retrieval_score for c in result.candidates if c.source == "retrieved"),
              default=0.0)
    out = []
    for c in result.candidates:
        forward, backward, retrieval = c.features(top)
        out.append({"text": c.text, "source": c.source, "score": c.score,
                    "forward": forward, "backward": backward, "retrieval": retrieval})
    return {"xiaox_source": result.source, "xiaox_candidates": out}


def _legacy_log_probs(entries: list[dict]) -> dict[str, Any]:
    """``/v1/completions``' log-probs: tokens, token_logprobs, top_logprobs, text_offset."""
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]}
                             for e in entries],
            "text_offset": offsets}


def _log_probs(req: _Request, entries: list[dict] | None) -> dict[str, Any] | None:
    if not req.want.logprobs or entries is None:
        return None
    if req.chat_api:
        return {"content": entries, "refusal": None}
    return _legacy_log_probs(entries)


def _choice(req: _Request, index: int, text: str, entries: list | None,
            finish: str | None) -> dict[str, Any]:
    if req.chat_api:
        return {"index": index, "message": {"role": "assistant", "content": text,
                                            "refusal": None},
                "logprobs": _log_probs(req, entries), "finish_reason": finish}
    return {"index": index, "text": text, "logprobs": _log_probs(req, entries),
            "finish_reason": finish}


def _envelope(req: _Request, name: str) -> dict[str, Any]:
    kind = "chat.completion" if req.chat_api else "text_completion"
    return {"id": req.completion_id, "object": kind, "created": req.created, "model": name,
            "system_fingerprint": None}


async def _complete(chat, req: _Request) -> Response:
    """The whole answer in one JSON object."""
    record = chat.metrics.request(req.prompt_tokens)
    choices = await _begin(chat, req, record)
    texts: dict[int, list[str]] = {}
    entries: dict[int, list[dict]] = {}
    finishes: dict[int, str | None] = {}
    with record.guard():
        try:
            async for event in choices.events():
                texts.setdefault(event.index, []).append(event.text)
                entries.setdefault(event.index, []).extend(event.entries)
                finishes[event.index] = event.finish
        finally:
            await choices.aclose()
    tokens = _finish_record(record, choices)
    scored = getattr(choices, "log_probs", []) is not None  # a whole reply's, or none
    body = _envelope(req, chat.model_name)
    body["choices"] = [_choice(req, i, "".join(texts[i]), entries[i] if scored else None,
                               finishes[i]) for i in sorted(texts)]
    if req.chat_api and req.want.candidates and body["choices"]:
        body["choices"][0].update(_candidates(getattr(choices, "result", None)))
    body["usage"] = _usage(req.prompt_tokens, tokens)
    return JSONResponse(body)


async def _stream(chat, req: _Request, watch: ClientWatch) -> Response:
    """The answer as server-sent events, once the engine has begun it."""
    record = chat.metrics.request(req.prompt_tokens)
    choices = await _begin(chat, req, record)
    chunks = ChunkFormat(req.completion_id, req.created, chat.model_name, req.chat_api)
    return EventStream(_chunks(chunks, req, choices, record), watch,
                       headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


async def _chunks(fmt: ChunkFormat, req: _Request, choices, record) -> AsyncIterator[bytes]:
    """The chunks, those of one event in one piece (a chat choice's role with its first
    text); the last choice's end goes with the tail (usage, ``[DONE]``), which follows it
    at once."""
    scored = getattr(choices, "log_probs", []) is not None
    begun: set[int] = set()
    held = b""
    try:
        with record.guard():  # the client leaving: cancelled
            async for event in choices.events():
                out, held = held, b""
                if req.chat_api and event.index not in begun:
                    begun.add(event.index)
                    out += fmt.first(event.index)
                if event.text or event.entries:
                    out += fmt.text(event.index, event.text,
                                    _log_probs(req, event.entries if scored else None))
                if event.finish is not None:
                    end = fmt.end(event.index, event.finish)
                    held, out = (end, out) if event.index == req.want.n - 1 else (b"",
                                                                                  out + end)
                if out:
                    yield out
        tokens = _finish_record(record, choices)
        tail = held + (fmt.usage(_usage(req.prompt_tokens, tokens))
                       if req.want.include_usage else b"")
    except Exception as e:  # after the 200: the error as an event, as vLLM sends it
        log.exception("a streamed completion failed")
        tail = held + data({"error": {"message": f"the reply failed: {type(e).__name__}",
                                      "type": "server_error", "param": None,
                                      "code": "internal"}})
    finally:
        # A client that left: closing the engine's iterators cancels their requests.
        await choices.aclose()
    yield Last(tail + DONE)


async def _answer(request: Request, req: _Request) -> Response:
    """The request's work, unless the client hangs up first: then it is cancelled, which
    frees its rows of the batch at once (a streamed answer stays watched until its
    end, by the same ``ClientWatch``)."""
    chat = request.app.state.chat
    watch = ClientWatch(request.receive)
    handed = False
    try:
        if req.want.stream:
            response = await _stream(chat, req, watch)
            handed = True  # the response stops the watch
            return response
        return await _complete(chat, req)
    except asyncio.CancelledError as e:
        if watch.absorb(e):  # the client left: nobody reads this
            return Response(status_code=499)
        raise
    finally:
        if not handed:
            watch.stop()


async def _guarded(request: Request, answer) -> Response:
    """Runs ``answer`` (async, the request's work): any failure in OpenAI's shape."""
    chat = request.app.state.chat
    try:
        check_key(request)
        return await answer()
    except ApiError as e:
        chat.metrics.errors.labels(f"api_{e.code}").inc()
        return e.response()
    except Exception:
        log.exception("unhandled error on %s", request.url.path)
        return ApiError(500, "internal server error", "internal", "server_error").response()


def _allow(request: Request, *methods: str) -> None:
    if request.method not in methods:
        raise ApiError(405, f"{request.method} is not allowed on {request.url.path}; "
                       f"use {', '.join(methods)}", "method_not_allowed",
                       headers={"Allow": ", ".join(methods)})


def _completion_endpoint(chat_api: bool):
    async def endpoint(request: Request) -> Response:
        async def answer() -> Response:
            _allow(request, "POST")
            req = await _parse(request, await read_body(request), chat_api)
            return await _answer(request, req)

        return await _guarded(request, answer)

    return endpoint


def _model_card(chat) -> dict[str, Any]:
    """The model: ``created`` the manifest's time, and its default generation settings
    (the chat room's) as ``xiaox_generation``."""
    manifest = chat.settings.model_path / "manifest.json"
    try:
        created = int(manifest.stat().st_mtime)
    except OSError:
        created = 0
    engine = chat.engine
    generation = dict(engine.model.manifest.generation) if engine is not None else {}
    return {"id": chat.model_name, "object": "model", "created": created, "owned_by": "xiaox",
            "xiaox_generation": generation}


async def list_models(request: Request) -> Response:
    async def answer() -> Response:
        _allow(request, "GET")
        return JSONResponse({"object": "list",
                             "data": [_model_card(request.app.state.chat)]})

    return await _guarded(request, answer)


async def retrieve_model(request: Request) -> Response:
    async def answer() -> Response:
        _allow(request, "GET")
        chat = request.app.state.chat
        if request.path_params["model"] != chat.model_name:
            raise ApiError(404, f"the model '{request.path_params['model']}' does not exist",
                           "model_not_found", param="model")
        return JSONResponse(_model_card(chat))

    return await _guarded(request, answer)


async def not_found(request: Request) -> Response:
    async def answer() -> Response:
        raise ApiError(404, f"no such path: {request.url.path}", "not_found")

    return await _guarded(request, answer)


def routes() -> list[Route]:
    """The API's routes; the last one answers every other path under /v1 (a 404)."""
    return [Route("/v1/chat/completions", _completion_endpoint(True), methods=METHODS),
            Route("/v1/completions", _completion_endpoint(False), methods=METHODS),
            Route("/v1/models", list_models, methods=METHODS),
            Route("/v1/models/{model:path}", retrieve_model, methods=METHODS),
            Route("/v1/{path:path}", not_found, methods=METHODS)]
