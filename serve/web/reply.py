"""小X's reply to one message, a task of its own (not tied to the sender's connection).

It publishes ``typing``, one ``token`` per piece of text and the final ``message`` to the
broker; the final message is stored come what may (an error gives a short notice instead).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import anyio

from serve.web.broker import Broker, BrokerUnavailable
from serve.web.lanes import CHAT_LANE, lane
from serve.web.metrics import Metrics
from serve.web.security.text import BOT_NAME

log = logging.getLogger("xiaox.app")

BUSY_REPLY = "（小X 现在太忙了，请稍后再试。）"
FAILED_REPLY = "（小X 走神了，没能回答。）"
UNREADABLE_REPLY = "（小X 没看懂这条消息。）"


async def try_publish(broker: Broker, room: str, event_type: str, data: dict) -> None:
    """Publish a log-only event; during an outage it is skipped (the final message is not)."""
    try:
        await broker.publish(room, event_type, data, timeout=2.0)
    except BrokerUnavailable:
        pass


async def reply(broker: Broker, engine: Any, metrics: Metrics, room: str, text: str, *,
                reply_id: str, reply_to: str, options: dict[str, Any]) -> None:
    """Stream the engine's reply to ``text`` into ``room``, then publish the whole of it."""
    from serve.runtime.engine import Overloaded

    metrics.active_replies.inc()
    pieces: list[str] = []
    error = None
    record = None
    try:
        await try_publish(broker, room, "typing", {"reply_id": reply_id, "user": BOT_NAME})
        record = metrics.request(await count_prompt_tokens(engine, text))
        stream = engine.stream(text, **lane(engine, CHAT_LANE), **options)
        async for delta in stream:
            pieces.append(delta)
            await try_publish(broker, room, "token", {"reply_id": reply_id, "delta": delta})
        record.finish_with(getattr(stream, "result", None))
    except Overloaded:
        error = "overloaded"
    except ValueError:  # nothing the tokenizer can read (emoji only, say)
        error = "unreadable"
    except asyncio.CancelledError:
        error = "shutdown"
        raise
    except Exception:
        log.exception("reply %s failed", reply_id)
        error = "failed"
    finally:
        metrics.active_replies.dec()
        if error:
            metrics.errors.labels(f"reply_{error}").inc()
        if record is not None:  # still open: it ended early
            record.finish("cancelled" if error == "shutdown" else "error")
        data = final_message("".join(pieces), error, reply_id=reply_id, reply_to=reply_to)
        # The final reply is stored come what may: retried until Redis is back
        # (bounded by the drain when the server stops).
        with anyio.CancelScope(shield=True):
            try:
                await broker.publish(room, "message", data,
                                     timeout=None if error != "shutdown" else 2.0)
                metrics.messages.labels("bot").inc()
            except BrokerUnavailable as e:
                log.error("reply %s lost: %s", reply_id, e)


async def count_prompt_tokens(engine: Any, text: str) -> int:
    """``prompt_tokens``, on the event loop for a short text, else in a worker thread."""
    from serve.runtime.search import INLINE_TOKENIZE_CHARS

    if len(text) <= INLINE_TOKENIZE_CHARS:
        return prompt_tokens(engine, text)
    return await asyncio.to_thread(prompt_tokens, engine, text)


def prompt_tokens(engine: Any, text: str) -> int:
    """The message's tokens as the API counts them (``usage.prompt_tokens``); ValueError
    when the tokenizer finds nothing to read. 0 for an engine without a model."""
    from serve.runtime.search import source_ids

    model = getattr(engine, "model", None)
    return len(source_ids(model, text)) if model is not None else 0


def final_message(reply: str, error: str | None, *, reply_id: str, reply_to: str) -> dict:
    """The data of the final ``message``: the reply, or a notice of what went wrong."""
    if error == "overloaded":
        reply = BUSY_REPLY
    elif error == "unreadable":
        reply = UNREADABLE_REPLY
    elif error is not None and not reply:
        reply = FAILED_REPLY
    data = {"role": "bot", "user": BOT_NAME, "text": reply or "……",
            "reply_id": reply_id, "reply_to": reply_to}
    if error:
        data["error"] = error
    return data
