"""The objective: inverse-token-frequency weights, the training loss (label smoothing),
and the compiled train and eval steps."""

from __future__ import annotations

import numpy as np

from serve.runtime.tokenizer import PAD_ID


def itf_weights(answers: list[list[int]], vocab_size: int, power: float) -> np.ndarray:
    """Inverse-token-frequency loss weights (Nakamura et al. 2019, arXiv 1811.08100).

    freq(v) counts token v over the training answers, each answer's </s> included; then
    w(v) = c / freq(v)**power with c = N / sum_v freq(v)**(1 - power), N the number of
    training target tokens, so that the mean weight over the training target tokens is 1
    (the loss keeps its scale, and the learning rate its meaning). A token never seen in
    a training answer is never a training target; it gets c (as if seen once).
    """
    from serve.runtime.tokenizer import EOS_ID

    ids = [t for answer in answers for t in answer] + [EOS_ID] * len(answers)
    counts = np.bincount(np.asarray(ids, np.int64), minlength=vocab_size).astype(np.float64)
    raw = np.maximum(counts, 1.0) ** -power
    return (raw * counts.sum() / (counts * raw).sum()).astype(np.float32)


def training_loss(log_probs, tgt_out, *, label_smoothing: float = 0.0, token_weights=None):
    """The training objective, mean over the batch's target tokens (padding excluded).

    loss_t = (1 - eps) * (-log p[y_t]) - eps * mean_v log p[v]: label smoothing towards
    the uniform distribution, computed on the log-probabilities the model outputs (the
    cross-entropy with (1 - eps) * onehot + eps / V, without building the one-hot).
    With ``token_weights`` [V] (``itf_weights``) each token's loss is weighted by the
    weight of its target; the sum is still divided by the number of target tokens.
    """
    import tensorflow as tf

    mask = tf.cast(tf.not_equal(tgt_out, PAD_ID), log_probs.dtype)
    per_token = -tf.gather(log_probs, tgt_out, batch_dims=2)
    if label_smoothing:
        per_token = ((1.0 - label_smoothing) * per_token
                     - label_smoothing * tf.reduce_mean(log_probs, axis=-1))
    weights = mask if token_weights is None else mask * tf.gather(token_weights, tgt_out)
    return tf.reduce_sum(per_token * weights) / tf.reduce_sum(mask)


def compile_steps(model, optimizer, clip_norm: float, *, label_smoothing: float = 0.0,
                  token_weights: np.ndarray | None = None):
    """(train_step, eval_step) as tf.functions over padded int32 batches.

    train_step(src, src_len, tgt_in, tgt_out) -> the training loss (``training_loss``);
    eval_step(...) -> (summed loss, target tokens) of plain negative log-likelihood, padding
    weighted 0 like the original's target_weights: validation loss and perplexity stay
    comparable whatever the training objective.
    """
    import tensorflow as tf

    spec = [tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None, None], tf.int32)]
    weights = None if token_weights is None else tf.constant(token_weights, tf.float32)

    def masked_nll(log_probs, tgt_out):
        mask = tf.cast(tf.not_equal(tgt_out, PAD_ID), log_probs.dtype)
        nll = -tf.gather(log_probs, tgt_out, batch_dims=2)
        return tf.reduce_sum(nll * mask), tf.reduce_sum(mask)

    @tf.function(input_signature=spec)
    def train_step(src, src_len, tgt_in, tgt_out):
        with tf.GradientTape() as tape:
            log_probs = model((src, src_len, tgt_in), training=True)
            loss = training_loss(log_probs, tgt_out, label_smoothing=label_smoothing,
                                 token_weights=weights)
        variables = model.trainable_variables
        grads = tape.gradient(loss, variables)
        if clip_norm > 0:
            grads, _ = tf.clip_by_global_norm(grads, clip_norm)
        optimizer.apply_gradients(zip(grads, variables, strict=True))
        return loss

    @tf.function(input_signature=spec)
    def eval_step(src, src_len, tgt_in, tgt_out):
        return masked_nll(model((src, src_len, tgt_in), training=False), tgt_out)

    return train_step, eval_step
