"""Batches: pairs encoded to ids, one epoch's shuffled length-bucketed order, padding."""

from __future__ import annotations

import numpy as np

from serve.runtime.tokenizer import PAD_ID, Tokenizer

BUCKET_BATCHES = 32  # pairs are sorted by length within windows of this many batches
EncodedPair = tuple[list[int], list[int]]


def encode_pairs(tokenizer: Tokenizer, pairs) -> list[EncodedPair]:
    return [(tokenizer.tokens_to_ids(q), tokenizer.tokens_to_ids(a)) for q, a in pairs]


def make_batches(pairs: list[EncodedPair], batch_size: int, seed: int, epoch: int):
    """Index batches of one epoch: shuffled, length-bucketed, a pure function of (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(pairs))
    window = batch_size * BUCKET_BATCHES
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window],
                       key=lambda i: (len(pairs[i][0]), len(pairs[i][1])))
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def pad_batch(pairs: list[EncodedPair], indices) -> tuple[np.ndarray, ...]:
    """src [B,S], src_len [B], tgt_in = <s> answer [B,T], tgt_out = answer </s> [B,T]."""
    from serve.runtime.tokenizer import BOS_ID, EOS_ID

    srcs = [pairs[i][0] for i in indices]
    tgts = [pairs[i][1] for i in indices]
    src = np.full((len(srcs), max(map(len, srcs))), PAD_ID, np.int32)
    tgt_in = np.full((len(tgts), max(map(len, tgts)) + 1), PAD_ID, np.int32)
    tgt_out = np.full_like(tgt_in, PAD_ID)
    for row, (s, t) in enumerate(zip(srcs, tgts, strict=True)):
        src[row, :len(s)] = s
        tgt_in[row, :len(t) + 1] = [BOS_ID, *t]
        tgt_out[row, :len(t) + 1] = [*t, EOS_ID]
    return src, np.array([len(s) for s in srcs], np.int32), tgt_in, tgt_out
