"""The checkpoint folder (see ARCHITECTURE.md): what training writes and export reads.

```
config.json        format_version, model, train, direction ("forward": question -> answer,
                   "backward": answer -> question), tokenizer (TokenizerSettings: segmenter
                   "jieba" or "char"), corpora, cleaning, command, resumed_with (the
                   commands that continued the run)
vocab.txt          serve.runtime.tokenizer.Vocab
model.weights.h5   the latest weights (Keras save_weights)
best.weights.h5    the weights of the best epoch by train.select_by (default valid_loss)
state/             tf.train.Checkpoint: weights + dropout seeds, optimizer, counters (resume)
metrics.jsonl      one JSON object a line; epoch records also carry valid_distinct2,
                   valid_top10_share, valid_bleu2 (eval_replies > 0) and selected
train.tsv          the cleaned training pairs, exactly those trained on, source<TAB>target
                   (never a validation or test pair; export builds a retrieval index on it)
valid.tsv          the validation pairs (early stopping, best.weights.h5), source<TAB>target
test.tsv           with test_fraction > 0: pairs never trained on nor used to choose weights
tensorboard/       TensorBoard event files: metrics.jsonl's figures as scalars, sample
                   replies as text (training.summaries); a resume appends a file
backward/          with direction "both": the backward model's own complete checkpoint
                   folder (same split, cleaning and vocab.txt; its .tsv files swapped)
```

The .tsv files hold the pairs as the folder's model maps them: question<TAB>answer for a
forward model, answer<TAB>question for a backward one.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from serve.runtime.tokenizer import VOCAB_FILE, Tokenizer, TokenizerSettings, Vocab

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"
BEST_WEIGHTS_FILE = "best.weights.h5"  # the weights of the best validation loss so far
STATE_DIR = "state"
METRICS_FILE = "metrics.jsonl"
TRAIN_FILE = "train.tsv"
VALID_FILE = "valid.tsv"
TEST_FILE = "test.tsv"


class CheckpointError(ValueError):
    """The folder is not a (complete) checkpoint folder."""


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_config(out: Path, config: dict) -> Path:
    path = Path(out) / CONFIG_FILE
    _atomic_write_text(path, json.dumps({"format_version": FORMAT_VERSION, **config},
                                        ensure_ascii=False, indent=2) + "\n")
    return path


def read_config(checkpoint_dir: str | Path) -> dict:
    path = Path(checkpoint_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{checkpoint_dir} is not a checkpoint folder: no {CONFIG_FILE}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {config.get('format_version')!r}, "
                              f"this code reads {FORMAT_VERSION}")
    return config


def save_vocab(out: Path, vocab: Vocab) -> Path:
    return vocab.save(Path(out) / VOCAB_FILE)


def save_weights(out: Path, model, name: str = WEIGHTS_FILE) -> Path:
    """Keras ``save_weights``, through a temporary file so a crash never leaves half a file."""
    path = Path(out) / name
    tmp = path.with_name("tmp." + name)  # Keras insists on the .weights.h5 suffix
    with warnings.catch_warnings():  # Keras 3.15's h5 writer trips numpy 2's copy= warning
        warnings.simplefilter("ignore", DeprecationWarning)
        model.save_weights(tmp)
    os.replace(tmp, path)
    return path


def save_pairs(path: Path, pairs: list[tuple[str, str]]) -> Path:
    """question<TAB>answer lines (train.tsv, valid.tsv, test.tsv)."""
    _atomic_write_text(path, "".join(f"{q}\t{a}\n" for q, a in pairs))
    return path


def append_metrics(out: Path, record: dict) -> None:
    with (Path(out) / METRICS_FILE).open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_metrics(checkpoint_dir: str | Path) -> list[dict]:
    path = Path(checkpoint_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def truncate_metrics(out: Path, last_step: int) -> None:
    """Drop records written after the checkpoint a run resumes from (e.g. after a crash)."""
    records = [r for r in read_metrics(out) if r.get("step", 0) <= last_step]
    _atomic_write_text(Path(out) / METRICS_FILE,
                       "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def load_checkpoint(checkpoint_dir: str | Path, weights: str = "latest"):
    """(model, tokenizer, config.json as a dict). ``weights``: "latest", or "best" (the
    best validation loss; the latest where no validation improved yet)."""
    from training.model import ModelConfig, build_model  # TensorFlow only when needed

    checkpoint_dir = Path(checkpoint_dir)
    config = read_config(checkpoint_dir)
    for name in (VOCAB_FILE, WEIGHTS_FILE):
        if not (checkpoint_dir / name).is_file():
            raise CheckpointError(f"{checkpoint_dir} is not a complete checkpoint: no {name}")
    tokenizer = Tokenizer(Vocab.load(checkpoint_dir / VOCAB_FILE),
                          TokenizerSettings(**config.get("tokenizer", {})))
    model_config = ModelConfig(**config["model"])
    if model_config.vocab_size != len(tokenizer.vocab):
        raise CheckpointError(f"{checkpoint_dir}: config.json says vocab_size "
                              f"{model_config.vocab_size}, vocab.txt has {len(tokenizer.vocab)}")
    if weights not in ("latest", "best"):
        raise CheckpointError(f"weights must be latest or best, not {weights!r}")
    path = checkpoint_dir / WEIGHTS_FILE
    if weights == "best" and (checkpoint_dir / BEST_WEIGHTS_FILE).is_file():
        path = checkpoint_dir / BEST_WEIGHTS_FILE
    model = build_model(model_config)
    model.load_weights(path)
    return model, tokenizer, config


# -- the resumable state (TensorFlow) ----------------------------------------------------


class TrainingState:
    """Everything ``--resume`` needs to continue bit-exactly, as one tf.train.Checkpoint.

    The model and optimizer variables are checkpointed as flat lists: Keras 3 models do not
    track every sub-layer for ``tf.train.Checkpoint`` (the LSTMs go missing), and the lists
    also carry the dropout layers' seed-generator states. The data order is a function of
    (seed, epoch), so ``epoch`` and ``batch_in_epoch`` are its whole state.

    With ``track_selection`` (select_by other than valid_loss) it also holds
    ``best_selected``, the best selection score so far (lower is better: a metric where
    higher is better is stored negated). Only then, so older checkpoints still restore.
    """

    def __init__(self, model, optimizer, directory: Path, *, track_selection: bool = False):
        import tensorflow as tf

        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.batch_in_epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.best_valid_loss = tf.Variable(float("inf"), dtype=tf.float64, trainable=False)
        self.bad_epochs = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.best_selected = tf.Variable(float("inf"), dtype=tf.float64, trainable=False)
        tracked = {"best_selected": self.best_selected} if track_selection else {}
        self.checkpoint = tf.train.Checkpoint(
            model=list(model.variables),
            optimizer=list(optimizer.variables),
            step=self.step,
            epoch=self.epoch,
            batch_in_epoch=self.batch_in_epoch,
            best_valid_loss=self.best_valid_loss,
            bad_epochs=self.bad_epochs,
            **tracked,
        )
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, str(Path(directory) / STATE_DIR), max_to_keep=1
        )

    def save(self) -> None:
        self.manager.save(checkpoint_number=int(self.step.numpy()))

    def restore(self) -> None:
        latest = self.manager.latest_checkpoint
        if latest is None:
            raise CheckpointError(f"nothing to resume: no {STATE_DIR}/ checkpoint")
        try:
            self.checkpoint.restore(latest).assert_consumed()
        except AssertionError as e:
            raise CheckpointError(f"the saved state does not match this model/optimizer "
                                  f"({str(e).splitlines()[0]})") from None
