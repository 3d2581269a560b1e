"""The options of issue 14: loss variants, char tokens, the backward model, train.tsv and
the choice of the best epoch by reply metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("tensorflow")

import tensorflow as tf  # noqa: E402

from serve.runtime.tokenizer import EOS_ID, Vocab  # noqa: E402
from training.checkpoint import load_checkpoint, read_metrics  # noqa: E402
from training.config import ConfigError  # noqa: E402
from training.data import prepare_data  # noqa: E402
from training.loss import itf_weights, training_loss  # noqa: E402
from training.train import train  # noqa: E402

from .test_train import tiny_config, weights_of  # noqa: E402

pytestmark = pytest.mark.tensorflow


def read_tsv(path) -> list[tuple[str, str]]:
    return [tuple(line.split("\t")) for line in path.read_text("utf-8").splitlines()]


# -- loss -------------------------------------------------------------------------------


def test_label_smoothing_and_token_weights_match_a_hand_computation():
    # Two sequences of two steps over a vocabulary of 5; the second sequence has padding.
    probs = np.array([[[0.1, 0.1, 0.1, 0.2, 0.5], [0.2, 0.2, 0.2, 0.2, 0.2]],
                      [[0.05, 0.05, 0.1, 0.7, 0.1], [0.2, 0.2, 0.2, 0.2, 0.2]]])
    log_probs = tf.constant(np.log(probs), tf.float32)
    tgt_out = tf.constant([[4, 3], [3, 0]], tf.int32)  # 0 = <pad>
    eps = 0.1
    logp = np.log(probs)
    hand = [(1 - eps) * -logp[b, t, y] - eps * logp[b, t].mean()
            for b, t, y in [(0, 0, 4), (0, 1, 3), (1, 0, 3)]]
    assert float(training_loss(log_probs, tgt_out, label_smoothing=eps)) == pytest.approx(
        np.mean(hand), rel=1e-6)
    assert float(training_loss(log_probs, tgt_out)) == pytest.approx(
        np.mean([-logp[0, 0, 4], -logp[0, 1, 3], -logp[1, 0, 3]]), rel=1e-6)
    weights = tf.constant([1.0, 1.0, 1.0, 0.5, 2.0])
    weighted = (2.0 * hand[0] + 0.5 * hand[1] + 0.5 * hand[2]) / 3  # divided by the tokens
    assert float(training_loss(log_probs, tgt_out, label_smoothing=eps,
                               token_weights=weights)) == pytest.approx(weighted, rel=1e-6)


def test_itf_weights_from_known_counts():
    # Answers [5 5 5] and [6]: freq 5 -> 3, 6 -> 1, </s> -> 2 (one per answer); N = 6.
    weights = itf_weights([[5, 5, 5], [6]], vocab_size=8, power=1.0)
    # w = c / freq with c = N / sum(freq^0) = 6 / 3 = 2.
    assert weights[5] == pytest.approx(2 / 3) and weights[6] == pytest.approx(2.0)
    assert weights[EOS_ID] == pytest.approx(1.0)
    assert weights[7] == pytest.approx(2.0)  # never a target: as if seen once
    counts = np.array([0, 0, 0, 2, 0, 3, 1, 0])
    assert (counts * weights).sum() / counts.sum() == pytest.approx(1.0)  # mean 1 per token
    half = itf_weights([[5, 5, 5], [6]], vocab_size=8, power=0.5)
    assert half[5] / half[6] == pytest.approx(3 ** -0.5)
    assert np.allclose(itf_weights([[5, 5, 5], [6]], 8, 0.0), 1.0)


def test_loss_options_train_and_validation_stays_plain_nll(synthetic_corpus, tmp_path):
    plain = train(tiny_config(max_steps=3, eval_replies=0), [synthetic_corpus], tmp_path / "a")
    options = train(tiny_config(max_steps=3, eval_replies=0, label_smoothing=0.1,
                                itf_power=0.5), [synthetic_corpus], tmp_path / "b")
    first_plain, first_options = read_metrics(plain), read_metrics(options)
    # Before any step the weights are equal: the validation loss must be equal too.
    assert first_plain[0]["valid_loss"] == first_options[0]["valid_loss"]
    assert first_plain[-1]["train_loss"] != first_options[-1]["train_loss"]
    assert np.isfinite(first_options[-1]["valid_loss"])


# -- char tokens ------------------------------------------------------------------------------


def test_a_char_mode_run_records_its_tokenizer(synthetic_corpus, tmp_path):
    out = train(tiny_config(max_steps=3, tokens="char"), [synthetic_corpus], tmp_path / "c")
    config = json.loads((out / "config.json").read_text("utf-8"))
    assert config["tokenizer"]["segmenter"] == "char" and config["train"]["tokens"] == "char"
    tokens = Vocab.load(out).tokens[4:]
    assert "喜" in tokens and all(len(t) == 1 or t.isascii() for t in tokens)
    _, tokenizer, _ = load_checkpoint(out)
    assert tokenizer.settings.segmenter == "char"
    assert tokenizer.decode(tokenizer.encode("小明喜欢猫吗")) == "小明喜欢猫吗"


# -- train.tsv, backward and both -------------------------------------------------------------


def test_train_tsv_holds_exactly_the_training_pairs(synthetic_corpus, tmp_path):
    config = tiny_config(max_steps=1, test_fraction=0.1, eval_replies=0)
    out = train(config, [synthetic_corpus], tmp_path / "run")
    data = prepare_data(config, [synthetic_corpus], None)
    trained = read_tsv(out / "train.tsv")
    assert trained == data.train_texts
    assert [("".join(q), "".join(a)) for q, a in data.train_segmented] == trained
    assert not set(trained) & (set(read_tsv(out / "valid.tsv")) | set(read_tsv(out / "test.tsv")))
    assert len(trained) + len(data.valid_texts) + len(data.test_texts) == data.report.kept


def test_a_backward_model_trains_on_the_swapped_pairs(synthetic_corpus, tmp_path):
    forward = train(tiny_config(max_steps=2, eval_replies=0), [synthetic_corpus],
                    tmp_path / "f")
    backward = train(tiny_config(max_steps=2, eval_replies=0, direction="backward"),
                     [synthetic_corpus], tmp_path / "b")
    assert read_tsv(backward / "train.tsv") == [(a, q) for q, a in read_tsv(forward / "train.tsv")]
    assert read_tsv(backward / "valid.tsv") == [(a, q) for q, a in read_tsv(forward / "valid.tsv")]
    assert Vocab.load(backward).tokens == Vocab.load(forward).tokens
    assert json.loads((backward / "config.json").read_text("utf-8"))["direction"] == "backward"


@pytest.mark.slow
def test_both_directions_train_in_parallel_and_resume_exactly(synthetic_corpus, tmp_path):
    # 10 batches an epoch: stop mid-epoch 1, resume across the epoch end.
    def both(max_steps):
        return tiny_config(epochs=2, max_steps=max_steps, eval_replies=8, direction="both")

    whole = train(both(14), [synthetic_corpus], tmp_path / "whole")
    part = train(both(5), [synthetic_corpus], tmp_path / "part")
    for folder in (part, part / "backward"):
        assert read_metrics(folder)[-1]["step"] == 5
    train(both(14), [synthetic_corpus], part, resume=True)

    forward_config = json.loads((part / "config.json").read_text("utf-8"))
    backward_config = json.loads((part / "backward" / "config.json").read_text("utf-8"))
    assert forward_config["direction"] == "forward"
    assert forward_config["train"]["direction"] == "both"  # so that --resume resumes both
    assert backward_config["direction"] == "backward"
    assert backward_config["train"]["direction"] == "backward"
    assert forward_config["train"]["threads"] == backward_config["train"]["threads"] >= 1
    assert (part / "backward" / "vocab.txt").read_text("utf-8") == (
        (part / "vocab.txt").read_text("utf-8"))
    assert read_tsv(part / "backward" / "train.tsv") == [
        (a, q) for q, a in read_tsv(part / "train.tsv")]
    for a_dir, b_dir in ((whole, part), (whole / "backward", part / "backward")):
        assert {"model.weights.h5", "best.weights.h5", "state", "train.tsv", "valid.tsv",
                "metrics.jsonl"} <= {p.name for p in b_dir.iterdir()}
        for a, b in zip(weights_of(a_dir), weights_of(b_dir), strict=True):
            np.testing.assert_array_equal(a, b)
    # The two models differ: they learn opposite mappings.
    assert not np.array_equal(weights_of(part)[0], weights_of(part / "backward")[0])


# -- choosing the epoch -----------------------------------------------------------------


def test_reply_metrics_are_recorded_and_select_by_picks_the_best_epoch(synthetic_corpus,
                                                                       tmp_path):
    # At this rate the tiny model's BLEU-2 peaks at epoch 2 while its loss still falls
    # (here: 1.1, 23.7, 6.7), so the choice differs from valid_loss's.
    config = tiny_config(epochs=3, eval_replies=8, select_by="valid_bleu2", patience=0,
                         learning_rate=0.05)
    out = train(config, [synthetic_corpus], tmp_path / "sel")
    epochs = [m for m in read_metrics(out) if m["kind"] == "epoch"]
    assert len(epochs) == 3
    for m in epochs:
        assert 0.0 <= m["valid_distinct2"] <= 1.0 and 0.0 < m["valid_top10_share"] <= 1.0
        assert m["valid_bleu2"] >= 0.0
    values = [m["valid_bleu2"] for m in epochs]
    best = values.index(max(values))  # the first of equal values: only a gain replaces it
    assert [m["selected"] for m in epochs] == [
        i == 0 or values[i] > max(values[:i]) for i in range(3)]
    # best.weights.h5 are the weights after that epoch: a run stopped there ends with them.
    again = train(tiny_config(epochs=best + 1, eval_replies=8, select_by="valid_bleu2",
                              patience=0, learning_rate=0.05),
                  [synthetic_corpus], tmp_path / "again")
    chosen = load_checkpoint(out, weights="best")[0].get_weights()
    for a, b in zip(chosen, weights_of(again), strict=True):
        np.testing.assert_array_equal(a, b)


def test_select_by_a_reply_metric_needs_replies():
    with pytest.raises(ConfigError, match="needs eval_replies"):
        tiny_config(select_by="valid_distinct2", eval_replies=0)
    with pytest.raises(ConfigError, match="select_by must be one of"):
        tiny_config(select_by="bleu")
    with pytest.raises(ConfigError, match="direction must be one of"):
        tiny_config(direction="sideways")
