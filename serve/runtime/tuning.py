"""Choosing the selection weights (serve.runtime.selection) on validation pairs.

For each validation message, its candidates are the replies the server would consider
(retrieved and generated) plus the message's real reply from the corpus. The weights
chosen are those that rank the real reply highest: the grid point with the best mean
reciprocal rank. A stock reply fits every message, so a scorer that prefers it ranks the
real replies low; the validation split, never the test split, decides.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from serve.runtime.selection import SelectionWeights

# Weights tried for each term; the forward weight is fixed at 1 (only ratios rank).
BACKWARD_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
RETRIEVAL_GRID = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)


def reciprocal_ranks(features: np.ndarray, reference: np.ndarray, weights: np.ndarray
                     ) -> np.ndarray:
    """features [G,C,3] (padded groups: NaN rows are absent), reference [G] index of the
    real reply in each group, weights [3] -> 1 / rank of the real reply in each group
    (ties count against it: a weight that scores everything alike earns nothing)."""
    scores = np.nan_to_num(features @ weights, nan=-np.inf)
    ref = scores[np.arange(len(reference)), reference]
    ahead = (scores >= ref[:, None]).sum(axis=1)  # the real reply itself included
    return 1.0 / ahead


def tune_weights(groups: Sequence[Sequence[tuple[float, float, float]]],
                 reference: Sequence[int], *, chosen_on: str) -> SelectionWeights:
    """The grid point with the best mean reciprocal rank of the real replies."""
    if not groups:
        raise ValueError("tuning needs at least one validation message")
    width = max(len(g) for g in groups)
    features = np.full((len(groups), width, 3), np.nan)
    for i, group in enumerate(groups):
        features[i, : len(group)] = group
    ref = np.asarray(reference, np.int64)
    results = []
    for backward, retrieval in itertools.product(BACKWARD_GRID, RETRIEVAL_GRID):
        mrr = float(reciprocal_ranks(features, ref, np.array([1.0, backward, retrieval])).mean())
        results.append((mrr, -backward, -retrieval))  # ties: the smaller weights
    mrr, backward, retrieval = max(results)
    baseline = float(reciprocal_ranks(features, ref, np.array([1.0, 0.0, 0.0])).mean())
    return SelectionWeights(
        forward=1.0, backward=-backward, retrieval=-retrieval, chosen_on=chosen_on,
        objective={"mrr_of_the_real_reply": round(mrr, 4),
                   "mrr_forward_only": round(baseline, 4),
                   "messages": len(groups), "candidates_per_message": width},
    )
