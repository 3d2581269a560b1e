"""serve.web.openai_fields: the API's caps, each a 400 that names the field."""

from __future__ import annotations

import pytest

from serve.runtime.options import CAPS
from serve.web.openai_fields import (
    ApiError,
    ApiLimits,
    decoding_options,
    last_user_text,
    prompt_text,
    wanted,
)
from serve.web.settings import Settings, api_ceilings, settings_from_env

USER = [{"role": "user", "content": "你好"}]


def refused(body: dict, limits: ApiLimits | None = None) -> ApiError:
    with pytest.raises(ApiError) as caught:
        decoding_options({"messages": USER, **body}, 40, limits)
    assert caught.value.status == 400
    return caught.value


@pytest.mark.parametrize(("body", "param"), [
    ({"max_tokens": 1_000_000}, "max_tokens"),
    ({"max_completion_tokens": 257}, "max_completion_tokens"),
    ({"min_tokens": 1_000_000}, "min_tokens"),
    ({"min_tokens": 300, "max_tokens": 256}, "min_tokens"),
    ({"beam_size": 5000}, "beam_size"),
    ({"beam_size": 9}, "beam_size"),
    ({"beam_size": 8, "num_hypotheses": 9}, "num_hypotheses"),
    ({"no_repeat_ngram_size": 9}, "no_repeat_ngram_size"),
    ({"suppress_words": ["词"] * 1 + [f"w{i}" for i in range(16)]}, "suppress_words"),
    ({"suppress_words": ["长" * 17]}, "suppress_words"),
    ({"suppress_words": ["字" * 12 + str(i) for i in range(1500)]}, "suppress_words"),
])
def test_each_cap_is_a_400_naming_its_field(body, param):
    assert refused(body).param == param


def test_the_caps_at_their_limits_are_accepted():
    options = decoding_options({"messages": USER, "max_tokens": 256, "min_tokens": 256,
                                "beam_size": 8, "num_hypotheses": 8,
                                "no_repeat_ngram_size": 8,
                                "suppress_words": ["长" * 14 + f"{i:02d}" for i in range(16)]},
                               40, ApiLimits())
    assert options["max_length"] == 256 and options["beam_size"] == 8


def test_a_server_lowers_a_cap_and_its_default_follows():
    limits = ApiLimits(max_tokens=10, beam_size=2)
    assert refused({"beam_size": 3}, limits).param == "beam_size"
    assert refused({"max_tokens": 11}, limits).param == "max_tokens"
    # the room's reply_max_tokens (40) as the API's default, within the API's cap
    assert decoding_options({"messages": USER}, 40, limits)["max_length"] == 10


def test_n_is_capped_by_the_setting():
    assert wanted({"n": 4}, True).n == 4
    with pytest.raises(ApiError) as caught:
        wanted({"n": 3}, True, max_n=2)
    assert caught.value.param == "n"


def test_the_prompt_counts_every_message():
    long_system = [{"role": "system", "content": "设" * 1500},
                   {"role": "user", "content": [{"type": "text", "text": "问" * 501}]}]
    with pytest.raises(ApiError) as caught:
        last_user_text({"messages": long_system})
    assert (caught.value.param, caught.value.code) == ("messages",
                                                       "context_length_exceeded")
    assert last_user_text({"messages": long_system}, max_chars=2001) == "问" * 501
    with pytest.raises(ApiError) as caught:
        prompt_text({"prompt": "字" * 2001})
    assert caught.value.param == "prompt"
    assert prompt_text({"prompt": ["字" * 2000]}) == "字" * 2000


def test_limits_come_from_the_settings_and_stay_under_the_ceilings():
    assert ApiLimits.of(Settings()) == ApiLimits()  # the same documented defaults
    assert api_ceilings()["api_max_tokens"] == CAPS["max_length"]
    lowered = settings_from_env({"XIAOX_API_MAX_BEAM_SIZE": "2"})
    assert ApiLimits.of(lowered).beam_size == 2
    for name, ceiling in api_ceilings().items():
        with pytest.raises(ValueError, match=name):
            settings_from_env({f"XIAOX_{name.upper()}": str(ceiling + 1)})
    with pytest.raises(ValueError, match="reply_max_tokens"):
        settings_from_env({"XIAOX_REPLY_MAX_TOKENS": "5000"})
