"""The OpenAI API through the official ``openai`` SDK against a real server process: stop,
logprobs, penalties, n, /v1/completions, and the error shapes."""

from __future__ import annotations

import json
from collections import Counter

import httpx
import pytest

from tests.serve._helpers_server import ServerProcess

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.timeout(180)

KEY = "test-api-key-sdk-0123456789"
# Decoded token by token, on every model folder: greedy (temperature 0), whatever the
# folder's default generation settings, where a test needs the same reply every time.
GENERATE = {"reply_mode": "generate"}
PLAIN = {**GENERATE, "temperature": 0}


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    process = ServerProcess(model_dir, tmp_path_factory.mktemp("openai-sdk"),
                            env={"XIAOX_API_KEY": KEY}).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0,
                       timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def manifest(model_dir) -> dict:
    return json.loads((model_dir / "manifest.json").read_text())


@pytest.fixture(scope="module")
def model_name(manifest) -> str:
    return manifest["name"]


@pytest.fixture(scope="module")
def hybrid(model_dir) -> bool:
    """Whether the folder has a reply index (then replies are chosen by default)."""
    return (model_dir / "index").is_dir()


def chat(client, model_name, text="今天天气怎么样", **extra):
    return client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": text}], **extra)


def streamed(client, model_name, text="今天天气怎么样", **extra):
    return list(client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": text}], stream=True,
        **extra))


def stream_texts(chunks) -> dict[int, str]:
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    return texts


def stream_finishes(chunks) -> dict[int, str]:
    return {c.index: c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason}


# -- chat completions --------------------------------------------------------------------


def test_multi_turn_reads_the_last_user_turn(client, model_name):
    one = chat(client, model_name, "你好", **{"extra_body": PLAIN})
    turns = client.chat.completions.create(model=model_name, extra_body=PLAIN, messages=[
        {"role": "system", "content": "你是小X"}, {"role": "user", "content": "晚安"},
        {"role": "assistant", "content": "晚安"}, {"role": "user", "content": "你好"}])
    assert turns.choices[0].message.content == one.choices[0].message.content
    assert turns.object == "chat.completion" and turns.choices[0].message.role == "assistant"


def test_stop_ends_the_reply_before_the_stop_string(client, model_name):
    body = {**PLAIN, "min_tokens": 6}
    whole = chat(client, model_name, max_tokens=12, extra_body=body).choices[0].message.content
    assert len(whole) >= 3
    stop = whole[2:4]
    cut = whole[:whole.index(stop)]
    stopped = chat(client, model_name, max_tokens=12, stop=[stop, "不会出现的字符串"],
                   extra_body=body)
    assert stopped.choices[0].message.content == cut
    assert stopped.choices[0].finish_reason == "stop"
    chunks = streamed(client, model_name, max_tokens=12, stop=stop, extra_body=body)
    assert stream_texts(chunks) == {0: cut} and stream_finishes(chunks) == {0: "stop"}
    never = chat(client, model_name, max_tokens=12, stop="不会出现的字符串", extra_body=body)
    assert never.choices[0].message.content == whole


def test_stop_on_a_chosen_reply(client, model_name, hybrid):
    if not hybrid:
        pytest.skip("the model folder has no reply index")
    whole = chat(client, model_name, "今天好冷", seed=1).choices[0].message.content
    stop = whole[1:2]
    cut = whole[:whole.index(stop)]
    stopped = chat(client, model_name, "今天好冷", seed=1, stop=stop)
    assert stopped.choices[0].message.content == cut
    assert stopped.choices[0].finish_reason == "stop"
    chunks = streamed(client, model_name, "今天好冷", seed=1, stop=stop)
    assert stream_texts(chunks) == {0: cut}


def test_logprobs_and_top_logprobs_are_the_decoders(client, model_name):
    response = chat(client, model_name, max_tokens=8, logprobs=True, top_logprobs=3,
                    extra_body=PLAIN)
    choice = response.choices[0]
    content = choice.logprobs.content
    assert len(content) == response.usage.completion_tokens
    assert "".join(t.token for t in content) == choice.message.content
    for token in content:
        assert token.logprob <= 0 and token.bytes == list(token.token.encode())
        assert len(token.top_logprobs) == 3
        assert [t.logprob for t in token.top_logprobs] == sorted(
            (t.logprob for t in token.top_logprobs), reverse=True)
        assert token.top_logprobs[0].token == token.token  # greedy: the best one
        assert token.top_logprobs[0].logprob == token.logprob
    chunks = streamed(client, model_name, max_tokens=8, logprobs=True, top_logprobs=3,
                      extra_body=PLAIN)
    streamed_content = [t for ch in chunks for c in ch.choices if c.logprobs
                        for t in c.logprobs.content or []]
    assert streamed_content == content
    plain = chat(client, model_name, max_tokens=8, extra_body=PLAIN).choices[0]
    assert plain.logprobs is None


def test_logprobs_of_a_chosen_reply_are_the_scoring_graphs(client, model_name, hybrid):
    if not hybrid:
        pytest.skip("the model folder has no reply index")
    response = chat(client, model_name, "今天好冷", logprobs=True, seed=3)
    choice = response.choices[0]
    extra = choice.model_extra
    assert extra["xiaox_candidates"][0]["text"] == choice.message.content
    content = choice.logprobs.content
    assert content and all(t.top_logprobs == [] and t.logprob <= 0 for t in content)


def test_penalties_discourage_repeats(client, model_name):
    def repeats(**penalty) -> int:
        response = chat(client, model_name, "哈哈哈哈哈", max_tokens=20, logprobs=True,
                        extra_body={**PLAIN, "min_tokens": 20}, **penalty)
        tokens = [t.token for t in response.choices[0].logprobs.content]
        return max(Counter(tokens).values())

    plain = repeats()
    assert repeats(frequency_penalty=2.0) <= plain
    assert repeats(presence_penalty=2.0) <= plain
    assert repeats(presence_penalty=-2.0, frequency_penalty=-2.0) >= repeats(
        frequency_penalty=2.0)
    with pytest.raises(openai.BadRequestError) as error:
        chat(client, model_name, presence_penalty=2.5)
    assert error.value.param == "presence_penalty"


def test_n_seeded_samples(client, model_name, manifest):
    sampling = {"temperature": 1.0, "seed": 5, "max_tokens": 8, "extra_body": GENERATE}
    response = chat(client, model_name, n=3, **sampling)
    assert [c.index for c in response.choices] == [0, 1, 2]
    texts = [c.message.content for c in response.choices]
    chunks = streamed(client, model_name, n=3, **sampling)
    assert set(stream_texts(chunks)) == set(stream_finishes(chunks)) == {0, 1, 2}
    if manifest["quantization"] == "none":
        # fp32: choice i is seed + i, batched or alone (int8 quantizes activations over
        # the whole batch: three rows sampled together may differ from each alone)
        assert stream_texts(chunks) == dict(enumerate(texts))
        for i, text in enumerate(texts):
            alone = chat(client, model_name, **{**sampling, "seed": 5 + i})
            assert alone.choices[0].message.content == text
    assert response.usage.completion_tokens >= 3
    with pytest.raises(openai.BadRequestError) as error:
        chat(client, model_name, n=2, extra_body=PLAIN)  # greedy has one reply
    assert error.value.param == "n"


def test_n_best_candidates_in_hybrid_mode(client, model_name, hybrid):
    if not hybrid:
        pytest.skip("the model folder has no reply index")
    # temperature 0: the same candidates every time (one greedy, the retrieved ones)
    best = chat(client, model_name, "今天好冷", temperature=0).choices[0].message.content
    response = chat(client, model_name, "今天好冷", n=3, temperature=0)
    texts = [c.message.content for c in response.choices]
    assert texts[0] == best and len(set(texts)) == 3
    chunks = streamed(client, model_name, "今天好冷", n=3, temperature=0)
    assert stream_texts(chunks) == dict(enumerate(texts))


# -- /v1/completions and /v1/models ------------------------------------------------------


def test_text_completions_streamed_and_not(client, model_name):
    response = client.completions.create(model=model_name, prompt="今天天气怎么样",
                                         max_tokens=8, extra_body=PLAIN)
    assert response.object == "text_completion" and response.id.startswith("cmpl-")
    text = response.choices[0].text
    assert text and response.choices[0].finish_reason in ("stop", "length")
    assert response.usage.completion_tokens >= 1
    chunks = list(client.completions.create(model=model_name, prompt=["今天天气怎么样"],
                                            max_tokens=8, stream=True, extra_body=PLAIN))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == \
        response.choices[0].finish_reason
    scored = client.completions.create(model=model_name, prompt="你好", max_tokens=5,
                                       logprobs=2, extra_body=PLAIN).choices[0]
    assert "".join(scored.logprobs.tokens) == scored.text
    assert all(len(top) == 2 for top in scored.logprobs.top_logprobs)
    assert scored.logprobs.text_offset[0] == 0
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=model_name, prompt="你好", echo=True)
    assert error.value.param == "echo"


def test_models_have_a_time_and_the_default_generation(client, model_name, manifest,
                                                       model_dir):
    models = client.models.list().data
    assert [m.id for m in models] == [model_name]
    assert models[0].created == int((model_dir / "manifest.json").stat().st_mtime) > 0
    assert models[0].model_extra["xiaox_generation"] == manifest.get("generation", {})
    assert client.models.retrieve(model_name).id == model_name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


# -- what is refused, and how -----------------------------------------------------------


@pytest.mark.parametrize(("extra", "param"), [
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"logit_bias": {"5": 10}}, "logit_bias"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"parallel_tool_calls": True}, "parallel_tool_calls"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"max_tokens": 257}, "max_tokens"),
    ({"max_completion_tokens": 1000}, "max_completion_tokens"),
    ({"n": 5}, "n"),
    ({"top_logprobs": 6, "logprobs": True}, "top_logprobs"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": "x" * 33}, "stop"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
])
def test_unimplemented_fields_and_caps_are_400s_naming_the_field(client, model_name, extra,
                                                                 param):
    with pytest.raises(openai.BadRequestError) as error:
        chat(client, model_name, **extra)
    assert error.value.param == param and error.value.code and error.value.type


def test_harmless_fields_and_empty_asks_are_accepted(client, model_name):
    response = chat(client, model_name, user="someone", store=False, metadata={"a": "b"},
                    service_tier="auto", seed=3, stream_options=None,
                    response_format={"type": "text"}, logit_bias={}, modalities=["text"],
                    max_completion_tokens=5, extra_body=PLAIN)
    assert response.choices[0].message.content


def test_bad_messages_are_400s(client, model_name):
    for messages, param in (
            ([{"role": "user", "content": "你好"}, {"role": "robot", "content": "hi"}],
             "messages[1].role"),
            ([{"role": "user"}], "messages[0].content"),
            ([{"role": "system", "content": "你是小X"}], "messages")):
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(model=model_name, messages=messages)
        assert error.value.param == param


def test_every_v1_error_is_openais_shape(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for method, path, status in (("GET", "/v1/nothing", 404),
                                     ("POST", "/v1/embeddings", 404),
                                     ("GET", "/v1/chat/completions", 405),
                                     ("DELETE", "/v1/models", 405),
                                     ("POST", "/v1/completions", 415)):
            response = c.request(method, path, headers=auth)
            assert response.status_code == status, (method, path, response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert c.get("/v1/chat/completions", headers=auth).headers["allow"] == "POST"
        unauthorized = c.get("/v1/nothing").json()["error"]
        assert unauthorized["code"] == "invalid_api_key"
