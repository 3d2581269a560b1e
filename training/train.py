"""The training loop: corpora -> clean pairs -> vocab -> Seq2Seq, with exact resume.

Reproducibility: the weights, the dropout masks, the validation split and the data order
all derive from ``config.seed``; with ``TF_ENABLE_ONEDNN_OPTS=0`` (set by the CLI before
TensorFlow loads) and op determinism on, a run interrupted and resumed ends with the same
weights, bit for bit, as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from serve.runtime.blocklist import Blocklist, BlocklistError
from serve.runtime.tokenizer import PAD_ID, SPECIAL_TOKENS, Tokenizer, TokenizerSettings, Vocab
from training import checkpoint as ckpt
from training.config import ConfigError, TrainConfig
from training.corpus import CorpusError, clean_pairs, read_corpus

log = logging.getLogger("training")

BUCKET_BATCHES = 32  # pairs are sorted by length within windows of this many batches
# What --resume may change; every other setting must equal the saved run's.
RESUMABLE_SETTINGS = {"epochs", "max_steps", "max_minutes", "checkpoint_every", "progress",
                      "threads", "patience"}

EncodedPair = tuple[list[int], list[int]]


class TrainingInterrupted(Exception):
    """Ctrl-C: a checkpoint was saved at ``step``; ``--resume`` continues from it."""

    def __init__(self, step: int, out: Path):
        super().__init__(f"interrupted at step {step}; checkpoint saved in {out}; "
                         f"continue with --resume")
        self.step = step


# -- data -----------------------------------------------------------------------------


def prepare_data(config: TrainConfig, corpora: list[Path], formats: list[str] | None):
    """Read, clean and split: (train segmented, valid segmented, valid texts, test texts,
    corpora info, cleaning report). The test pairs come off the shuffled pairs first."""
    if formats is not None and len(formats) not in (1, len(corpora)):
        raise CorpusError(f"give one --format for all corpora or one per corpus "
                          f"({len(corpora)}), not {len(formats)}")
    raw, corpora_info = [], []
    for index, path in enumerate(corpora):
        fmt = None if not formats else formats[0] if len(formats) == 1 else formats[index]
        fmt, pairs = read_corpus(Path(path), fmt)
        raw.extend(pairs)
        corpora_info.append({"file": Path(path).name, "format": fmt, "pairs": len(pairs)})
        log.info("read %d pairs from %s (%s)", len(pairs), Path(path).name, fmt)
    blocklist_path = config.blocklist_path()
    try:
        blocklist = Blocklist.load(blocklist_path) if blocklist_path is not None else None
    except BlocklistError as e:
        raise CorpusError(str(e)) from None
    segmenter = Tokenizer(Vocab(list(SPECIAL_TOKENS)))
    segmented, texts, report = clean_pairs(
        raw, segmenter.segment, max_src_len=config.max_src_len,
        max_tgt_len=config.max_tgt_len, blocklist=blocklist,
        max_answer_repeats=config.max_answer_repeats,
    )
    log.info(report.line())
    if report.kept == 0:
        raise CorpusError(f"the corpus is empty after cleaning ({report.line()})")
    n_test = min(config.test_max, round(report.kept * config.test_fraction))
    if config.test_fraction:
        n_test = max(1, n_test)
    n_valid = max(1, min(config.valid_max, round(report.kept * config.valid_fraction)))
    if report.kept < n_test + n_valid + 1:
        raise CorpusError(f"need at least {n_test + n_valid + 1} pairs after cleaning (to train, "
                          f"validate and test), got {report.kept}")
    order = np.random.default_rng(config.seed).permutation(report.kept)
    test_idx = order[:n_test]
    valid_idx, train_idx = order[n_test:n_test + n_valid], order[n_test + n_valid:]
    train_pairs = [segmented[i] for i in train_idx]
    valid_segmented = [segmented[i] for i in valid_idx]
    valid_texts = [texts[i] for i in valid_idx]
    test_texts = [texts[i] for i in test_idx]
    return train_pairs, valid_segmented, valid_texts, test_texts, corpora_info, report


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


# -- the run --------------------------------------------------------------------------


def default_command(corpora: list[Path], out: Path, formats: list[str] | None) -> str:
    parts = ["python -m training"]
    parts += [f"--corpus {Path(c).name}" for c in corpora]
    parts += [f"--format {f}" for f in formats or []]
    return " ".join([*parts, f"--out {Path(out).name}"])


def _command_history(out: Path, command: str, resume: bool) -> dict:
    """The command that started the run, and each that resumed it (the exact recipe)."""
    if not resume:
        return {"command": command}
    saved = ckpt.read_config(out)
    return {"command": saved.get("command", command),
            "resumed_with": [*saved.get("resumed_with", []), command]}


def _check_resumable(config: TrainConfig, out: Path) -> None:
    saved = ckpt.read_config(out)["train"]
    current = config.to_dict()
    changed = sorted(k for k in current if k not in RESUMABLE_SETTINGS
                     and k in saved and saved[k] != current[k])
    if changed:
        diffs = ", ".join(f"{k} {saved[k]!r} -> {current[k]!r}" for k in changed)
        raise ConfigError(f"--resume cannot change {diffs} (only "
                          f"{', '.join(sorted(RESUMABLE_SETTINGS))} may change)")


def _check_same_data(out: Path, corpora_info: list[dict], cleaning: dict) -> None:
    # The split and the data order derive from the pairs: other pairs, another run.
    saved = ckpt.read_config(out)
    if saved.get("corpora") != corpora_info or saved.get("cleaning") != cleaning:
        raise CorpusError(f"--resume needs the corpora and cleaning of the saved run: saved "
                          f"{saved.get('corpora')} kept {saved.get('cleaning', {}).get('kept')}, "
                          f"now {corpora_info} kept {cleaning['kept']}")


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


def train(
    config: TrainConfig,
    corpora: list[Path],
    out: Path,
    resume: bool = False,
    formats: list[str] | None = None,
    *,
    command: str | None = None,
) -> Path:
    """Train (or with ``resume`` continue training) into the checkpoint folder ``out``."""
    config.validate()
    out = Path(out)
    if not corpora:
        raise CorpusError("no corpus given")
    if resume:
        _check_resumable(config, out)
    elif (out / ckpt.CONFIG_FILE).exists() or (out / ckpt.STATE_DIR).exists():
        raise ConfigError(f"{out} already holds a checkpoint: pass --resume to continue it, "
                          f"or choose another --out")
    train_pairs, valid_segmented, valid_texts, test_texts, corpora_info, report = prepare_data(
        config, corpora, formats
    )
    if resume:
        _check_same_data(out, corpora_info, report.to_dict())
        vocab = Vocab.load(out)
    else:
        vocab = Vocab.build((side for pair in train_pairs for side in pair),
                            min_freq=config.min_freq, max_size=config.vocab_size)
    if len(vocab) <= len(SPECIAL_TOKENS):
        raise CorpusError(f"no word is seen {config.min_freq} times: lower min_freq")
    tokenizer = Tokenizer(vocab, TokenizerSettings())
    train_data = encode_pairs(tokenizer, train_pairs)
    valid_data = encode_pairs(tokenizer, valid_segmented)
    log.info("vocabulary %d tokens; %d training pairs, %d validation, %d test",
             len(vocab), len(train_data), len(valid_data), len(test_texts))

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
    state = ckpt.TrainingState(model, optimizer, out)
    if resume:
        state.restore()
        ckpt.truncate_metrics(out, int(state.step.numpy()))
        log.info("resumed at step %d (epoch %d, batch %d)", int(state.step.numpy()),
                 int(state.epoch.numpy()) + 1, int(state.batch_in_epoch.numpy()))
    ckpt.save_config(out, {
        "model": model_config.to_dict(),
        "train": config.to_dict(),
        "tokenizer": asdict(tokenizer.settings),
        "corpora": corpora_info,
        "cleaning": report.to_dict(),
        **_command_history(out, command or default_command(corpora, out, formats), resume),
    })
    ckpt.save_vocab(out, vocab)
    ckpt.save_pairs(out / ckpt.VALID_FILE, valid_texts)
    if test_texts:
        ckpt.save_pairs(out / ckpt.TEST_FILE, test_texts)

    loop = _Loop(config, model, optimizer, state, out, train_data, valid_data)
    loop.run()
    return out


def compile_steps(model, optimizer, clip_norm: float):
    """(train_step, eval_step) as tf.functions over padded int32 batches.

    train_step(src, src_len, tgt_in, tgt_out) -> mean loss per target token;
    eval_step(...) -> (summed loss, target tokens). The loss is the model's log_probs'
    negative log-likelihood, padding weighted 0 like the original's target_weights.
    """
    import tensorflow as tf

    spec = [tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None, None], tf.int32)]

    def masked_nll(log_probs, tgt_out):
        weights = tf.cast(tf.not_equal(tgt_out, PAD_ID), log_probs.dtype)
        nll = -tf.gather(log_probs, tgt_out, batch_dims=2)
        return tf.reduce_sum(nll * weights), tf.reduce_sum(weights)

    @tf.function(input_signature=spec)
    def train_step(src, src_len, tgt_in, tgt_out):
        with tf.GradientTape() as tape:
            log_probs = model((src, src_len, tgt_in), training=True)
            loss_sum, n = masked_nll(log_probs, tgt_out)
            loss = loss_sum / n
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


class _Loop:
    """The epoch/step loop; its state lives in ``TrainingState`` so that it can resume."""

    def __init__(self, config, model, optimizer, state, out, train_data, valid_data):
        self.config, self.model, self.optimizer, self.state = config, model, optimizer, state
        self.out, self.train_data, self.valid_data = out, train_data, valid_data
        self.interrupted = False
        self.traced = False
        self.train_step, self.eval_step = compile_steps(model, optimizer, config.clip_norm)

    def validate(self) -> float:
        total, count = 0.0, 0.0
        order = sorted(range(len(self.valid_data)), key=lambda i: len(self.valid_data[i][0]))
        size = self.config.batch_size
        for start in range(0, len(order), size):
            loss_sum, n = self.eval_step(*pad_batch(self.valid_data, order[start:start + size]))
            total, count = total + float(loss_sum), count + float(n)
        return total / max(count, 1.0)

    def save(self) -> None:
        self.state.save()
        ckpt.save_weights(self.out, self.model)

    def _on_sigint(self, signum, frame) -> None:
        if self.interrupted:  # a second Ctrl-C: stop now, without saving
            raise KeyboardInterrupt
        self.interrupted = True

    def run(self) -> None:
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            self._run()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def _metrics(self, kind: str, train_loss: float | None, valid_loss: float | None,
                 tokens_per_s: float | None) -> None:
        record = {
            "step": int(self.state.step.numpy()),
            "epoch": 0 if kind == "start" else int(self.state.epoch.numpy()) + 1,
            "kind": kind,
            "train_loss": train_loss,
            "valid_loss": valid_loss,
            "valid_ppl": math.exp(min(valid_loss, 50.0)) if valid_loss is not None else None,
            "learning_rate": float(self.optimizer.learning_rate.numpy()),
            "tokens_per_s": tokens_per_s,
            "time": round(time.time(), 3),
        }
        ckpt.append_metrics(self.out, record)
        if valid_loss is not None:
            log.info("step %d epoch %d: train loss %s, valid loss %.4f, perplexity %.2f",
                     record["step"], record["epoch"],
                     "-" if train_loss is None else f"{train_loss:.4f}", valid_loss,
                     record["valid_ppl"])

    def _run(self) -> None:
        from tqdm import tqdm

        cfg, state = self.config, self.state
        batches_per_epoch = len(make_batches(self.train_data, cfg.batch_size, cfg.seed, 0))
        total = cfg.epochs * batches_per_epoch
        if cfg.max_steps:
            total = min(total, cfg.max_steps)
        started = time.monotonic()
        deadline = started + cfg.max_minutes * 60 if cfg.max_minutes else None
        if int(state.step.numpy()) == 0:
            self._metrics("start", None, self.validate(), None)
        bar = tqdm(total=total, initial=int(state.step.numpy()), disable=not cfg.progress,
                   unit="step", dynamic_ncols=True)
        loss_sum, loss_steps, tokens, busy = 0.0, 0, 0, 0.0
        stop_reason = None
        try:
            while int(state.epoch.numpy()) < cfg.epochs and stop_reason is None:
                epoch = int(state.epoch.numpy())
                batches = make_batches(self.train_data, cfg.batch_size, cfg.seed, epoch)
                for index in range(int(state.batch_in_epoch.numpy()), len(batches)):
                    stop_reason = self._stop_reason(deadline)
                    if stop_reason:
                        break
                    src, src_len, tgt_in, tgt_out = pad_batch(self.train_data, batches[index])
                    t0 = time.perf_counter()
                    loss = float(self.train_step(src, src_len, tgt_in, tgt_out))
                    if self.traced:  # the first call of a process traces: not throughput
                        busy += time.perf_counter() - t0
                        tokens += int(src_len.sum()) + int((tgt_out != PAD_ID).sum())
                    self.traced = True
                    state.step.assign_add(1)
                    state.batch_in_epoch.assign(index + 1)
                    loss_sum, loss_steps = loss_sum + loss, loss_steps + 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{_rate(tokens, busy) or 0:.0f}",
                                    epoch=epoch + 1, refresh=False)
                    if int(state.step.numpy()) % cfg.checkpoint_every == 0:
                        self._metrics("checkpoint", loss_sum / loss_steps, None,
                                      _rate(tokens, busy))
                        self.save()
                else:
                    stop_reason = self._end_epoch(
                        loss_sum / loss_steps if loss_steps else None,
                        _rate(tokens, busy),
                    )
                    loss_sum, loss_steps = 0.0, 0
            bar.close()
            partial_epoch = int(state.batch_in_epoch.numpy()) != 0
            if partial_epoch and stop_reason != "interrupted":  # Ctrl-C must be quick
                # The end of a partial epoch: measure, without touching early stopping.
                self._metrics("end", loss_sum / loss_steps if loss_steps else None,
                              self.validate(), _rate(tokens, busy))
            self.save()
        finally:
            bar.close()
        if stop_reason == "interrupted":
            raise TrainingInterrupted(int(state.step.numpy()), self.out)
        log.info("stopped at step %d: %s; checkpoint in %s", int(state.step.numpy()),
                 stop_reason or "all epochs done", self.out)

    def _stop_reason(self, deadline: float | None) -> str | None:
        if self.interrupted:
            return "interrupted"
        if self.config.max_steps and int(self.state.step.numpy()) >= self.config.max_steps:
            return f"max_steps {self.config.max_steps} reached"
        if deadline is not None and time.monotonic() >= deadline:
            return f"max_minutes {self.config.max_minutes:g} reached"
        return None

    def _end_epoch(self, train_loss: float | None, tokens_per_s: float | None) -> str | None:
        """Validate, early-stop, decay SGD's rate on a plateau; the next epoch begins."""
        cfg, state = self.config, self.state
        valid_loss = self.validate()
        self._metrics("epoch", train_loss, valid_loss, tokens_per_s)
        if valid_loss < float(state.best_valid_loss.numpy()):
            state.best_valid_loss.assign(valid_loss)
            state.bad_epochs.assign(0)
            ckpt.save_weights(self.out, self.model, ckpt.BEST_WEIGHTS_FILE)
        else:
            state.bad_epochs.assign_add(1)
            if cfg.optimizer == "sgd":
                lr = self.optimizer.learning_rate
                lr.assign(lr * cfg.lr_decay)
        state.epoch.assign_add(1)
        state.batch_in_epoch.assign(0)
        self.save()
        if cfg.patience and int(state.bad_epochs.numpy()) >= cfg.patience:
            return "early stopping"
        return None


def _rate(tokens: int, seconds: float) -> float | None:
    """Tokens per second: source plus target tokens, padding excluded."""
    return tokens / seconds if seconds > 0 else None
