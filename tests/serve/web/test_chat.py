"""``Chat`` without a server: the room's decoding, the engine setting, health problems."""

from __future__ import annotations

from types import SimpleNamespace

from serve.web.broker import InProcessBroker
from serve.web.chat import Chat, _import
from serve.web.metrics import Metrics
from serve.web.settings import Settings


def chat_with(generation: dict | None) -> Chat:
    chat = Chat(Settings(secret_key="k" * 40, reply_max_tokens=12), Metrics())
    if generation is not None:
        manifest = SimpleNamespace(generation=generation)
        chat.engine = SimpleNamespace(model=SimpleNamespace(manifest=manifest), running=True)
    return chat


def test_reply_options_are_the_folders_generation_settings():
    chat = chat_with({"reply_mode": "hybrid", "sampling_topp": 0.8})
    assert chat.reply_options == {"reply_mode": "hybrid", "sampling_topp": 0.8,
                                  "max_length": 12}


def test_reply_options_default_to_nucleus_sampling():
    for chat in (chat_with(None), chat_with({})):
        options = chat.reply_options
        assert options["sampling_topp"] == 0.9 and options["sampling_temperature"] == 0.7
        assert options["max_length"] == 12


def test_the_engine_setting_names_a_module_attribute():
    assert _import("serve.web.chat:Chat") is Chat


async def test_problems_until_started_and_while_closing():
    chat = chat_with(None)
    assert chat.problems() == ["model: the model is loading", "broker: not started"]
    chat = chat_with({})
    chat.model_error = None
    chat.broker = InProcessBroker()
    await chat.broker.start()
    assert chat.problems() == []
    chat.closing = True
    assert chat.problems() == ["shutting down"]
    await chat.broker.close()


async def test_sends_are_limited_per_session_and_per_address():
    chat = Chat(Settings(secret_key="k" * 40, rate_limit_messages=2, rate_limit_ip_messages=3),
                Metrics())
    assert [(await chat.allow_send("s1", "ip"))[0] for _ in range(3)] == [True, True, False]
    assert (await chat.allow_send("s2", "ip"))[0]  # a new session, the address's third
    allowed, wait = await chat.allow_send("s3", "ip")
    assert not allowed and 0 < wait <= 60
    assert (await chat.allow_send("s3", "other ip"))[0]
