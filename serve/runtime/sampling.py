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
from typing import NamedTuple

import numpy as np

from serve.runtime.options import DecodingOptions

HEAD_MARGIN = 8.0  # first head: scaled logits within e^-8 of the best (widened as needed)
HEAD_FLOOR = np.float32(np.exp(-HEAD_MARGIN))  # its weights (float32: a float64 bound casts)
ONE_GROUP_HEADS = 512  # heads up to this size are drawn together, padded to the widest


def choose_tokens(
    log_probs: np.ndarray, options: Sequence[DecodingOptions],
    rngs: Sequence[np.random.Generator],
) -> list[int]:
    """Each row's token: argmax when ``sampling_topk == 1``, else one draw (see
    ``choose_token``)."""
    rows = [i for i, o in enumerate(options) if o.sampling]
    if len(rows) < len(options):  # the greedy rows' (a pass over the vocabulary)
        tokens = log_probs.argmax(axis=1).tolist()
    else:
        tokens = [0] * len(options)
    if not rows:
        return tokens
    temperature = np.array([options[i].sampling_temperature for i in rows])
    # every row sampling: no gathered copy of the batch (_scaled makes a new array)
    weights = _scaled(log_probs if len(rows) == len(options) else log_probs[rows],
                      temperature)
    np.exp(weights, out=weights)
    totals = weights.sum(axis=1, dtype=np.float64)
    drawn = _draw_rows(weights, totals, [options[i] for i in rows], [rngs[i] for i in rows])
    for j, i in enumerate(rows):
        if drawn[j] < 0:  # its first head was not enough: widened, on its own
            scaled = _scaled(log_probs[i : i + 1], temperature[j : j + 1])[0]
            drawn[j] = _draw(scaled, weights[j], float(totals[j]), options[i], rngs[i])
        tokens[i] = drawn[j]
    return tokens


def _scaled(rows: np.ndarray, temperature: np.ndarray) -> np.ndarray:
    """Rows of log-probs -> logits over the temperature, each row's best at 0."""
    # float32: the exponentials of every row's vocabulary are the bulk of a sampled step;
    # the sums and the cumulative masses the draw reads are float64.
    out = np.subtract(rows, rows.max(axis=1, keepdims=True), dtype=np.float32)
    out /= temperature.astype(np.float32)[:, None]
    return out


def _draw_rows(weights: np.ndarray, totals: np.ndarray, options: Sequence[DecodingOptions],
               rngs: Sequence[np.random.Generator]) -> list[int]:
    """Every row's draw at once from its first head (``HEAD_MARGIN``), or -1 for a row
    whose first head is not enough (``_draw`` then widens it) or that samples the whole
    vocabulary. The same rule as ``_draw``, on [rows, head] arrays padded with zeros
    after each row's own head (which changes none of its sums).

    Heads of up to ``ONE_GROUP_HEADS`` tokens (a few hundred: the usual ones) go in one
    group, padded to the widest; wider ones in groups within 2x of each other's size,
    each padded to its own widest: one flat row (thousands of tokens in its head) then
    widens only its own group's arrays, not every row's. A row's draw is the same in any
    group."""
    vocab = weights.shape[1]
    # every row's head, by row and ids ascending (np.nonzero of a 2-D mask is slower)
    flat = np.flatnonzero(weights >= HEAD_FLOOR)
    row = flat // vocab
    size = np.bincount(row, minlength=len(options))
    rules = _Rules.of(options, vocab)
    if size.max() <= ONE_GROUP_HEADS:  # the usual case: no grouping at all
        return _draw_group(weights, slice(None), *_padded_heads(weights, flat, row, row, size),
                           size, totals, rules, rngs)
    group = np.frexp(np.maximum(size, ONE_GROUP_HEADS))[1]
    drawn = [-1] * len(options)
    local = np.zeros(len(options), np.int64)  # each row's place in its group
    for g in np.unique(group).tolist():
        members = np.flatnonzero(group == g)
        local[members] = np.arange(len(members))
        taken = group[row] == g
        in_group, rows_of = flat[taken], row[taken]
        picked = _draw_group(weights, members,
                             *_padded_heads(weights, in_group, rows_of, local[rows_of],
                                            size[members]),
                             size[members], totals[members],
                             _Rules(rules.k[members], rules.top_p[members]),
                             [rngs[j] for j in members])
        for j, token in zip(members.tolist(), picked, strict=True):
            drawn[j] = token
    return drawn


class _Rules(NamedTuple):
    """The rows' top-k (0: none, or the whole vocabulary) and top-p, as arrays."""

    k: np.ndarray
    top_p: np.ndarray

    @classmethod
    def of(cls, options: Sequence[DecodingOptions], vocab: int) -> _Rules:
        return cls(np.array([o.sampling_topk if 0 < o.sampling_topk < vocab else 0
                             for o in options]),
                   np.array([o.sampling_topp for o in options]))


def _padded_heads(weights: np.ndarray, flat: np.ndarray, row: np.ndarray,
                  local: np.ndarray, size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A group's heads (``flat``: their flat indices in ``weights``, by row and id;
    ``row``/``local``: each one's row in ``weights`` and in the group; ``size``: each
    group row's head size) as [rows, widest] arrays in id order: the ids (``vocab``
    after a row's own head) and their masses (0 there)."""
    vocab, width = weights.shape[1], int(size.max())
    starts = np.cumsum(size) - size
    at = local * width + np.arange(len(flat)) - starts[local]
    head = np.full(len(size) * width, vocab, np.int64)
    mass = np.zeros(len(size) * width, np.float32)
    head[at], mass[at] = flat - row * vocab, weights.ravel()[flat]
    return head.reshape(-1, width), mass.reshape(-1, width)


def _draw_group(weights: np.ndarray, members: np.ndarray | slice, head: np.ndarray,
                mass: np.ndarray, size: np.ndarray, totals: np.ndarray, rules: _Rules,
                rngs: Sequence[np.random.Generator]) -> list[int]:
    """``_draw_rows`` for the rows ``members`` of ``weights``: ``head``/``mass`` [rows,
    width], each row's head in id order and padded after its ``size`` tokens."""
    vocab, width = weights.shape[1], head.shape[1]
    k, top_p = rules.k, rules.top_p
    ranked = np.sort(mass, axis=1)[:, ::-1]  # most likely first (a value sort: no ids)
    cumulative = np.cumsum(ranked, axis=1, dtype=np.float64)
    everyone = np.arange(len(size))
    if not k.any():  # (the usual case: the same values as the general one below)
        limit, norm = size, totals
    else:
        limit = np.where(k > 0, np.minimum(k, size), size)
        norm = np.where(k > 0, cumulative[everyone, np.maximum(limit - 1, 0)], totals)
    nucleus = np.count_nonzero(cumulative / norm[:, None] < top_p[:, None], axis=1) + 1
    kept = np.where(top_p < 1.0, np.minimum(nucleus, limit), limit)
    enough = np.where(k > 0, size >= k, (top_p < 1.0) & (nucleus <= size))
    # The kept tokens: every mass above the last kept one's, then the ones equal to it,
    # lower ids first, as many as the count needs (a tie is kept by the lower id).
    last = ranked[everyone, kept - 1][:, None]
    if 4 * width > vocab:  # wide heads (flat rows): over the vocabulary, in id order
        head, mass = np.broadcast_to(np.arange(vocab), (len(size), vocab)), weights[members]
    above = mass > last
    tied = mass == last
    wanted = kept - np.count_nonzero(above, axis=1)  # of the tied, lower ids first
    if (np.count_nonzero(tied, axis=1) <= wanted).all():  # (usual: one tied, itself)
        keep = above | tied
    else:
        keep = above | (tied & (np.cumsum(tied, axis=1) <= wanted[:, None]))
    # The kept masses in id order, the others zeroed (a zero adds nothing to a cumulative
    # sum, so each kept token's is as without them).
    cdf = np.cumsum(np.where(keep, mass, 0.0), axis=1, dtype=np.float64)
    target = np.array([rng.random() if ok else 0.0
                       for ok, rng in zip(enough.tolist(), rngs, strict=True)])
    target *= cdf[:, -1]
    pick = np.count_nonzero(cdf <= target[:, None], axis=1)  # searchsorted, side right
    rounded_up = pick == keep.shape[1]  # u * total rounded up to the total: the last kept
    if rounded_up.any():
        last_kept = keep.shape[1] - 1 - np.argmax(keep[:, ::-1], axis=1)
        pick = np.where(rounded_up, last_kept, pick)
    tokens = head[everyone, pick]
    return [int(t) if ok else -1 for t, ok in
            zip(tokens.tolist(), enough.tolist(), strict=True)]


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
    weights = weights.astype(np.float64)  # one row: the sums in float64
    kept = None
    if 0 < k < vocab:
        kept = _head(scaled, lambda ids: len(ids) >= k)[:k]
        total = float(np.cumsum(weights[kept])[-1])  # as _draw_rows sums it
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
