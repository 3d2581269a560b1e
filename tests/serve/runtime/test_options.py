"""DecodingOptions: keyword-only, checked, documented, and CTranslate2's names."""

from __future__ import annotations

import ast
import re
from dataclasses import asdict, fields

import pytest

from serve.runtime.options import CAPS, MAX_LENGTH, DecodingOptions, check_caps, option_docs

# CTranslate2's Translator.translate_batch defaults, read from ctranslate2 4.8.5
# (https://opennmt.net/CTranslate2/python/ctranslate2.Translator.html#ctranslate2.Translator.translate_batch):
# our option -> (CTranslate2's name, its default). Checked against the real library below
# (the test extra installs it; a clone without it skips that check and says why).
CTRANSLATE2_VERSION = "4.8.5"
CTRANSLATE2 = {
    "beam_size": ("beam_size", 2),
    "num_hypotheses": ("num_hypotheses", 1),
    "length_penalty": ("length_penalty", 1),
    "repetition_penalty": ("repetition_penalty", 1),
    "no_repeat_ngram_size": ("no_repeat_ngram_size", 0),
    "disable_unk": ("disable_unk", False),
    "min_length": ("min_decoding_length", 1),
    "max_length": ("max_decoding_length", 256),
    "sampling_topk": ("sampling_topk", 1),
    "sampling_topp": ("sampling_topp", 1),
    "sampling_temperature": ("sampling_temperature", 1),
    "return_scores": ("return_scores", False),
}


def ctranslate2_defaults(module) -> dict[str, object]:
    """The defaults in the real library's signature (its docstring's first line: the
    method is a pybind11 builtin, which ``inspect.signature`` cannot read)."""
    signature = module.Translator.translate_batch.__doc__.strip().splitlines()[0]
    found = {}
    for name, _ in CTRANSLATE2.values():
        match = re.search(rf"\b{name}: \w+ = ([^,)]+)", signature)
        assert match, f"translate_batch has no {name} in {signature}"
        found[name] = ast.literal_eval(match.group(1))
    return found


def test_the_table_is_ctranslate2s_own():
    ctranslate2 = pytest.importorskip(
        "ctranslate2", reason="ctranslate2 is not installed: the table of its defaults "
        f"(read from {CTRANSLATE2_VERSION}) is checked against the real library only where "
        "it is (pip install ctranslate2)")
    real = ctranslate2_defaults(ctranslate2)
    assert {name: value for name, value in CTRANSLATE2.values()} == real, ctranslate2.__version__


def test_defaults_are_ctranslate2s_except_where_the_docstring_says_why():
    docs = option_docs()
    defaults = DecodingOptions()
    differ = {}
    for ours, (_, theirs) in CTRANSLATE2.items():
        claim = re.search(r"CTranslate2: (.+)\)$", docs[ours])
        if getattr(defaults, ours) == theirs:
            assert claim is None, f"{ours}: the docstring claims a difference"
        else:
            assert claim and ast.literal_eval(claim.group(1)) == theirs, ours
            differ[ours] = theirs
    assert set(differ) == {"beam_size", "max_length", "disable_unk"}
    for ours in differ:  # and the paragraph after the arguments says why
        assert re.search(rf"\({ours}\)|{ours} \d|{ours}\b", DecodingOptions.__doc__.split(
            "Where the defaults differ")[1]), ours


def test_our_defaults():
    assert asdict(DecodingOptions()) == {
        "beam_size": 1,
        "num_hypotheses": 1,
        "length_penalty": 1.0,
        "repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "min_length": 1,
        "max_length": 40,
        "sampling_temperature": 1.0,
        "sampling_topk": 1,
        "sampling_topp": 1.0,
        "seed": None,
        "disable_unk": True,
        "suppress_words": (),
        "return_scores": False,
        "return_log_probs": False,
        "top_log_probs": 0,
        "antilm_weight": 0.0,
        "antilm_steps": 3,
        "reply_mode": None,
        "retrieval_candidates": 8,
        "generated_candidates": 1,
        "return_candidates": False,
    }


def test_reply_options_are_checked():
    with pytest.raises(ValueError, match="reply_mode"):
        DecodingOptions(reply_mode="retrieve")
    with pytest.raises(ValueError, match="needs sampling"):
        DecodingOptions(generated_candidates=3)  # greedy proposes one reply
    assert DecodingOptions(generated_candidates=3, sampling_topk=0).generated_candidates == 3


def test_options_are_keyword_only():
    with pytest.raises(TypeError):
        DecodingOptions(5)  # type: ignore[misc]


def test_every_option_is_documented_with_its_default():
    docs = option_docs()
    assert list(docs) == [f.name for f in fields(DecodingOptions)]
    for f in fields(DecodingOptions):
        default = re.search(r"\(default ([^;]+?)(;.*)?\)$", docs[f.name])
        assert default, f"{f.name}: no (default ...) in {docs[f.name]!r}"
        assert ast.literal_eval(default.group(1)) == f.default, f.name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beam_size": 0}, "beam_size must be an integer >= 1"),
        ({"beam_size": 2.5}, "beam_size must be an integer"),
        ({"max_length": 0}, "max_length must be an integer >= 1"),
        ({"min_length": 5, "max_length": 4}, "must not exceed max_length"),
        ({"num_hypotheses": 3, "beam_size": 2}, "must not exceed beam_size"),
        ({"sampling_topp": 0.0}, "sampling_topp must be in"),
        ({"sampling_topp": 1.5}, "sampling_topp must be in"),
        ({"sampling_temperature": 0}, "sampling_temperature must be > 0"),
        ({"sampling_topk": -1}, "sampling_topk must be an integer >= 0"),
        ({"repetition_penalty": 0}, "repetition_penalty must be > 0"),
        ({"length_penalty": float("nan")}, "length_penalty must be finite"),
        ({"beam_size": 4, "sampling_topk": 0}, "sampling (sampling_topk != 1) needs beam_size=1"),
        ({"seed": -3}, "seed must be"),
        ({"no_repeat_ngram_size": True}, "no_repeat_ngram_size must be an integer"),
        ({"antilm_weight": 0.5}, "antilm_weight needs beam search (beam_size > 1)"),
        ({"antilm_weight": 1.0, "beam_size": 5}, "antilm_weight must be in [0, 1)"),
        ({"antilm_weight": -0.1, "beam_size": 5}, "antilm_weight must be in [0, 1)"),
        ({"antilm_steps": -1}, "antilm_steps must be an integer >= 0"),
    ],
)
def test_bad_options_are_clear_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        DecodingOptions(**kwargs)


def test_an_unknown_option_is_named():
    with pytest.raises(ValueError, match="unknown decoding option.*beam_width.*known: .*beam_size"):
        DecodingOptions.from_kwargs(beam_width=4)


def test_suppress_words_accepts_one_string():
    assert DecodingOptions(suppress_words="笨").suppress_words == ("笨",)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_length": MAX_LENGTH + 1}, "max_length must be at most 1024"),
    ({"beam_size": 5000}, "beam_size must be at most 16"),
    ({"beam_size": 16, "num_hypotheses": 17}, r"num_hypotheses \(17\) must not exceed"),
    ({"no_repeat_ngram_size": 17}, "no_repeat_ngram_size must be at most 16"),
    ({"suppress_words": [f"w{i}" for i in range(65)]}, "at most 64 words, got 65"),
    ({"suppress_words": ["长" * 33]}, "at most 32 characters, got one of 33"),
])
def test_every_request_is_bounded_wherever_it_comes_from(kwargs, message):
    # the ceilings hold for ask, evaluate and the engine alike: DecodingOptions checks them
    with pytest.raises(ValueError, match=message):
        DecodingOptions(**kwargs)


def test_at_the_ceilings_options_are_accepted_and_lower_caps_checked_apart():
    top = DecodingOptions(max_length=MAX_LENGTH, min_length=MAX_LENGTH, beam_size=16,
                          num_hypotheses=16, no_repeat_ngram_size=16,
                          suppress_words=[f"{i:02d}" + "长" * 30 for i in range(64)])
    check_caps(top, CAPS)
    with pytest.raises(ValueError, match="^beam_size must be at most 8"):
        check_caps(top, {**CAPS, "beam_size": 8})
    with pytest.raises(ValueError, match="^suppress_words must have at most 3 words"):
        check_caps(top, {"suppress_words": 3})


def test_the_documented_ceilings_are_the_enforced_ones():
    docs = option_docs()
    assert "at most 1024" in docs["max_length"] and "at most 16" in docs["beam_size"]
    assert "at most 16" in docs["no_repeat_ngram_size"]
    assert f"At most {CAPS['suppress_words']} words of at most " \
           f"{CAPS['suppress_word_chars']} characters" in docs["suppress_words"]
