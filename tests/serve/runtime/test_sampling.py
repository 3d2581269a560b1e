"""Choosing the tokens of many rows at once: the same as each row alone, and as the
one-row rule that widens its head."""

from __future__ import annotations

import numpy as np

from serve.runtime.options import DecodingOptions
from serve.runtime.sampling import _draw, _scaled, choose_tokens

OPTIONS = [DecodingOptions(sampling_topk=0, sampling_topp=0.9, sampling_temperature=0.7),
           DecodingOptions(sampling_topk=5, sampling_temperature=1.3),
           DecodingOptions(sampling_topk=40, sampling_topp=0.8),
           DecodingOptions(sampling_topk=0, sampling_temperature=1.0),  # whole vocabulary
           DecodingOptions(sampling_topk=3000, sampling_topp=0.99),  # a head too small
           DecodingOptions()]  # greedy


def _rows(n: int, vocab: int = 4000) -> np.ndarray:
    rng = np.random.default_rng(3)
    peaks = rng.choice([0.02, 0.3, 3.0], size=n)  # peaked to flat
    with np.errstate(divide="ignore"):  # a few zeros: -inf, as a banned token
        return np.log(np.stack([rng.dirichlet(np.full(vocab, a)) for a in peaks])
                      ).astype(np.float32)


def test_a_batch_chooses_as_each_row_alone_and_as_the_one_row_rule():
    rows = _rows(3 * len(OPTIONS))
    options = [OPTIONS[i % len(OPTIONS)] for i in range(len(rows))]
    together = choose_tokens(rows, options, [np.random.default_rng(i) for i in range(len(rows))])
    for i, o in enumerate(options):
        alone = choose_tokens(rows[i : i + 1], [o], [np.random.default_rng(i)])[0]
        assert together[i] == alone, (i, o)
        if o.sampling:
            scaled = _scaled(rows[i : i + 1], np.array([o.sampling_temperature]))[0]
            weights = np.exp(scaled)
            widened = _draw(scaled, weights, float(weights.sum(dtype=np.float64)), o,
                            np.random.default_rng(i))
            assert together[i] == widened, (i, o)
        else:
            assert together[i] == int(np.argmax(rows[i]))


def test_draws_follow_the_rules_and_the_seed():
    rows = _rows(1, vocab=50)
    top2 = DecodingOptions(sampling_topk=2)
    best = set(np.argsort(-rows[0])[:2].tolist())
    rng = np.random.default_rng(0)
    assert {choose_tokens(rows, [top2], [rng])[0] for _ in range(200)} == best
    first = [choose_tokens(rows, [OPTIONS[0]], [np.random.default_rng(5)])[0] for _ in range(3)]
    assert len(set(first)) == 1


def test_ties_in_the_head_keep_the_lower_ids():
    # Ten tokens share the best log-prob; top-k 3 keeps the three lowest ids of them.
    row = np.full((1, 64), -12.0, np.float32)
    tied = [40, 7, 33, 12, 58, 21, 9, 50, 3, 27]
    row[0, tied] = -2.0
    rng = np.random.default_rng(1)
    top3 = DecodingOptions(sampling_topk=3, sampling_temperature=1.0)
    drawn = {choose_tokens(row, [top3], [rng])[0] for _ in range(300)}
    assert drawn == set(sorted(tied)[:3])


def test_a_flat_row_beside_peaked_ones_changes_none_of_their_draws():
    # Heads of very different sizes are padded in groups: the peaked rows' draws are the
    # same with and without a flat row (thousands of tokens in its head) in the batch.
    peaked = _rows(6)[[1, 3]]  # heads of about 300 tokens
    flat = np.full((1, peaked.shape[1]), -np.log(peaked.shape[1]), np.float32)
    nucleus = DecodingOptions(sampling_topp=0.9, sampling_temperature=0.7)
    alone = choose_tokens(peaked, [nucleus] * 2, [np.random.default_rng(i) for i in (4, 5)])
    mixed = choose_tokens(np.concatenate([peaked[:1], flat, peaked[1:]]), [nucleus] * 3,
                          [np.random.default_rng(i) for i in (4, 9, 5)])
    assert [mixed[0], mixed[2]] == alone
