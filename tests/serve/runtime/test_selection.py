"""The reranking formula and its tuning, on constructed candidates."""

from __future__ import annotations

import numpy as np

from serve.runtime.selection import Candidate, SelectionWeights, rank, usable
from serve.runtime.tuning import chosen_similarity, similarity, tune_weights


def candidate(text: str, *, source: str = "generated", forward: float = -8.0,
              backward: float = -20.0, retrieval: float = 0.0) -> Candidate:
    return Candidate(text=text, token_ids=tuple(range(len(text))), source=source,
                     forward=forward, reply_length=4, backward=backward, message_length=5,
                     retrieval_score=retrieval)


def test_a_stock_reply_loses_to_a_specific_one_the_backward_model_prefers():
    # The forward model likes "我也是" better (-1.0 a token against -2.0), but the message
    # cannot be told back from it (-6.0 a token against -2.4).
    stock = candidate("我也是", forward=-4.0, backward=-30.0)
    specific = candidate("多穿点衣服", forward=-8.0, backward=-12.0)
    forward_only = rank([stock, specific], SelectionWeights(backward=0.0, retrieval=0.0))
    assert forward_only[0].text == "我也是"
    mmi = rank([stock, specific], SelectionWeights(backward=1.0, retrieval=0.0))
    assert mmi[0].text == "多穿点衣服"
    assert mmi[0].score == -8.0 / 4 + -12.0 / 5


def test_the_retrieval_term_is_relative_to_the_best_retrieved_reply():
    a = candidate("今天好冷", source="retrieved", retrieval=12.0)
    b = candidate("冷就多穿", source="retrieved", retrieval=6.0)
    ranked = rank([b, a], SelectionWeights(forward=0.0, backward=0.0, retrieval=1.0))
    assert [c.text for c in ranked] == ["今天好冷", "冷就多穿"]
    assert [c.score for c in ranked] == [1.0, 0.5]


def test_ranking_does_not_depend_on_arrival_order():
    items = [candidate(t) for t in ("一", "二", "三")]
    weights = SelectionWeights()
    assert rank(items, weights) == rank(items[::-1], weights)


def test_echoes_overlong_empty_and_duplicate_replies_are_never_candidates():
    message = "今天天气真好"
    kept = usable([
        candidate("今天天气真好"),  # the message itself
        candidate("今天天气真好啊哈哈"),  # the whole message inside
        candidate("好" * 61),
        candidate(""),
        candidate("出去玩吧", source="generated"),
        candidate("出去玩吧", source="retrieved", retrieval=3.0),
    ], message)
    assert [(c.text, c.source) for c in kept] == [("出去玩吧", "retrieved")]


def test_tuning_finds_the_weights_whose_choices_overlap_the_real_replies_most():
    # In every group the candidate like the real reply (index 0, overlap 50) has the worse
    # forward score but the better backward one, so only a backward weight chooses it.
    groups = [[(-2.0, -2.0, 0.0), (-1.0, -6.0, 0.0), (-1.5, -5.0, 0.0)] for _ in range(10)]
    overlaps = [[50.0, 5.0, 0.0] for _ in range(10)]
    weights = tune_weights(groups, overlaps, chosen_on="constructed")
    assert weights.backward > 0
    assert weights.retrieval == 0.0  # no retrieval signal here: the smallest weight wins
    assert weights.objective["mean_bleu2_of_the_chosen"] == 50.0
    assert weights.objective["mean_bleu2_forward_only"] == 5.0
    assert weights.chosen_on == "constructed"


def test_equal_scores_earn_their_mean_and_absent_rows_never_win():
    features = np.array([[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [np.nan] * 3]])
    overlap = np.array([[1.0, 2.0, 3.0]])
    assert chosen_similarity(features, overlap, np.ones(3))[0] == 1.5


def test_similarity_is_higher_for_the_closer_reply():
    assert similarity("多穿点衣服", "记得多穿衣服") > similarity("我也是", "记得多穿衣服")
