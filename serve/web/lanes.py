"""The engine's two lanes: the chat room's replies and the ``/v1`` API's requests, each
with its share of the decoder batch and of the queue (``serve.runtime.lanes``), so that
neither can starve the other. The shares are settings (``api_batch_share``,
``api_queue_share``); the chat room has the rest, each lane at least one row and place.
"""

from __future__ import annotations

from typing import Any

CHAT_LANE = "chat"
API_LANE = "api"


def engine_lanes(settings: Any) -> dict[str, Any]:
    """The lanes ``Engine(lanes=...)`` takes, from the settings."""
    from serve.runtime.lanes import Lane

    def split(total: int, share: float) -> tuple[int, int]:
        api = min(max(1, round(total * share)), total)
        return max(1, total - api), api

    chat_rows, api_rows = split(settings.max_batch_size, settings.api_batch_share)
    chat_queue, api_queue = split(settings.max_queue, settings.api_queue_share)
    return {CHAT_LANE: Lane(rows=chat_rows, queue=chat_queue),
            API_LANE: Lane(rows=api_rows, queue=api_queue)}


def lane(engine: Any, name: str) -> dict[str, str]:
    """``lane=name`` for an engine that has lanes (the TensorFlow baseline has none)."""
    return {"lane": name} if name in (getattr(engine, "lanes", None) or {}) else {}
