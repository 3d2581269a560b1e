"""The training loop: corpora -> clean pairs -> vocab -> Seq2Seq, with exact resume.

Reproducibility: the weights, the dropout masks, the validation split and the data order
all derive from ``config.seed``; with ``TF_ENABLE_ONEDNN_OPTS=0`` (set by the CLI before
TensorFlow loads) and op determinism on, a run interrupted and resumed ends with the same
weights, bit for bit, as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from serve.runtime.blocklist import Blocklist, BlocklistError
from serve.runtime.tokenizer import (
    PAD_ID,
    SPECIAL_TOKENS,
    Tokenizer,
    TokenizerSettings,
    Vocab,
    normalize,
)
from training import checkpoint as ckpt
from training.config import SELECT_BY, ConfigError, TrainConfig
from training.corpus import CleaningReport, CorpusError, Pair, clean_pairs, read_corpus

log = logging.getLogger("training")

BUCKET_BATCHES = 32  # pairs are sorted by length within windows of this many batches
# What --resume may change; every other setting must equal the saved run's.
RESUMABLE_SETTINGS = {"epochs", "max_steps", "max_minutes", "checkpoint_every", "progress",
                      "threads", "patience"}
BACKWARD_DIR = "backward"  # direction "both": the backward model's checkpoint folder
MAX_REPLY_TOKENS = 30  # the greedy replies of the epoch-end evaluation, as serve evaluates

EncodedPair = tuple[list[int], list[int]]


class TrainingInterrupted(Exception):
    """Ctrl-C: a checkpoint was saved at ``step``; ``--resume`` continues from it."""

    def __init__(self, step: int, out: Path):
        super().__init__(f"interrupted at step {step}; checkpoint saved in {out}; "
                         f"continue with --resume")
        self.step = step


# -- data -----------------------------------------------------------------------------

Segmented = tuple[list[str], list[str]]


@dataclass
class PreparedData:
    """The cleaned, split pairs of a run: segmented for training, texts for the files."""

    train_segmented: list[Segmented]
    train_texts: list[Pair]
    valid_segmented: list[Segmented]
    valid_texts: list[Pair]
    test_texts: list[Pair]
    corpora: list[dict]
    report: CleaningReport

    def swapped(self) -> PreparedData:
        """The backward model's data: the same pairs, answer -> question."""
        def swap(pairs):
            return [(b, a) for a, b in pairs]

        return PreparedData(swap(self.train_segmented), swap(self.train_texts),
                            swap(self.valid_segmented), swap(self.valid_texts),
                            swap(self.test_texts), self.corpora, self.report)


def tokenizer_settings(config: TrainConfig) -> TokenizerSettings:
    """What config.json records as "tokenizer" (and export copies into the manifest)."""
    return TokenizerSettings(segmenter="char" if config.tokens == "char" else "jieba")


def _read_corpora(corpora: list[Path], formats: list[str] | None) -> tuple[list[Pair], list]:
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
    return raw, corpora_info


def prepare_data(config: TrainConfig, corpora: list[Path],
                 formats: list[str] | None) -> PreparedData:
    """Read, clean and split. The test pairs come off the shuffled pairs first, then the
    validation pairs; the rest is trained on."""
    raw, corpora_info = _read_corpora(corpora, formats)
    held_out = read_held_out(Path(config.holdout_from)) if config.holdout_from else None
    if held_out is not None:
        raw = [pair for pair in raw if pair_key(pair) not in held_out.keys]
    blocklist_path = config.blocklist_path()
    try:
        blocklist = Blocklist.load(blocklist_path) if blocklist_path is not None else None
    except BlocklistError as e:
        raise CorpusError(str(e)) from None
    segmenter = Tokenizer(Vocab(list(SPECIAL_TOKENS)), tokenizer_settings(config))
    segmented, texts, report = clean_pairs(
        raw, segmenter.segment, max_src_len=config.max_src_len,
        max_tgt_len=config.max_tgt_len, blocklist=blocklist,
        max_answer_repeats=config.max_answer_repeats,
        max_answer_entropy=config.max_answer_entropy,
    )
    log.info(report.line())
    if report.kept == 0:
        raise CorpusError(f"the corpus is empty after cleaning ({report.line()})")
    if held_out is not None:  # again after cleaning: it rewrites some texts (bot names)
        kept = [i for i, pair in enumerate(texts) if pair_key(pair) not in held_out.keys]
        log.info("held-out pairs of %s: %d valid, %d test; %d more removed after cleaning",
                 Path(config.holdout_from).name, len(held_out.valid), len(held_out.test),
                 len(texts) - len(kept))
        return PreparedData(
            train_segmented=[segmented[i] for i in kept], train_texts=[texts[i] for i in kept],
            valid_segmented=[(segmenter.segment(q), segmenter.segment(a))
                             for q, a in held_out.valid],
            valid_texts=held_out.valid, test_texts=held_out.test,
            corpora=corpora_info, report=report,
        )
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
    return PreparedData(
        train_segmented=[segmented[i] for i in train_idx],
        train_texts=[texts[i] for i in train_idx],
        valid_segmented=[segmented[i] for i in valid_idx],
        valid_texts=[texts[i] for i in valid_idx],
        test_texts=[texts[i] for i in test_idx],
        corpora=corpora_info, report=report,
    )


@dataclass
class HeldOut:
    """An earlier run's held-out pairs, and their keys to keep them out of training."""

    valid: list[Pair]
    test: list[Pair]
    keys: set[Pair]


def pair_key(pair: Pair) -> Pair:
    return normalize(pair[0]), normalize(pair[1])


def read_held_out(run: Path) -> HeldOut:
    """``run``'s valid.tsv and test.tsv (a forward run's: question<TAB>answer)."""
    from serve.runtime.evaluate import read_pairs

    try:
        valid = [(p.question, p.answer) for p in read_pairs(run / ckpt.VALID_FILE, 0)]
        test_file = run / ckpt.TEST_FILE
        test = ([(p.question, p.answer) for p in read_pairs(test_file, 0)]
                if test_file.is_file() else [])
    except ValueError as e:
        raise CorpusError(f"holdout_from: {e}") from None
    return HeldOut(valid, test, {pair_key(p) for p in valid + test})


def build_vocab(config: TrainConfig, data: PreparedData) -> Vocab:
    """From both sides of the training pairs: one vocabulary serves forward and backward."""
    vocab = Vocab.build((side for pair in data.train_segmented for side in pair),
                        min_freq=config.min_freq, max_size=config.vocab_size)
    if len(vocab) <= len(SPECIAL_TOKENS):
        raise CorpusError(f"no word is seen {config.min_freq} times: lower min_freq")
    return vocab


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


def _comparable(cleaning: dict) -> dict:
    # A rule added since a run was saved counts 0 there: an older run can still resume.
    return {k: v for k, v in cleaning.items() if v != 0}


def _check_same_data(out: Path, corpora_info: list[dict], cleaning: dict) -> None:
    # The split and the data order derive from the pairs: other pairs, another run.
    saved = ckpt.read_config(out)
    if saved.get("corpora") != corpora_info or (
            _comparable(saved.get("cleaning", {})) != _comparable(cleaning)):
        raise CorpusError(f"--resume needs the corpora and cleaning of the saved run: saved "
                          f"{saved.get('corpora')} kept {saved.get('cleaning', {}).get('kept')}, "
                          f"now {corpora_info} kept {cleaning['kept']}")


def _check_folder(config: TrainConfig, out: Path, resume: bool) -> None:
    if resume:
        _check_resumable(config, out)
    elif (out / ckpt.CONFIG_FILE).exists() or (out / ckpt.STATE_DIR).exists():
        raise ConfigError(f"{out} already holds a checkpoint: pass --resume to continue it, "
                          f"or choose another --out")


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
    """Train (or with ``resume`` continue training) into the checkpoint folder ``out``.

    ``config.direction``: "forward" trains question -> answer, "backward" answer ->
    question (the same split, cleaning and vocabulary, pairs swapped); "both" trains the
    two at once in two processes, forward into ``out`` and backward into ``out/backward``.
    """
    config.validate()
    out = Path(out)
    if not corpora:
        raise CorpusError("no corpus given")
    jobs = _jobs(config, out)
    for job_config, _, folder in jobs:
        _check_folder(job_config, folder, resume)
    data = prepare_data(config, corpora, formats)
    vocab = Vocab.load(out) if resume else build_vocab(config, data)
    if resume and len(jobs) == 2 and Vocab.load(out / BACKWARD_DIR).tokens != vocab.tokens:
        raise ckpt.CheckpointError(f"{out / BACKWARD_DIR}: its vocab.txt differs from {out}'s")
    command = command or default_command(corpora, out, formats)
    if len(jobs) == 1:
        job_config, direction, folder = jobs[0]
        train_model(job_config, data.swapped() if direction == "backward" else data, vocab,
                    folder, resume=resume, command=command, direction=direction)
    else:
        _train_in_parallel(jobs, data, vocab, resume=resume, command=command)
    return out


def _cores() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _jobs(config: TrainConfig, out: Path) -> list[tuple[TrainConfig, str, Path]]:
    """(config, model direction, folder) of each model the run trains.

    With "both", the forward folder's config keeps direction "both" (so that ``--resume``
    on it resumes both); the backward folder's says "backward". Each gets half the cores'
    threads, and only the forward one draws a progress bar.
    """
    if config.direction != "both":
        return [(config, config.direction, out)]
    threads = max(1, (config.threads or len(_cores())) // 2)
    return [(replace(config, threads=threads), "forward", out),
            (replace(config, threads=threads, direction="backward", progress=False),
             "backward", out / BACKWARD_DIR)]


def train_model(config: TrainConfig, data: PreparedData, vocab: Vocab, out: Path, *,
                resume: bool, command: str, direction: str) -> None:
    """Train one model on ``data`` (already swapped for a backward model) into ``out``."""
    if resume:
        _check_same_data(out, data.corpora, data.report.to_dict())
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
        **_command_history(out, command, resume),
    })
    _write_data_files(out, vocab, data)
    loop = _Loop(config, model, optimizer, state, out, train_data, valid_data,
                 tokenizer=tokenizer, valid_texts=data.valid_texts)
    loop.run()


def _write_data_files(out: Path, vocab: Vocab, data: PreparedData) -> None:
    ckpt.save_vocab(out, vocab)
    ckpt.save_pairs(out / ckpt.TRAIN_FILE, data.train_texts)
    ckpt.save_pairs(out / ckpt.VALID_FILE, data.valid_texts)
    if data.test_texts:
        ckpt.save_pairs(out / ckpt.TEST_FILE, data.test_texts)


# -- direction "both": two processes, one core each ---------------------------------------


def _train_in_parallel(jobs, data: PreparedData, vocab: Vocab, *, resume: bool,
                       command: str) -> None:
    """Each model in a spawned child process pinned to its own cores (where the OS lets us).

    Ctrl-C reaches the children (one process group): each saves its checkpoint, and this
    process waits for both before it reports the interruption.
    """
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # fork would copy threads and locks
    cores = _cores()
    previous = None
    if threading.current_thread() is threading.main_thread():
        # The children handle Ctrl-C (each saves); this process only waits for them.
        previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        children = []
        for index, (job_config, direction, folder) in enumerate(jobs):
            pinned = cores[index::len(jobs)] if len(cores) >= len(jobs) else None
            receiver, sender = context.Pipe(duplex=False)
            job_data = data.swapped() if direction == "backward" else data
            process = context.Process(
                target=_child_main, name=f"training-{direction}",
                args=(sender, job_config, job_data, vocab.tokens, folder, resume, command,
                      direction, pinned))
            process.start()
            sender.close()
            children.append((direction, folder, process, receiver))
        results = [_child_result(direction, process, receiver)
                   for direction, _, process, receiver in children]
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    _raise_child_failures(results, [folder for _, folder, _, _ in children])


def _child_result(direction: str, process, receiver) -> tuple:
    try:
        result = receiver.recv()
    except EOFError:
        result = None
    process.join()
    if result is None:
        result = ("crash", f"the process died (exit code {process.exitcode})")
    return (direction, *result)


def _raise_child_failures(results: list[tuple], folders: list[Path]) -> None:
    errors = {"ConfigError": ConfigError, "CorpusError": CorpusError,
              "CheckpointError": ckpt.CheckpointError}
    for direction, status, *detail in results:
        if status == "error":
            raise errors.get(detail[0], RuntimeError)(f"{direction} model: {detail[1]}")
        if status == "crash":
            raise RuntimeError(f"{direction} model: {detail[0]}")
    if any(status == "killed" for _, status, *_ in results):
        raise KeyboardInterrupt  # a second Ctrl-C: stopped without saving
    interrupted = [(detail[0], folder) for (_, status, *detail), folder
                   in zip(results, folders, strict=True) if status == "interrupted"]
    if interrupted:
        raise TrainingInterrupted(*interrupted[0])


def _child_main(conn, config: TrainConfig, data: PreparedData, vocab_tokens: list[str],
                out: Path, resume: bool, command: str, direction: str,
                cores: list[int] | None) -> None:
    """The body of one child process of direction "both"; reports through ``conn``."""
    import traceback

    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)
    from training.environment import configure_tensorflow_environment

    configure_tensorflow_environment()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"[{direction}] %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        train_model(config, data, Vocab(vocab_tokens), Path(out), resume=resume,
                    command=command, direction=direction)
        conn.send(("ok",))
    except TrainingInterrupted as e:
        conn.send(("interrupted", e.step))
    except (ConfigError, CorpusError, ckpt.CheckpointError) as e:
        conn.send(("error", type(e).__name__, str(e)))
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training began
        conn.send(("killed",))
    except BaseException:  # noqa: BLE001 - the parent reports it
        conn.send(("crash", traceback.format_exc(limit=5)))
    finally:
        conn.close()


# -- loss and steps -------------------------------------------------------------------


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


# -- greedy replies at the end of an epoch -------------------------------------------------


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


# -- the loop -------------------------------------------------------------------------


class _Loop:
    """The epoch/step loop; its state lives in ``TrainingState`` so that it can resume."""

    def __init__(self, config, model, optimizer, state, out, train_data, valid_data, *,
                 tokenizer: Tokenizer, valid_texts: list[Pair]):
        self.config, self.model, self.optimizer, self.state = config, model, optimizer, state
        self.out, self.train_data, self.valid_data = out, train_data, valid_data
        self.tokenizer, self.valid_texts = tokenizer, valid_texts
        self.interrupted = False
        self.traced = False
        weights = (itf_weights([a for _, a in train_data], len(tokenizer.vocab),
                               config.itf_power) if config.itf_power else None)
        self.train_step, self.eval_step = compile_steps(
            model, optimizer, config.clip_norm, label_smoothing=config.label_smoothing,
            token_weights=weights)
        self.decoder = None  # made at the first epoch end that needs it

    def validate(self) -> float:
        total, count = 0.0, 0.0
        order = sorted(range(len(self.valid_data)), key=lambda i: len(self.valid_data[i][0]))
        size = self.config.batch_size
        for start in range(0, len(order), size):
            loss_sum, n = self.eval_step(*pad_batch(self.valid_data, order[start:start + size]))
            total, count = total + float(loss_sum), count + float(n)
        return total / max(count, 1.0)

    def replies(self) -> dict[str, float]:
        """Greedy replies to the first ``eval_replies`` validation questions, measured."""
        n = min(self.config.eval_replies, len(self.valid_data))
        if not n:
            return {}
        if self.decoder is None:
            self.decoder = make_greedy_decoder(self.model)
        # Sorted by length so that a batch pads little; the metrics do not depend on order.
        order = sorted(range(n), key=lambda i: len(self.valid_data[i][0]))
        replies = [""] * n
        size = self.config.batch_size
        for start in range(0, n, size):
            rows = order[start:start + size]
            for row, ids in zip(rows, self.decoder([self.valid_data[i][0] for i in rows]),
                                strict=True):
                replies[row] = self.tokenizer.decode(ids)
        return reply_metrics(replies, [a for _, a in self.valid_texts[:n]])

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
                 tokens_per_s: float | None, extra: dict | None = None) -> None:
        record = {
            "step": int(self.state.step.numpy()),
            "epoch": 0 if kind == "start" else int(self.state.epoch.numpy()) + 1,
            "kind": kind,
            "train_loss": train_loss,
            "valid_loss": valid_loss,
            "valid_ppl": math.exp(min(valid_loss, 50.0)) if valid_loss is not None else None,
            "learning_rate": float(self.optimizer.learning_rate.numpy()),
            "tokens_per_s": tokens_per_s,
            **(extra or {}),
            "time": round(time.time(), 3),
        }
        ckpt.append_metrics(self.out, record)
        if valid_loss is not None:
            replies = "".join(f", {k[6:]} {record[k]:.3f}" for k in
                              ("valid_distinct2", "valid_top10_share", "valid_bleu2")
                              if k in record)
            log.info("step %d epoch %d: train loss %s, valid loss %.4f, perplexity %.2f%s",
                     record["step"], record["epoch"],
                     "-" if train_loss is None else f"{train_loss:.4f}", valid_loss,
                     record["valid_ppl"], replies)

    def _run(self) -> None:
        from tqdm import tqdm

        cfg, state = self.config, self.state
        batches_per_epoch = len(make_batches(self.train_data, cfg.batch_size, cfg.seed, 0))
        total = cfg.epochs * batches_per_epoch
        if cfg.max_steps:
            total = min(total, cfg.max_steps)
        deadline = time.monotonic() + cfg.max_minutes * 60 if cfg.max_minutes else None
        if int(state.step.numpy()) == 0:
            self._metrics("start", None, self.validate(), None)
        bar = tqdm(total=total, initial=int(state.step.numpy()), disable=not cfg.progress,
                   unit="step", dynamic_ncols=True)
        meter = _Meter()
        # A resumed run that had stopped early stays stopped (unless patience was raised).
        stop_reason = ("early stopping" if cfg.patience
                       and int(state.bad_epochs.numpy()) >= cfg.patience else None)
        try:
            while int(state.epoch.numpy()) < cfg.epochs and stop_reason is None:
                stop_reason = self._train_epoch(deadline, bar, meter)
                if stop_reason is None:
                    stop_reason = self._end_epoch(meter.loss(), meter.rate())
                    meter.new_epoch()
            bar.close()
            partial_epoch = int(state.batch_in_epoch.numpy()) != 0
            if partial_epoch and stop_reason != "interrupted":  # Ctrl-C must be quick
                # The end of a partial epoch: measure, without touching early stopping.
                self._metrics("end", meter.loss(), self.validate(), meter.rate())
            self.save()
        finally:
            bar.close()
        if stop_reason == "interrupted":
            raise TrainingInterrupted(int(state.step.numpy()), self.out)
        log.info("stopped at step %d: %s; checkpoint in %s", int(state.step.numpy()),
                 stop_reason or "all epochs done", self.out)

    def _train_epoch(self, deadline: float | None, bar, meter: _Meter) -> str | None:
        """The rest of the current epoch's batches; a reason to stop, or None at its end."""
        cfg, state = self.config, self.state
        epoch = int(state.epoch.numpy())
        batches = make_batches(self.train_data, cfg.batch_size, cfg.seed, epoch)
        for index in range(int(state.batch_in_epoch.numpy()), len(batches)):
            stop_reason = self._stop_reason(deadline)
            if stop_reason:
                return stop_reason
            src, src_len, tgt_in, tgt_out = pad_batch(self.train_data, batches[index])
            t0 = time.perf_counter()
            loss = float(self.train_step(src, src_len, tgt_in, tgt_out))
            if self.traced:  # the first call of a process traces: not throughput
                meter.busy += time.perf_counter() - t0
                meter.tokens += int(src_len.sum()) + int((tgt_out != PAD_ID).sum())
            self.traced = True
            state.step.assign_add(1)
            state.batch_in_epoch.assign(index + 1)
            meter.loss_sum, meter.loss_steps = meter.loss_sum + loss, meter.loss_steps + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{meter.rate() or 0:.0f}",
                            epoch=epoch + 1, refresh=False)
            if int(state.step.numpy()) % cfg.checkpoint_every == 0:
                self._metrics("checkpoint", meter.loss(), None, meter.rate())
                self.save()
        return None

    def _stop_reason(self, deadline: float | None) -> str | None:
        if self.interrupted:
            return "interrupted"
        if self.config.max_steps and int(self.state.step.numpy()) >= self.config.max_steps:
            return f"max_steps {self.config.max_steps} reached"
        if deadline is not None and time.monotonic() >= deadline:
            return f"max_minutes {self.config.max_minutes:g} reached"
        return None

    def _select(self, figures: dict) -> bool:
        """Whether this epoch's weights become best.weights.h5 (by ``select_by``)."""
        name = self.config.select_by
        if name == "valid_loss":
            return figures["valid_loss"] < float(self.state.best_valid_loss.numpy())
        score = figures[name] if SELECT_BY[name] == "lower" else -figures[name]
        if score < float(self.state.best_selected.numpy()):
            self.state.best_selected.assign(score)
            return True
        return False

    def _end_epoch(self, train_loss: float | None, tokens_per_s: float | None) -> str | None:
        """Validate, choose the best weights, early-stop, decay SGD's rate on a plateau."""
        cfg, state = self.config, self.state
        valid_loss = self.validate()
        figures = {"valid_loss": valid_loss, **(self.replies() if cfg.eval_replies else {})}
        selected = self._select(figures)
        self._metrics("epoch", train_loss, valid_loss, tokens_per_s,
                      {**figures, "selected": selected})
        if selected:
            ckpt.save_weights(self.out, self.model, ckpt.BEST_WEIGHTS_FILE)
        if valid_loss < float(state.best_valid_loss.numpy()):  # early stopping: valid_loss
            state.best_valid_loss.assign(valid_loss)
            state.bad_epochs.assign(0)
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


@dataclass
class _Meter:
    """Training loss and throughput since the last epoch end (or the start of the process)."""

    loss_sum: float = 0.0
    loss_steps: int = 0
    tokens: int = 0
    busy: float = 0.0

    def loss(self) -> float | None:
        return self.loss_sum / self.loss_steps if self.loss_steps else None

    def rate(self) -> float | None:
        return _rate(self.tokens, self.busy)

    def new_epoch(self) -> None:
        self.loss_sum, self.loss_steps = 0.0, 0


def _rate(tokens: int, seconds: float) -> float | None:
    """Tokens per second: source plus target tokens, padding excluded."""
    return tokens / seconds if seconds > 0 else None
