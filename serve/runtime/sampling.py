"""Choosing the next token of many rows at once: greedy argmax, or temperature, top-k,
top-p and one draw from each row's own seeded RNG.

The whole-vocabulary work (the exponentials, the normaliser) runs once for all the rows
that sample; each row then looks only at its head: the tokens within a margin of its best
one, widened until they hold the mass the rule needs, which is exact (every token outside
the head is less likely than every token in it) and a few dozen tokens instead of a sort
or a partition of the vocabulary.

A row's choice depends only on its own log-probs, options and RNG (row-wise operations,
each row's sums over its own entries), so a row chosen in a batch equals the same row
chosen alone; ``SequenceDecoder`` uses this for one row too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from serve.runtime.options import DecodingOptions

HEAD_MARGIN = 8.0  # first head: scaled logits within e^-8 of the best (widened as needed)


def choose_tokens(
    log_probs: np.ndarray, options: Sequence[DecodingOptions],
    rngs: Sequence[np.random.Generator],
) -> list[int]:
    """Each row's token: argmax when ``sampling_topk == 1``, else one draw (see
    ``choose_token``)."""
    tokens = log_probs.argmax(axis=1).tolist()
    rows = [i for i, o in enumerate(options) if o.sampling]
    if not rows:
        return tokens
    chosen = log_probs[rows].astype(np.float64)
    temperature = np.array([options[i].sampling_temperature for i in rows])
    chosen -= chosen.max(axis=1, keepdims=True)
    chosen /= temperature[:, None]  # scaled logits, the best one at 0
    weights = np.exp(chosen)
    totals = weights.sum(axis=1)
    for j, i in enumerate(rows):
        tokens[i] = _draw(chosen[j], weights[j], float(totals[j]), options[i], rngs[i])
    return tokens


def choose_token(log_probs: np.ndarray, options: DecodingOptions,
                 rng: np.random.Generator) -> int:
    """Greedy argmax when ``sampling_topk == 1``; otherwise temperature, top-k, top-p and
    one draw from ``rng`` (inverse CDF over the kept tokens in id order, so a seed
    reproduces across numpy versions)."""
    return choose_tokens(log_probs[None, :], [options], [rng])[0]


def _head(scaled: np.ndarray, enough) -> np.ndarray:
    """The ids of the most likely tokens, best first (ties by lower id), widened until
    ``enough(ids)``; the whole row at worst."""
    margin = HEAD_MARGIN
    while True:
        ids = np.flatnonzero(scaled >= -margin) if margin < 1e4 else np.arange(len(scaled))
        if len(ids) == len(scaled) or enough(ids):  # e^-1e4 is 0: the row's end
            return ids[np.lexsort((ids, -scaled[ids]))]
        margin *= 4


def _draw(scaled: np.ndarray, weights: np.ndarray, total: float, options: DecodingOptions,
          rng: np.random.Generator) -> int:
    """One row's draw: ``weights = exp(scaled)``, ``total`` their sum over the row."""
    k, top_p = options.sampling_topk, options.sampling_topp
    vocab = len(scaled)
    kept = None
    if 0 < k < vocab:
        kept = _head(scaled, lambda ids: len(ids) >= k)[:k]
        total = float(weights[kept].sum())
    if top_p < 1.0:
        if kept is None:
            kept = _head(scaled, lambda ids: weights[ids].sum() >= top_p * total)
        cumulative = np.cumsum(weights[kept]) / total
        kept = kept[: int(np.searchsorted(cumulative, top_p)) + 1]
    if kept is None:
        cdf = np.cumsum(weights)
        ids = None
    else:
        ids = np.sort(kept)  # id order: the draw does not depend on how the head was found
        cdf = np.cumsum(weights[ids])
    at = min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), len(cdf) - 1)
    return at if ids is None else int(ids[at])
