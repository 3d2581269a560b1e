"""The greedy replies decoded at each epoch end, and their metrics (as serve evaluates)."""

from __future__ import annotations

from collections import Counter

import numpy as np

from serve.runtime.tokenizer import PAD_ID

MAX_REPLY_TOKENS = 30  # the greedy replies of the epoch-end evaluation, as serve evaluates


def make_greedy_decoder(model, max_tokens: int = MAX_REPLY_TOKENS):
    """decode(sources: list of id lists) -> reply id lists (without </s>), batched greedy.

    A Python loop over ``model.encode`` / ``model.decode_step`` (each a tf.function traced
    once), with <pad>, <unk> and <s> never chosen, as serving decodes.
    """
    import tensorflow as tf

    from serve.runtime.tokenizer import BOS_ID, EOS_ID, UNK_ID

    encode = tf.function(lambda src, src_len: model.encode(src, src_len, training=False),
                         input_signature=[tf.TensorSpec([None, None], tf.int32),
                                          tf.TensorSpec([None], tf.int32)])
    step = tf.function(model.decode_step)
    banned = [PAD_ID, UNK_ID, BOS_ID]

    def decode(sources: list[list[int]]) -> list[list[int]]:
        src = np.full((len(sources), max(map(len, sources))), PAD_ID, np.int32)
        for row, ids in enumerate(sources):
            src[row, :len(ids)] = ids
        src_len = np.array([len(ids) for ids in sources], np.int32)
        memory, keys, h, c = encode(src, src_len)
        src_mask = tf.sequence_mask(src_len, src.shape[1], dtype=memory.dtype)
        prev = tf.fill([len(sources)], BOS_ID)
        replies: list[list[int]] = [[] for _ in sources]
        done = np.zeros(len(sources), bool)
        for _ in range(max_tokens):
            log_probs, h, c, _ = step(prev, h, c, memory, keys, src_mask)
            scores = log_probs.numpy()
            scores[:, banned] = -np.inf
            picked = scores.argmax(axis=-1).astype(np.int32)
            for row in np.flatnonzero(~done):
                if picked[row] == EOS_ID:
                    done[row] = True
                else:
                    replies[row].append(int(picked[row]))
            if done.all():
                break
            prev = tf.constant(picked)
        return replies

    return decode


def reply_metrics(replies: list[str], references: list[str]) -> dict[str, float]:
    """valid_distinct2, valid_top10_share, valid_bleu2: on characters, as serve evaluates."""
    from serve.runtime.evaluate import bleu, distinct

    top10 = sum(n for _, n in Counter(replies).most_common(10))  # as evaluate's mode_report
    return {"valid_distinct2": distinct(replies, 2),
            "valid_top10_share": top10 / len(replies),
            "valid_bleu2": bleu(replies, references, 2)}
