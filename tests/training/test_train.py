"""The training loop: it learns, it resumes exactly, and its checkpoint folder is complete."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from serve.runtime.tokenizer import BOS_ID, Vocab  # noqa: E402
from training.batches import make_batches, pad_batch  # noqa: E402
from training.checkpoint import CheckpointError, load_checkpoint, read_metrics  # noqa: E402
from training.config import ConfigError, TrainConfig  # noqa: E402
from training.corpus import CorpusError  # noqa: E402
from training.data import prepare_data  # noqa: E402
from training.train import train  # noqa: E402

pytestmark = pytest.mark.tensorflow


def tiny_config(**overrides) -> TrainConfig:
    settings = dict(embed_dim=16, hidden_dim=32, batch_size=16, min_freq=1, vocab_size=2000,
                    seed=7, progress=False, checkpoint_every=5)
    return TrainConfig(**{**settings, **overrides})


def weights_of(checkpoint_dir) -> list[np.ndarray]:
    model, _, _ = load_checkpoint(checkpoint_dir)
    return model.get_weights()


@pytest.mark.shared_data
def test_a_tiny_run_on_real_pairs_lowers_validation_loss(real_corpora, tmp_path):
    out = train(tiny_config(epochs=4), real_corpora, tmp_path / "run")

    metrics = read_metrics(out)
    start = metrics[0]
    epochs = [m for m in metrics if m["kind"] == "epoch"]
    assert start["kind"] == "start" and len(epochs) == 4
    assert epochs[-1]["valid_loss"] < start["valid_loss"] - 1.0
    assert epochs[-1]["valid_ppl"] == pytest.approx(np.exp(epochs[-1]["valid_loss"]))
    assert all(m["tokens_per_s"] > 0 for m in epochs)

    # The folder holds everything export needs, and no path of this machine.
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "vocab.txt", "model.weights.h5", "state", "metrics.jsonl",
            "valid.tsv"} <= names
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["format_version"] == 1
    assert config["corpora"] == [
        {"file": "xhj_head.conv", "format": "conv", "pairs": 400},
        {"file": "cdial_head.txt", "format": "cdial", "pairs": 200},
    ]
    assert config["cleaning"]["read"] == 600 and config["cleaning"]["blocklist"] > 0
    assert config["model"]["vocab_size"] == len(Vocab.load(out))
    for path in out.rglob("*"):
        if path.is_file() and path.suffix not in (".h5", ".index") and "data-" not in path.name:
            assert str(tmp_path) not in path.read_text(encoding="utf-8", errors="replace")
    valid = (out / "valid.tsv").read_text(encoding="utf-8").splitlines()
    assert len(valid) == round(config["cleaning"]["kept"] * 0.05)
    assert all(line.count("\t") == 1 for line in valid)

    # load_checkpoint gives a model that scores the held-out pairs as the last epoch did.
    model, tokenizer, loaded = load_checkpoint(out)
    assert loaded == config
    question, answer = valid[0].split("\t")
    src = np.array([tokenizer.encode(question)], np.int32)
    tgt_in = np.array([[BOS_ID, *tokenizer.encode(answer)]], np.int32)
    log_probs = model((src, np.array([src.shape[1]], np.int32), tgt_in)).numpy()
    assert log_probs.shape == (1, tgt_in.shape[1], len(tokenizer.vocab))
    assert np.allclose(np.exp(log_probs).sum(-1), 1.0, atol=1e-4)


def test_a_test_split_is_set_aside_before_training_and_never_seen(synthetic_corpus, tmp_path):
    config = tiny_config(max_steps=1, test_fraction=0.1, valid_fraction=0.1)
    data = prepare_data(config, [synthetic_corpus], None)
    train_pairs, valid_texts, test_texts, report = (data.train_segmented, data.valid_texts,
                                                     data.test_texts, data.report)
    assert len(test_texts) == round(report.kept * 0.1) and len(valid_texts) == len(test_texts)
    assert len(train_pairs) + len(valid_texts) + len(test_texts) == report.kept
    trained = {("".join(q), "".join(a)) for q, a in train_pairs}
    assert not trained & set(test_texts) and not set(valid_texts) & set(test_texts)
    out = train(config, [synthetic_corpus], tmp_path / "run")
    lines = (out / "test.tsv").read_text(encoding="utf-8").splitlines()
    assert [tuple(line.split("\t")) for line in lines] == test_texts
    # Without a test fraction there is no test file, and the validation split is as before.
    plain = train(tiny_config(max_steps=1), [synthetic_corpus], tmp_path / "plain")
    assert not (plain / "test.tsv").exists()


def test_holdout_from_reuses_an_earlier_runs_held_out_pairs(synthetic_corpus, tmp_path):
    first = train(tiny_config(max_steps=1, test_fraction=0.1, valid_fraction=0.1),
                  [synthetic_corpus], tmp_path / "first")
    # Another cleaning (a repeat cap) keeps other pairs, but the held-out ones are the same.
    config = tiny_config(max_steps=1, holdout_from=str(first), max_answer_repeats=1)
    data = prepare_data(config, [synthetic_corpus], None)
    read = lambda name: [tuple(line.split("\t"))  # noqa: E731
                         for line in (first / name).read_text(encoding="utf-8").splitlines()]
    assert data.valid_texts == read("valid.tsv") and data.test_texts == read("test.tsv")
    assert not set(data.train_texts) & (set(data.valid_texts) | set(data.test_texts))
    assert data.train_texts


def test_interrupted_and_resumed_ends_with_the_same_weights(synthetic_corpus, tmp_path):
    # 152 training pairs = 10 batches an epoch: stop mid-epoch, resume across epoch ends.
    whole = train(tiny_config(epochs=3, max_steps=24), [synthetic_corpus], tmp_path / "whole")
    part = train(tiny_config(epochs=3, max_steps=13), [synthetic_corpus], tmp_path / "part")
    assert read_metrics(part)[-1]["step"] == 13
    assert not all(np.array_equal(a, b) for a, b in zip(weights_of(whole), weights_of(part),
                                                           strict=True))
    train(tiny_config(epochs=3, max_steps=24), [synthetic_corpus], part, resume=True)

    for a, b in zip(weights_of(whole), weights_of(part), strict=True):
        np.testing.assert_array_equal(a, b)  # bit-exact, not approximately
    whole_epochs = [m["valid_loss"] for m in read_metrics(whole) if m["kind"] == "epoch"]
    part_epochs = [m["valid_loss"] for m in read_metrics(part) if m["kind"] == "epoch"]
    assert whole_epochs == part_epochs and len(whole_epochs) == 2


def test_sgd_decays_its_rate_on_a_plateau(synthetic_corpus, tmp_path):
    # A learning rate this small cannot improve the validation loss: every epoch decays it.
    out = train(tiny_config(epochs=3, optimizer="sgd", learning_rate=1e-9, lr_decay=0.5,
                            patience=0), [synthetic_corpus], tmp_path / "sgd")
    rates = [m["learning_rate"] for m in read_metrics(out) if m["kind"] == "epoch"]
    assert rates[0] == pytest.approx(1e-9) and rates[-1] < rates[0]


def test_early_stopping_ends_the_run_after_patience_epochs(synthetic_corpus, tmp_path):
    out = train(tiny_config(epochs=20, optimizer="sgd", learning_rate=1e-9, patience=2),
                [synthetic_corpus], tmp_path / "early")
    epochs = [m for m in read_metrics(out) if m["kind"] == "epoch"]
    assert len(epochs) <= 3  # the first epoch may improve by rounding; then two bad ones


def test_resume_refuses_a_changed_model_and_a_folder_without_checkpoint(synthetic_corpus,
                                                                        tmp_path):
    out = train(tiny_config(max_steps=2, epochs=1), [synthetic_corpus], tmp_path / "run")
    with pytest.raises(ConfigError, match="hidden_dim 32 -> 64"):
        train(tiny_config(hidden_dim=64, max_steps=4), [synthetic_corpus], out, resume=True)
    with pytest.raises(ConfigError, match="already holds a checkpoint"):
        train(tiny_config(max_steps=4), [synthetic_corpus], out)
    fewer = tmp_path / "fewer.tsv"
    fewer.write_text("".join(synthetic_corpus.read_text("utf-8").splitlines(True)[:100]), "utf-8")
    with pytest.raises(CorpusError, match="corpora and cleaning of the saved run"):
        train(tiny_config(max_steps=4), [fewer], out, resume=True)
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        train(tiny_config(), [synthetic_corpus], tmp_path / "empty", resume=True)


def test_max_minutes_stops_and_saves(synthetic_corpus, tmp_path, caplog):
    caplog.set_level("INFO", logger="training")
    out = train(tiny_config(epochs=1000, max_minutes=0.03), [synthetic_corpus], tmp_path / "t")
    assert "max_minutes 0.03 reached" in caplog.text
    assert read_metrics(out)[-1]["step"] < 1000 * 10  # 10 batches an epoch
    assert (out / "model.weights.h5").is_file()


def test_batches_are_length_bucketed_and_a_function_of_seed_and_epoch():
    rng = np.random.default_rng(0)
    pairs = [(list(range(n)), list(range(m))) for n, m in rng.integers(1, 30, (500, 2))]
    first = make_batches(pairs, 16, seed=1, epoch=0)
    assert [list(b) for b in first] == [list(b) for b in make_batches(pairs, 16, 1, 0)]
    assert [list(b) for b in first] != [list(b) for b in make_batches(pairs, 16, 1, 1)]
    assert sorted(i for b in first for i in b) == list(range(500))
    src, src_len, tgt_in, tgt_out = pad_batch(pairs, first[0])
    # Bucketing: a batch is much tighter than the corpus' spread of lengths (1..29).
    assert src_len.max() - src_len.min() <= 8
    assert (tgt_in[:, 0] == BOS_ID).all()
    assert (tgt_out[np.arange(len(src_len)), [len(pairs[i][1]) for i in first[0]]] == 3).all()
