"""The OpenAI API's request fields, read strictly: what this server does with each, the
caps, and OpenAI's error shape (``ApiError``).

A field is either implemented (mapped onto ``DecodingOptions`` or handled by the API), or
harmless and accepted (``user``, ``store``, ``metadata``, ``service_tier``, ...), or not
implemented: then a 400 names it (``param``), unless its value asks for nothing
(``response_format: {"type": "text"}``, ``tools: []``, ``logit_bias: {}``, ...). A field
that is null counts as absent. Unknown fields are a 400 too.

**Decoding: the model folder's defaults, then the request's fields.** The options start
from the folder's default generation settings (its manifest's ``generation``, as the chat
room's; a folder without them: ``DecodingOptions``' own defaults, greedy), except
``max_length``, which is the API's ``max_tokens`` default (the server's
``reply_max_tokens``). Every field the request sets then wins, with OpenAI's meanings:
``temperature: 0`` is greedy (``top_k`` 1); ``temperature`` or ``top_p`` without ``top_k``
mean sampling (with the folder's ``top_k`` when the folder samples, else from the whole
vocabulary). A request that asks for greedy decoding (``temperature`` 0 or ``top_k`` 1)
or beam search (``beam_size`` > 1) drops the folder's sampling defaults (top_k, top_p,
temperature, seed, generated_candidates); one that asks for sampling drops its beam-search
defaults (``serve.runtime.flags.folder_defaults``, the rule ``serve ask`` follows too).
The folder's ``min_length`` is capped at the request's max_length. A request that sets
nothing gets the folder's defaults as they are: a reply that must be the same every time
says so (``temperature: 0``, or a ``seed``).
"""

from __future__ import annotations

import functools
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from serve.web.security.text import InvalidInput, clean_text, decode_utf8

MAX_TOP_LOGPROBS = 5
MAX_STOP = 4
MAX_STOP_CHARS = 32
ROLES = {"system", "developer", "user", "assistant"}

# Accepted and without effect here: who asked, storage, billing, the seed of other APIs.
HARMLESS = {"model", "user", "store", "metadata", "service_tier", "stream_options",
            "prompt_cache_key", "safety_identifier"}
# Not implemented, but a value asking for nothing is accepted: field -> that test.
NOTHING_ASKED = {
    "response_format": lambda v: v == {"type": "text"},
    "tools": lambda v: v == [],
    "tool_choice": lambda v: v == "none",
    "functions": lambda v: v == [],
    "function_call": lambda v: v == "none",
    "logit_bias": lambda v: v == {},
    "modalities": lambda v: v == ["text"],
    "parallel_tool_calls": lambda v: v is False,
    "audio": lambda v: False,
    "prediction": lambda v: False,
    "reasoning_effort": lambda v: False,
    "web_search_options": lambda v: False,
    "verbosity": lambda v: False,
    # /v1/completions
    "echo": lambda v: v is False,
    "best_of": lambda v: v == 1,
    "suffix": lambda v: v == "",
}
ALIASES = {"max_tokens": "max_length", "max_completion_tokens": "max_length",
           "min_tokens": "min_length", "top_k": "sampling_topk", "top_p": "sampling_topp",
           "temperature": "sampling_temperature"}
# Read by the API itself, not by DecodingOptions.
API_FIELDS = {"messages", "prompt", "stream", "n", "stop", "logprobs", "top_logprobs"}


@dataclass(frozen=True)
class ApiLimits:
    """What one request may ask: the server's ``api_max_*`` settings (their defaults
    here), each at most the runtime's ceiling (``serve.runtime.options.CAPS``)."""

    max_tokens: int = 256
    n: int = 4
    beam_size: int = 8
    no_repeat_ngram_size: int = 8
    suppress_words: int = 16
    suppress_word_chars: int = 16
    prompt_chars: int = 2_000

    @classmethod
    def of(cls, settings: Any) -> ApiLimits:
        return cls(**{f.name: getattr(settings, "api_" + f.name if f.name == "max_tokens"
                                      else "api_max_" + f.name) for f in fields(cls)})

    def caps(self) -> dict[str, int]:
        """As ``DecodingOptions`` caps (``serve.runtime.options.check_caps``)."""
        return {"max_length": self.max_tokens, "min_length": self.max_tokens,
                "beam_size": self.beam_size, "num_hypotheses": self.beam_size,
                "no_repeat_ngram_size": self.no_repeat_ngram_size,
                "suppress_words": self.suppress_words,
                "suppress_word_chars": self.suppress_word_chars}


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str,
                 error_type: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None):
        # Messages may quote the client's own strings: a lone surrogate in them must not
        # break the JSON encoder, so anything UTF-8 cannot carry is escaped.
        super().__init__(_printable(message))
        param = _printable(param) if param is not None else None
        self.status, self.code, self.error_type, self.param = status, code, error_type, param
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": str(self), "type": self.error_type, "param": self.param,
                          "code": self.code}}
        headers = dict(self.headers or {})
        if self.status == 429:
            headers["Retry-After"] = "1"
        return JSONResponse(body, status_code=self.status, headers=headers or None)


def check_key(request: Request) -> None:
    expected = request.app.state.chat.settings.api_key
    if not expected:
        return
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                             expected.encode()):
        raise ApiError(401, "a valid API key is required (Authorization: Bearer ...)",
                       "invalid_api_key", "authentication_error")


async def read_body(request: Request) -> dict[str, Any]:
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


def _refuse_unimplemented(body: dict[str, Any], known: frozenset[str]) -> None:
    for key, value in body.items():
        if value is None or key in known or key in HARMLESS or key in ALIASES \
                or key in API_FIELDS:
            continue
        if key in NOTHING_ASKED:
            if not NOTHING_ASKED[key](value):
                raise ApiError(400, f"'{key}' is not supported by this server (a seq2seq "
                               f"chit-chat model): {json.dumps(value)[:80]}",
                               "unsupported_field", param=key)
            continue
        raise ApiError(400, f"unknown field '{key}'", "unknown_field", param=key)


def _asked(body: dict[str, Any], known: frozenset[str], folder_topk: int) -> dict[str, Any]:
    """The request's own fields as ``DecodingOptions`` names. OpenAI's temperature 0 means
    greedy (top_k 1); temperature or top_p without top_k (and no beam) mean sampling: with
    the folder's top_k when the folder samples, else from the whole vocabulary."""
    asked: dict[str, Any] = {}
    for key, value in body.items():
        if value is None:
            continue
        if key in known:
            asked[key] = value
        elif key in ALIASES:
            asked[ALIASES[key]] = value
    if asked.get("sampling_temperature") == 0:
        asked.pop("sampling_temperature")
        asked.setdefault("sampling_topk", 1)
    elif ("sampling_temperature" in asked or "sampling_topp" in asked) \
            and "sampling_topk" not in asked and asked.get("beam_size", 1) == 1:
        asked["sampling_topk"] = folder_topk if folder_topk != 1 else 0
    return asked


def decoding_options(body: dict[str, Any], default_max_tokens: int,
                     limits: ApiLimits | None = None,
                     generation: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """OpenAI request fields -> ``DecodingOptions`` keyword arguments (checked, within
    ``limits``, else the defaults): the model folder's default generation settings
    (``generation``, but its max_length), then ``default_max_tokens`` (at most
    ``limits.max_tokens``) as max_length, then the request's own fields (the module
    docstring gives the rule)."""
    return checked_options(body, default_max_tokens, limits, generation)[0]


def checked_options(body: dict[str, Any], default_max_tokens: int,
                    limits: ApiLimits | None = None,
                    generation: Mapping[str, Any] | None = None
                    ) -> tuple[dict[str, Any], Any]:
    """``decoding_options``' keyword arguments, and the ``DecodingOptions`` made of them:
    built and validated once per request, and handed on as they are (to the choices and
    the engine)."""
    from serve.runtime.flags import folder_defaults
    from serve.runtime.options import DecodingOptions, check_caps

    limits = limits or ApiLimits()
    known = _option_names()
    _refuse_unimplemented(body, known)
    generation = {k: v for k, v in (generation or {}).items() if k != "max_length"}
    asked = _asked(body, known, generation.get("sampling_topk", 1))
    options = {**folder_defaults(generation, asked),
               "max_length": min(default_max_tokens, limits.max_tokens), **asked}
    length = options["max_length"]
    if isinstance(length, int) and not isinstance(length, bool) \
            and length > limits.max_tokens:
        param = next((k for k in ("max_completion_tokens", "max_tokens", "max_length")
                      if body.get(k) is not None), "max_tokens")
        raise ApiError(400, f"'{param}' must be at most {limits.max_tokens}, got {length}",
                       "invalid_max_tokens", param=param)
    minimum = options.get("min_length")
    if "min_length" not in asked and isinstance(minimum, int) and isinstance(length, int) \
            and minimum > length:
        options["min_length"] = length  # the folder's minimum, within the request's max
    try:  # the runtime's ceilings, then this server's (lower) caps
        decoding = DecodingOptions.from_kwargs(**options)
        check_caps(decoding, limits.caps())
    except (ValueError, TypeError) as e:
        raise ApiError(400, str(e), "invalid_decoding_option",
                       param=_param_of(str(e), body)) from None
    return options, decoding


@functools.cache
def _option_names() -> frozenset[str]:
    from serve.runtime.options import DecodingOptions

    return frozenset(f.name for f in fields(DecodingOptions))


def _param_of(message: str, body: dict[str, Any]) -> str | None:
    """The request field a DecodingOptions error is about (it begins with the option's
    name), as the client spelt it."""
    option = message.split(" ", 1)[0]
    for key in body:
        if key == option or ALIASES.get(key) == option:
            return key
    return None


def _integer(body: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(400, f"'{name}' must be an integer in [{low}, {high}], got "
                       f"{json.dumps(value)[:40]}", f"invalid_{name}", param=name)
    return value


def stop_strings(body: dict[str, Any]) -> tuple[str, ...]:
    """``stop``: a string or a list of up to 4, each 1 to 32 characters."""
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(
            isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOP} "
                       f"strings of 1 to {MAX_STOP_CHARS} characters", "invalid_stop",
                       param="stop")
    return tuple(dict.fromkeys(stops))


def _text_content(content: Any) -> Any:
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        return "".join(part.get("text", "") for part in content
                       if isinstance(part, dict) and part.get("type") == "text"
                       and isinstance(part.get("text"), str))
    return content


def _prompt_length(messages: list[dict], max_chars: int) -> None:
    """All the messages' text together within ``max_chars``: unread turns cost the
    parsing and checking of them, and a client must learn its prompt is too long."""
    total = sum(len(t) for m in messages
                if isinstance(t := _text_content(m.get("content")), str))
    if total > max_chars:
        raise ApiError(400, f"the messages' contents are {total} characters, more than "
                       f"this server's {max_chars}", "context_length_exceeded",
                       param="messages")


def last_user_text(body: dict[str, Any], max_chars: int = ApiLimits.prompt_chars) -> str:
    """The last ``user`` message: the model reads that one only (a single-turn model);
    system, developer and assistant turns are checked, then left unread. All of them
    together have at most ``max_chars`` characters."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "invalid_messages",
                       param="messages")
    last = None
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(400, "every message must be an object", "invalid_messages",
                           param=f"messages[{i}]")
        role = message.get("role")
        if role not in ROLES:
            raise ApiError(400, f"messages[{i}]: unknown role {json.dumps(role)[:40]}; "
                           f"known: {', '.join(sorted(ROLES))}", "invalid_role",
                           param=f"messages[{i}].role")
        if message.get("content") is None:
            raise ApiError(400, f"messages[{i}] has no content", "invalid_content",
                           param=f"messages[{i}].content")
        if role == "user":
            last = message
    if last is None:
        raise ApiError(400, "no message with role 'user'", "invalid_messages",
                       param="messages")
    _prompt_length(messages, max_chars)
    try:
        return clean_text(_text_content(last["content"]), field="content",
                          max_chars=max_chars)
    except InvalidInput as e:
        raise ApiError(400, str(e), "invalid_content", param="messages") from None


def prompt_text(body: dict[str, Any], max_chars: int = ApiLimits.prompt_chars) -> str:
    """``/v1/completions``' ``prompt``: a string, or a list of one string, of at most
    ``max_chars`` characters."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string or a list of one string",
                       "invalid_prompt", param="prompt")
    if len(prompt) > max_chars:
        raise ApiError(400, f"'prompt' is {len(prompt)} characters, more than this "
                       f"server's {max_chars}", "context_length_exceeded", param="prompt")
    try:
        return clean_text(prompt, field="prompt", max_chars=max_chars)
    except InvalidInput as e:
        raise ApiError(400, str(e), "invalid_prompt", param="prompt") from None


@dataclass(frozen=True)
class Wanted:
    """What the API itself does with a request (beside its decoding options)."""

    n: int = 1
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    candidates: bool = False  # the xiaox_candidates extension (chat: logprobs true)
    stream: bool = False
    include_usage: bool = False


def wanted(body: dict[str, Any], chat_api: bool, max_n: int = ApiLimits.n) -> Wanted:
    """n, stop, logprobs (chat: true/false and top_logprobs; completions: 0-5), stream."""
    if chat_api:
        flag = body.get("logprobs")
        if flag is not None and not isinstance(flag, bool):
            raise ApiError(400, "'logprobs' must be true or false", "invalid_logprobs",
                           param="logprobs")
        top = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
        if top and not flag:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true",
                           "invalid_top_logprobs", param="top_logprobs")
        want = Wanted(logprobs=bool(flag), top_logprobs=top, candidates=bool(flag))
    else:
        top = _integer(body, "logprobs", -1, 0, MAX_TOP_LOGPROBS)
        want = Wanted(logprobs=top >= 0, top_logprobs=max(top, 0))
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "invalid_stream",
                       param="stream")
    stream_options = body.get("stream_options") or {}
    include_usage = isinstance(stream_options, dict) and bool(
        stream_options.get("include_usage"))
    return replace(want, n=_integer(body, "n", 1, 1, max_n), stop=stop_strings(body),
                   stream=stream, include_usage=include_usage)
