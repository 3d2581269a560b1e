"""小X's reply task with a stand-in engine: the events it publishes, and what errors become."""

from __future__ import annotations

import pytest

from serve.runtime.engine import Overloaded
from serve.web.broker import InProcessBroker
from serve.web.metrics import Metrics
from serve.web.reply import BUSY_REPLY, FAILED_REPLY, UNREADABLE_REPLY, reply


class FakeEngine:
    def __init__(self, pieces: list[str], error: Exception | None = None):
        self.pieces, self.error, self.options = pieces, error, None

    async def stream(self, text: str, **options):
        self.options = options
        for piece in self.pieces:
            yield piece
        if self.error is not None:
            raise self.error


async def run(engine: FakeEngine) -> list[tuple[str, dict]]:
    broker = InProcessBroker()
    await broker.start()
    await reply(broker, engine, Metrics(), "r", "你好", reply_id="abc", reply_to="1-0",
                options={"max_length": 5})
    events = await broker.replay("r", "0-0")
    await broker.close()
    return [(e.type, e.data) for e in events]


async def test_typing_then_one_token_a_piece_then_the_whole_message():
    engine = FakeEngine(["你", "好"])
    events = await run(engine)
    assert [t for t, _ in events] == ["typing", "token", "token", "message"]
    assert [d["delta"] for t, d in events if t == "token"] == ["你", "好"]
    final = events[-1][1]
    assert (final["role"], final["text"], final["reply_id"], final["reply_to"]) == (
        "bot", "你好", "abc", "1-0")
    assert "error" not in final and engine.options == {"max_length": 5}  # no lanes: none


@pytest.mark.parametrize(("pieces", "error", "text", "reason"), [
    ([], Overloaded(), BUSY_REPLY, "overloaded"),
    ([], ValueError("nothing to read"), UNREADABLE_REPLY, "unreadable"),
    ([], RuntimeError("boom"), FAILED_REPLY, "failed"),
    (["半句"], RuntimeError("boom"), "半句", "failed"),  # what was said is kept
])
async def test_an_error_still_ends_with_a_message(pieces, error, text, reason):
    *_, (event_type, final) = await run(FakeEngine(pieces, error))
    assert event_type == "message"
    assert (final["text"], final["error"]) == (text, reason)


async def test_an_empty_reply_is_an_ellipsis():
    *_, (_, final) = await run(FakeEngine([]))
    assert final["text"] == "……" and "error" not in final
