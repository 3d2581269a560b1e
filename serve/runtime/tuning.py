"""Choosing the selection weights (serve.runtime.selection) on validation pairs.

For each validation message, the candidates are those the server would consider
(retrieved and generated, with the chat room's decoding). Each candidate is compared with
the reply a person really gave (sentence BLEU-2 on characters, smoothed); the weights
chosen are the grid point whose choices overlap the real replies most, on average. The
validation split, never the test split, decides; the retrieval index never holds a
validation pair, so a retrieved reply is never the answer itself.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from serve.runtime.model import OnnxSeq2Seq
from serve.runtime.options import DecodingOptions
from serve.runtime.replies import ReplySources, gather_candidates, with_scores
from serve.runtime.selection import SelectionWeights

# Weights tried for each term (only ratios rank, so the grid need not go below 0).
FORWARD_GRID = (0.0, 0.5, 1.0)
BACKWARD_GRID = (0.0, 0.25, 0.5, 1.0, 2.0)
RETRIEVAL_GRID = (0.0, 0.5, 1.0, 2.0, 4.0)


def similarity(reply: str, reference: str) -> float:
    """Smoothed sentence BLEU-2 of ``reply`` against the real reply, on characters."""
    from sacrebleu.metrics import BLEU

    metric = BLEU(tokenize="zh", max_ngram_order=2, effective_order=True,
                  smooth_method="add-k", smooth_value=1)
    return metric.sentence_score(reply, [reference]).score


def chosen_similarity(features: np.ndarray, overlap: np.ndarray, weights: np.ndarray
                      ) -> np.ndarray:
    """features [G,C,3] (NaN rows: absent candidates), overlap [G,C], weights [3] -> the
    overlap of the candidate each group would choose; where several tie at the top, their
    mean (a weight that scores everything alike chooses at random, and earns no more)."""
    scores = np.nan_to_num(features @ weights, nan=-np.inf)
    tied = scores == scores.max(axis=1, keepdims=True)
    return (overlap * tied).sum(axis=1) / tied.sum(axis=1)


def tune_weights(groups: Sequence[Sequence[tuple[float, float, float]]],
                 overlaps: Sequence[Sequence[float]], *, chosen_on: str) -> SelectionWeights:
    """The grid point whose choices overlap the real replies most (ties: smaller weights)."""
    if not groups:
        raise ValueError("tuning needs at least one validation message")
    width = max(len(g) for g in groups)
    features = np.full((len(groups), width, 3), np.nan)
    overlap = np.zeros((len(groups), width))
    for i, (group, values) in enumerate(zip(groups, overlaps, strict=True)):
        features[i, : len(group)] = group
        overlap[i, : len(values)] = values
    results = []
    for point in itertools.product(FORWARD_GRID, BACKWARD_GRID, RETRIEVAL_GRID):
        if not any(point):
            continue
        mean = float(chosen_similarity(features, overlap, np.array(point)).mean())
        results.append((round(mean, 9), *(-w for w in point)))
    best, forward, backward, retrieval = max(results)
    forward_only = float(chosen_similarity(features, overlap, np.array([1.0, 0, 0])).mean())
    return SelectionWeights(
        forward=-forward, backward=-backward, retrieval=-retrieval, chosen_on=chosen_on,
        objective={"mean_bleu2_of_the_chosen": round(best, 3),
                   "mean_bleu2_forward_only": round(forward_only, 3),
                   "mean_bleu2_best_possible": round(float(overlap.max(axis=1).mean()), 3),
                   "messages": len(groups)},
    )


def tune_on_pairs(model: OnnxSeq2Seq, sources: ReplySources,
                  pairs: Sequence[tuple[str, str]], options: DecodingOptions, *,
                  chosen_on: str) -> SelectionWeights:
    """Weights for ``sources`` from validation (message, real reply) pairs, with the
    candidates ``options`` makes (their seeds: options.seed + a pair's index x 100)."""
    groups, overlaps = [], []
    for i, (message, reference) in enumerate(pairs):
        seed = None if options.seed is None else options.seed + 100 * i
        _, candidates, scores = gather_candidates(model, sources, message,
                                                  replace(options, seed=seed))
        if not candidates:
            continue
        top = max((c.retrieval_score for c in candidates if c.source == "retrieved"),
                  default=0.0)
        groups.append([with_scores(c, s).features(top)
                       for c, s in zip(candidates, scores, strict=True)])
        overlaps.append([similarity(c.text, reference) for c in candidates])
    return tune_weights(groups, overlaps, chosen_on=chosen_on)
