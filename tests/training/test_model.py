"""The seq2seq (training.model): a loop of ``decode_step`` (what export converts) computes
what the training pass ``call`` computes over the whole target."""

from __future__ import annotations

import numpy as np
import pytest

from training.environment import configure_tensorflow_environment

configure_tensorflow_environment()
tf = pytest.importorskip("tensorflow")

from training.model import ModelConfig, build_model  # noqa: E402

pytestmark = pytest.mark.tensorflow


@pytest.mark.parametrize("tie_output", [True, False])
def test_a_loop_of_decode_steps_equals_the_training_pass(tie_output):
    tf.keras.utils.set_random_seed(3)
    model = build_model(ModelConfig(vocab_size=50, embed_dim=16, hidden_dim=24,
                                    tie_output=tie_output))
    rng = np.random.default_rng(3)
    src = rng.integers(4, 50, size=(3, 7))
    src_len = np.array([7, 4, 1])
    tgt_in = rng.integers(4, 50, size=(3, 5))
    whole = model((src, src_len, tgt_in), training=False).numpy()  # [B,T,V]

    memory, keys, h, c = model.encode(src, src_len)
    mask = tf.sequence_mask(src_len, 7, dtype=tf.float32)
    for t in range(tgt_in.shape[1]):
        log_probs, h, c, attention = model.decode_step(tgt_in[:, t], h, c, memory, keys, mask)
        np.testing.assert_allclose(log_probs.numpy(), whole[:, t], atol=1e-5)
        assert np.array_equal(log_probs.numpy().argmax(1), whole[:, t].argmax(1))
        np.testing.assert_allclose(attention.numpy().sum(1), 1.0, atol=1e-6)
        assert not attention.numpy()[2, 1:].any()  # a padded position gets no weight
