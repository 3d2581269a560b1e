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

    Rows go in groups of heads within 4x of each other's size, each group padded to its
    own widest: one flat row (thousands of tokens in its head) then widens only its own
    group's arrays, not every row's. A row's draw is the same in any group."""
    vocab = weights.shape[1]
    in_head = weights >= np.exp(-HEAD_MARGIN)
    size = np.count_nonzero(in_head, axis=1)
    group = np.frexp(size)[1] // 2
    drawn = [-1] * len(options)
    for g in np.unique(group):
        members = np.flatnonzero(group == g)
        # by row, ids ascending (np.nonzero of a 2-D mask is many times slower)
        row, ids = np.divmod(np.flatnonzero(in_head[members]), vocab)
        width = int(size[members].max())
        at = np.arange(len(row)) - np.concatenate(([0], np.cumsum(size[members])[:-1]))[row]
        head = np.full((len(members), width), vocab, np.int64)  # id order; vocab: none
        mass = np.zeros((len(members), width), np.float32)
        head[row, at], mass[row, at] = ids, weights[members[row], ids]
        picked = _draw_group(weights, members, head, mass, size[members], totals[members],
                             [options[j] for j in members], [rngs[j] for j in members])
        for j, token in zip(members.tolist(), picked, strict=True):
            drawn[j] = token
    return drawn


def _draw_group(weights: np.ndarray, members: np.ndarray, head: np.ndarray,
                mass: np.ndarray, size: np.ndarray, totals: np.ndarray,
                options: Sequence[DecodingOptions],
                rngs: Sequence[np.random.Generator]) -> list[int]:
    """``_draw_rows`` for the rows ``members`` of ``weights``: ``head``/``mass`` [rows,
    width], each row's head in id order and padded after its ``size`` tokens."""
    vocab, width = weights.shape[1], head.shape[1]
    k = np.array([o.sampling_topk if 0 < o.sampling_topk < vocab else 0 for o in options])
    top_p = np.array([o.sampling_topp for o in options])
    ranked, position = _by_mass(mass)
    cumulative = np.cumsum(ranked, axis=1, dtype=np.float64)
    limit = np.where(k > 0, np.minimum(k, size), size)
    norm = np.where(k > 0, cumulative[np.arange(len(options)), np.maximum(limit - 1, 0)],
                    totals)
    nucleus = (cumulative / norm[:, None] < top_p[:, None]).sum(axis=1) + 1
    kept = np.where(top_p < 1.0, np.minimum(nucleus, limit), limit)
    enough = np.where(k > 0, size >= k, (top_p < 1.0) & (nucleus <= size))
    beyond = np.arange(width)[None, :] >= kept[:, None]
    if 4 * width > vocab:  # wide heads (flat rows): id order from a mask, not a sort
        ranked_ids = np.take_along_axis(head, position, axis=1)
        return _pick_dense(weights[members], ranked_ids, beyond, enough, rngs)
    # The kept tokens in id order: the head's own order, the others' masses zeroed (a
    # zero adds nothing to a cumulative sum, so each kept token's is as without them).
    keep = np.zeros(mass.shape, bool)
    chosen_rows, ranks = np.nonzero(~beyond)
    keep[chosen_rows, position[chosen_rows, ranks]] = True
    cdf = np.cumsum(np.where(keep, mass, 0.0), axis=1, dtype=np.float64)
    drawn = []
    for j, rng in enumerate(rngs):
        if not enough[j]:
            drawn.append(-1)
            continue
        pick = int(np.searchsorted(cdf[j], rng.random() * cdf[j, -1], side="right"))
        if pick == width:  # u * total rounded up to the total: the last kept token
            pick = int(np.flatnonzero(keep[j])[-1])
        drawn.append(int(head[j, pick]))  # a kept one: only those raise the sum
    return drawn


def _by_mass(mass: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's masses, most likely first (ties: lower position first), and the head
    position each came from: one sort of integer keys (a mass's float32 bits, which
    order as the non-negative floats do, above its position), no argsort and gathers."""
    bits = max(1, (mass.shape[1] - 1).bit_length())
    inverted = np.uint64(0xFFFFFFFF) - mass.view(np.uint32).astype(np.uint64)
    keys = np.sort((inverted << np.uint64(bits)) | np.arange(mass.shape[1], dtype=np.uint64),
                   axis=1)
    position = (keys & np.uint64((1 << bits) - 1)).astype(np.int64)
    ranked = (np.uint64(0xFFFFFFFF) - (keys >> np.uint64(bits))).astype(np.uint32)
    return ranked.view(np.float32), position


def _pick_dense(weights: np.ndarray, head: np.ndarray, beyond: np.ndarray,
                enough: np.ndarray, rngs: Sequence[np.random.Generator]) -> list[int]:
    """The draws of ``_draw_rows`` over the whole vocabulary in id order, zero where a
    token is not kept: the same cumulative sums at the kept tokens (adding 0.0 changes
    none), so the same tokens, without sorting thousands of kept ids."""
    rows, vocab = weights.shape
    keep = np.zeros((rows, vocab), bool)
    r, c = np.nonzero(~beyond & (head < vocab))
    keep[r, head[r, c]] = True
    cdf = np.cumsum(np.where(keep, weights, 0.0), axis=1, dtype=np.float64)
    drawn = []
    for j, rng in enumerate(rngs):
        if not enough[j]:
            drawn.append(-1)
            continue
        pick = int(np.searchsorted(cdf[j], rng.random() * cdf[j, -1], side="right"))
        drawn.append(pick if pick < vocab else int(np.flatnonzero(keep[j])[-1]))
    return drawn


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
