"""One model trained into one checkpoint folder: TensorFlow set up, the model, optimizer
and state built (or restored), config.json and the data files written, the loop run."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from serve.runtime.tokenizer import Tokenizer, Vocab
from training import checkpoint as ckpt
from training.batches import encode_pairs
from training.config import TrainConfig
from training.data import PreparedData, tokenizer_settings
from training.loop import Loop
from training.resume import check_same_data, command_history

log = logging.getLogger("training")


def _setup_tensorflow(config: TrainConfig):
    import keras
    import tensorflow as tf

    if config.threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(config.threads)
            tf.config.threading.set_inter_op_parallelism_threads(config.threads)
        except RuntimeError:  # TensorFlow already ran something in this process
            log.warning("threads=%d ignored: TensorFlow is already initialised", config.threads)
    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(config.seed)
    return keras


def train_model(config: TrainConfig, data: PreparedData, vocab: Vocab, out: Path, *,
                resume: bool, command: str, direction: str) -> None:
    """Train one model on ``data`` (already swapped for a backward model) into ``out``."""
    if resume:
        check_same_data(out, data.corpora, data.report.to_dict())
    tokenizer = Tokenizer(vocab, tokenizer_settings(config))
    train_data = encode_pairs(tokenizer, data.train_segmented)
    valid_data = encode_pairs(tokenizer, data.valid_segmented)
    log.info("%s model: vocabulary %d tokens; %d training pairs, %d validation, %d test",
             direction, len(vocab), len(train_data), len(valid_data), len(data.test_texts))

    keras = _setup_tensorflow(config)
    from training.model import ModelConfig, build_model

    model_config = ModelConfig(
        vocab_size=len(vocab), embed_dim=config.embed_dim, hidden_dim=config.hidden_dim,
        bidirectional=config.bidirectional, share_embedding=config.share_embedding,
        tie_output=config.tie_output, dropout=config.dropout,
    )
    model = build_model(model_config)
    lr = config.effective_learning_rate
    optimizer = (keras.optimizers.Adam(lr) if config.optimizer == "adam"
                 else keras.optimizers.SGD(lr))
    optimizer.build(model.trainable_variables)
    out.mkdir(parents=True, exist_ok=True)
    state = ckpt.TrainingState(model, optimizer, out,
                               track_selection=config.select_by != "valid_loss")
    if resume:
        state.restore()
        ckpt.truncate_metrics(out, int(state.step.numpy()))
        log.info("resumed at step %d (epoch %d, batch %d)", int(state.step.numpy()),
                 int(state.epoch.numpy()) + 1, int(state.batch_in_epoch.numpy()))
    ckpt.save_config(out, {
        "model": model_config.to_dict(),
        "train": config.to_dict(),
        "direction": direction,
        "tokenizer": asdict(tokenizer.settings),
        "corpora": data.corpora,
        "cleaning": data.report.to_dict(),
        **command_history(out, command, resume),
    })
    _write_data_files(out, vocab, data)
    loop = Loop(config, model, optimizer, state, out, train_data, valid_data,
                 tokenizer=tokenizer, valid_texts=data.valid_texts)
    loop.run()


def _write_data_files(out: Path, vocab: Vocab, data: PreparedData) -> None:
    ckpt.save_vocab(out, vocab)
    ckpt.save_pairs(out / ckpt.TRAIN_FILE, data.train_texts)
    ckpt.save_pairs(out / ckpt.VALID_FILE, data.valid_texts)
    if data.test_texts:
        ckpt.save_pairs(out / ckpt.TEST_FILE, data.test_texts)
