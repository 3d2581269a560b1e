"""The three searches (greedy, sampling, beam) and the anti-LM, on real exported models."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from serve.runtime.model import OnnxSeq2Seq
from serve.runtime.options import DecodingOptions
from serve.runtime.rules import TokenRules, process_rows
from serve.runtime.sampling import choose_tokens
from serve.runtime.search import (
    SequenceDecoder,
    _greedy_at_their_tokens,
    beam_search,
    choose_rows,
    choose_token,
    decode_alone,
    generate,
    source_ids,
    token_texts,
)
from tests.conftest import DEMO_CORPUS
from tests.serve.runtime.test_rules import _random_batch

QUESTIONS = ["你好", "你叫什么名字", "今天天气怎么样", "我好累啊", "晚安", "你喜欢吃什么", "哈哈哈"]


# -- choosing a token ----------------------------------------------------------------------


def test_choose_token_greedy_top_k_and_top_p():
    log_probs = np.log(np.array([0.05, 0.05, 0.5, 0.3, 0.1]))
    rng = np.random.default_rng(0)
    assert choose_token(log_probs, DecodingOptions(), rng) == 2
    top2 = DecodingOptions(sampling_topk=2, seed=0)
    assert {choose_token(log_probs, top2, rng) for _ in range(200)} == {2, 3}
    nucleus = DecodingOptions(sampling_topk=0, sampling_topp=0.7)
    assert {choose_token(log_probs, nucleus, rng) for _ in range(200)} == {2, 3}
    tiny_p = DecodingOptions(sampling_topk=0, sampling_topp=0.01)
    assert {choose_token(log_probs, tiny_p, rng) for _ in range(50)} == {2}
    anything = DecodingOptions(sampling_topk=0, sampling_temperature=5.0)
    assert {choose_token(log_probs, anything, rng) for _ in range(500)} == {0, 1, 2, 3, 4}


# -- searches on a real exported model ------------------------------------------------------


def _decoders(seed: int, rules: list[TokenRules], histories: list[list[int]]):
    """Decoders over ``rules`` (greedy), a third of them made to sample or to return
    their log-probs."""
    pick = np.random.default_rng(seed)
    decoders = []
    for i, (r, previous) in enumerate(zip(rules, histories, strict=True)):
        kind = pick.choice(["greedy", "greedy", "sampling", "log_probs"])
        options = replace(r.options, **{"greedy": {}, "sampling": {"sampling_topk": 0},
                                        "log_probs": {"return_log_probs": True}}[kind])
        decoder = SequenceDecoder(TokenRules(options, r.eos_id, r.banned, r.guard),
                                  np.random.default_rng(i) if options.sampling else None)
        decoder.token_ids = list(previous)
        decoders.append(decoder)
    return decoders


@pytest.mark.parametrize("seed", range(12))
def test_choosing_rows_equals_choosing_from_the_processed_rows(seed):
    batch, rules, histories = _random_batch(seed, size=32)
    decoders = _decoders(seed, rules, histories)
    processed = process_rows(batch, [d.rules for d in decoders], histories)
    expected = choose_tokens(processed, [d.options for d in decoders],
                             [np.random.default_rng(i) for i in range(len(decoders))])
    tokens, rows = choose_rows(batch.copy(), decoders, in_place=True)
    assert tokens == expected
    for i, (d, token) in enumerate(zip(decoders, tokens, strict=True)):
        assert rows[i][token] == processed[i][token]  # what accept reads: bit for bit
        if d.options.sampling or d.options.return_log_probs:  # these read the whole row
            np.testing.assert_array_equal(rows[i], processed[i])
    alone = [choose_rows(batch[i : i + 1], _decoders(seed, rules, histories)[i : i + 1])
             for i in range(len(decoders))]
    assert [t[0] for t, _ in alone] == tokens  # a row alone chooses the same


def test_a_greedy_row_whose_shift_rounds_two_entries_together_takes_the_lower_id():
    # -2 - u (u the float32 spacing there) is the max; the float below it, at a lower
    # id, rounds onto the same value once the shift 2^-23 is taken off (ties to even).
    top = np.nextafter(np.float32(-2.0), np.float32(-np.inf))
    below = np.nextafter(top, np.float32(-np.inf))
    out = np.full((1, 6), -50.0, np.float32)
    out[0, 1], out[0, 4] = below, top
    shift = np.array([2.0 ** -23], np.float32)
    normalised = out - shift[:, None]
    assert normalised[0, 1] == normalised[0, 4] and int(out[0].argmax()) == 4
    tokens = [4]  # the unnormalised row's max
    _greedy_at_their_tokens(out, shift, [0], tokens, [DecodingOptions()], [None])
    assert tokens == [int(normalised[0].argmax())] == [1]
    np.testing.assert_array_equal(out, normalised)  # renormalised whole


def test_source_ids_rejects_an_empty_message(model):
    with pytest.raises(ValueError, match="empty"):
        source_ids(model, "   ")
    assert len(source_ids(model, "你好" * 200, max_source_length=10)) == 10


@pytest.mark.parametrize(
    "extra",
    [{}, {"repetition_penalty": 1.3}, {"no_repeat_ngram_size": 2, "length_penalty": 0.0}],
)
def test_beam_1_equals_greedy(model, extra):
    for question in QUESTIONS:
        src = source_ids(model, question)
        greedy = decode_alone(model, src, DecodingOptions(return_scores=True, **extra))
        beam = beam_search(model, src, DecodingOptions(beam_size=1, return_scores=True, **extra))
        assert beam.token_ids == greedy.token_ids
        assert beam.finish_reason == greedy.finish_reason
        assert beam.score == pytest.approx(greedy.score, abs=1e-9)


def _beam_versus_greedy(model: OnnxSeq2Seq, slack: float, length_penalty: float = 1.0) -> None:
    for question in QUESTIONS:
        src = source_ids(model, question)
        greedy = decode_alone(
            model, src, DecodingOptions(return_scores=True, length_penalty=length_penalty))
        for beam_size in (2, 5):
            options = DecodingOptions(
                beam_size=beam_size, return_scores=True, length_penalty=length_penalty)
            beam = beam_search(model, src, options)
            assert beam.score >= greedy.score - slack, (question, beam_size)


@pytest.mark.tensorflow
def test_beam_best_score_is_at_least_greedys(tiny_model_dir):
    _beam_versus_greedy(OnnxSeq2Seq.load(tiny_model_dir, intra_op_num_threads=1), slack=1e-9)


def test_beam_best_score_is_at_least_greedys_on_the_shipped_model(model):
    # On the model's own log-probability (length_penalty 0) the stopping rule is exact:
    # once the best candidate ends, nothing alive can beat it. (With length normalization
    # it is CTranslate2's heuristic: on the shipped model beam 5 can settle on a shorter
    # reply than greedy's.) An int8 graph quantizes activations over the whole batch, so
    # the same reply scores a little differently in a beam of k rows than alone (seen:
    # up to 0.025 on a reply's total).
    int8 = model.manifest.quantization != "none"
    _beam_versus_greedy(model, slack=5e-2 if int8 else 1e-9, length_penalty=0.0)


def test_n_best_is_sorted_and_distinct(model):
    options = DecodingOptions(beam_size=5, num_hypotheses=4, return_scores=True)
    result = generate(model, "你好", options)
    assert len(result.hypotheses) == 4
    scores = [score for _, score in result.hypotheses]
    assert scores == sorted(scores, reverse=True)
    assert result.hypotheses[0] == (result.text, result.score)
    without = generate(model, "你好", DecodingOptions(beam_size=5, num_hypotheses=4))
    assert without.score is None and [t for t, _ in without.hypotheses] == [
        t for t, _ in result.hypotheses
    ]


def test_seeded_sampling_reproduces_and_seeds_differ(model):
    def sample(seed):
        options = DecodingOptions(sampling_topk=0, sampling_temperature=1.5, seed=seed)
        return [generate(model, q, options).token_ids for q in QUESTIONS]

    assert sample(11) == sample(11)
    assert sample(11) != sample(12)


def test_log_probs_are_the_processed_ones_the_choice_was_made_from(model):
    plain = generate(model, "你好", DecodingOptions(max_length=6))
    options = DecodingOptions(max_length=6, return_log_probs=True, top_log_probs=4)
    result = generate(model, "你好", options)
    assert plain.log_probs is None and result.token_ids == plain.token_ids
    assert [e.token_id for e in result.log_probs] == result.token_ids
    rules = TokenRules.for_model(model, options)
    state = model.encode([source_ids(model, "你好")])
    prev, h, c = np.array([model.bos_id], np.int64), state.h, state.c
    for i, entry in enumerate(result.log_probs):
        out = model.step(prev, h, c, state.memory, state.memory_keys, state.src_mask)
        processed = rules.process(out.log_probs[0], result.token_ids[:i])
        assert entry.log_prob == float(processed[entry.token_id])
        assert [t for t, _ in entry.top] == np.argsort(-processed, kind="stable")[:4].tolist()
        prev, h, c = np.array([entry.token_id], np.int64), out.h, out.c
    assert "".join(token_texts(model, result.token_ids)) == result.text
    beam = generate(model, "你好", DecodingOptions(beam_size=2, return_log_probs=True))
    assert beam.log_probs is None  # a beam records no per-token choice


def test_length_limits(model):
    for question in QUESTIONS[:3]:
        short = generate(model, question, DecodingOptions(max_length=3))
        assert len(short.token_ids) <= 3
        assert short.finish_reason == "stop" or len(short.token_ids) == 3
        forced = generate(model, question, DecodingOptions(min_length=12, max_length=12))
        assert len(forced.token_ids) == 12 and forced.finish_reason == "length"
        beam = generate(model, question, DecodingOptions(beam_size=3, min_length=6))
        assert len(beam.token_ids) >= 6


def test_suppressed_words_and_no_repeat_ngrams_never_appear(model):
    reply = generate(model, "你好", DecodingOptions(min_length=10, max_length=10))
    word = model.tokenizer.id_to_piece(reply.token_ids[0])[0]  # a character greedy produces
    for beam_size in (1, 3):
        options = DecodingOptions(
            beam_size=beam_size, suppress_words=(word,), min_length=10, max_length=20
        )
        for question in QUESTIONS:
            result = generate(model, question, options)
            assert word not in result.text
    options = DecodingOptions(no_repeat_ngram_size=2, min_length=20, max_length=20)
    for question in QUESTIONS:
        ids = generate(model, question, options).token_ids
        bigrams = list(zip(ids, ids[1:], strict=False))
        assert len(bigrams) == len(set(bigrams))


def test_unk_only_when_allowed(model):
    unk = model.unk_id
    options = DecodingOptions(min_length=15, max_length=15, sampling_topk=0, seed=3)
    for question in QUESTIONS:
        assert unk not in generate(model, question, options).token_ids


def test_beam_ranking_equals_a_stable_full_sort():
    from serve.runtime.search import _top_ranked

    rng = np.random.default_rng(0)
    for trial in range(300):
        size = int(rng.integers(1, 300))
        scores = rng.integers(-4, 4, size).astype(float) if trial % 2 else rng.normal(size=size)
        scores[rng.random(size) < 0.1] = -np.inf
        n = int(rng.integers(1, 12))
        expected = np.argsort(-scores, kind="stable")[:n]
        np.testing.assert_array_equal(_top_ranked(scores, n), expected)


def test_antilm_first_token_is_the_mmi_argmax(model):
    """One step of beam search with the anti-LM picks argmax(log p(t|S) - w log p(t|no S))
    over the rule-processed log-probs, computed here by hand from two decoder steps."""
    weight = 0.6
    options = DecodingOptions(beam_size=3, max_length=1, antilm_weight=weight, antilm_steps=1)
    bos = np.array([model.bos_id], np.int64)

    def first_step(ids: list[int]) -> np.ndarray:
        s = model.encode([ids])
        return model.step(bos, s.h, s.c, s.memory, s.memory_keys, s.src_mask).log_probs[0]

    changed = 0
    for question in QUESTIONS:
        src = source_ids(model, question)
        processed = TokenRules.for_model(model, options).process(first_step(src), [])
        lm = first_step([model.eos_id])
        lm[model.eos_id] = 0.0
        mmi = processed - weight * lm
        result = generate(model, question, options)  # min_length 1: no ending at step one
        assert result.finish_reason == "length"
        assert result.token_ids == [int(np.argmax(mmi))], question
        changed += int(np.argmax(mmi)) != int(np.argmax(processed))
    assert changed  # the penalty changed some first token, so the check above has teeth


def test_antilm_makes_replies_less_generic(model):
    """The point of MMI: the same few stock replies for every question become fewer."""
    questions = [line.split("\t")[0] for line in DEMO_CORPUS.read_text(
        encoding="utf-8").splitlines()[:60]]
    plain = DecodingOptions(beam_size=5, no_repeat_ngram_size=2)
    mmi = DecodingOptions(beam_size=5, no_repeat_ngram_size=2, antilm_weight=0.5)
    plain_replies = {generate(model, q, plain).text for q in questions}
    mmi_replies = {generate(model, q, mmi).text for q in questions}
    assert len(mmi_replies) > len(plain_replies)
