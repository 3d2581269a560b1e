"""Property tests: any combination of decoding options either is refused with a clear
ValueError or decodes within its limits against the shipped model.

(The tokenizer round trip is tests/serve/runtime/test_tokenizer.py's property test. The app
publishes no OpenAPI description, so there is nothing for Schemathesis to read; the
fuzz tests of tests/serve/test_security.py and the tables of test_bad_input.py cover
the routes instead.)
"""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from serve.runtime.model import OnnxSeq2Seq
from serve.runtime.options import DecodingOptions
from serve.runtime.replies import ReplySources, select_reply

pytestmark = pytest.mark.timeout(300)

QUESTIONS = ["你好", "今天天气怎么样", "你叫什么名字？", "哈哈哈", "我好累啊"]
WRONG_TYPES = st.sampled_from([None, True, False, 2.5, "2", float("nan"), float("inf"),
                               [1], {"a": 1}])


def ints(low: int, high: int) -> st.SearchStrategy:
    return st.integers(low, high) | WRONG_TYPES


def floats(low: float, high: float) -> st.SearchStrategy:
    return st.floats(low, high, allow_nan=False) | st.integers(int(low), int(high)) \
        | WRONG_TYPES


OPTION_VALUES = {
    "beam_size": ints(-1, 4),
    "num_hypotheses": ints(0, 4),
    "length_penalty": floats(-2, 2),
    "repetition_penalty": floats(-1, 3),
    "no_repeat_ngram_size": ints(-1, 4),
    "min_length": ints(-1, 8),
    "max_length": ints(-1, 10),
    "sampling_temperature": floats(-1, 3),
    "sampling_topk": ints(-1, 40),
    "sampling_topp": floats(-0.5, 1.5),
    "seed": st.none() | st.integers(-3, 2**64) | WRONG_TYPES,
    "disable_unk": st.booleans() | WRONG_TYPES,
    # Iterables only here: a non-iterable is test_suppress_words_of_the_wrong_type's case.
    "suppress_words": st.lists(st.text(min_size=1, max_size=2), max_size=3).map(tuple)
    | st.text(min_size=1, max_size=2) | st.just((1, 2)) | st.just(("你",)),
    "return_scores": st.booleans(),
    "reply_mode": st.sampled_from([None, "hybrid", "generate", "retrieve", ""]) | WRONG_TYPES,
    "retrieval_candidates": ints(-1, 40),
    "generated_candidates": ints(-1, 10),
    "beam": st.integers(1, 3),  # a misspelt name must be refused, not ignored
}
@st.composite
def valid_options(draw) -> dict:
    """Options in range and consistent with each other: these must all decode."""
    beam_size = draw(st.integers(1, 3))
    max_length = draw(st.integers(1, 10))
    options = {
        "beam_size": beam_size,
        "num_hypotheses": draw(st.integers(1, beam_size)),
        "length_penalty": draw(st.floats(-1, 2)),
        "repetition_penalty": draw(st.floats(0.5, 3)),
        "no_repeat_ngram_size": draw(st.integers(0, 3)),
        "min_length": draw(st.integers(0, max_length)),
        "max_length": max_length,
        "sampling_temperature": draw(st.floats(0.05, 3)),
        "sampling_topk": 1 if beam_size > 1 else draw(st.integers(0, 40)),
        "sampling_topp": draw(st.floats(0.01, 1)),
        "seed": draw(st.none() | st.integers(0, 2**64)),
        "disable_unk": draw(st.booleans()),
        "suppress_words": draw(st.lists(st.text(min_size=1, max_size=2), max_size=3)
                               .map(tuple)),
        "return_scores": draw(st.booleans()),
        "reply_mode": draw(st.sampled_from([None, "hybrid", "generate"])),
        "retrieval_candidates": draw(st.integers(1, 8)),
    }
    names = draw(st.sets(st.sampled_from(sorted(options))))  # the rest keep their defaults
    if "num_hypotheses" in names:
        names.add("beam_size")
    chosen = {name: options[name] for name in names}
    if chosen.get("sampling_topk", 1) != 1 and chosen.get("beam_size", 1) == 1:
        chosen["generated_candidates"] = draw(st.integers(1, 3))
    return chosen


OPTIONS = st.one_of(valid_options().map(lambda o: ("valid", o)),
                    st.fixed_dictionaries({}, optional=OPTION_VALUES).map(lambda o: ("any", o)))


@pytest.fixture(scope="module")
def model(model_dir) -> OnnxSeq2Seq:
    return OnnxSeq2Seq.load(model_dir, intra_op_num_threads=1)


@pytest.fixture(scope="module")
def sources(model) -> ReplySources:
    return ReplySources.load(model, intra_op_num_threads=1)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(drawn=OPTIONS, question=st.sampled_from(QUESTIONS))
def test_any_options_are_refused_clearly_or_decode_within_their_limits(model, sources, drawn,
                                                                       question):
    kind, kwargs = drawn
    try:
        options = DecodingOptions.from_kwargs(**kwargs)
    except ValueError as e:
        assert kind == "any", f"consistent options refused: {e}"
        assert str(e).strip(), "a refusal must say why"
        event("refused")
        return
    event("decoded")
    result = select_reply(model, sources, question, options)
    assert isinstance(result.text, str)
    assert len(result.token_ids) <= options.max_length
    assert result.finish_reason in ("stop", "length")
    if result.finish_reason == "length":
        assert len(result.token_ids) == options.max_length
    else:
        assert len(result.token_ids) >= min(options.min_length, options.max_length)
    assert model.eos_id not in result.token_ids and model.bos_id not in result.token_ids
    if options.disable_unk:
        assert model.unk_id not in result.token_ids
    assert 1 <= len(result.hypotheses) <= options.num_hypotheses
    if options.return_scores:
        assert result.score is not None and not math.isnan(result.score)
    if options.no_repeat_ngram_size > 0 and options.beam_size == 1:
        n = options.no_repeat_ngram_size
        grams = [tuple(result.token_ids[i:i + n]) for i in range(len(result.token_ids) - n + 1)]
        assert len(grams) == len(set(grams))


@pytest.mark.parametrize("value", [5, None])
def test_suppress_words_of_the_wrong_type(value):
    with pytest.raises(ValueError, match="suppress_words"):
        DecodingOptions.from_kwargs(suppress_words=value)
