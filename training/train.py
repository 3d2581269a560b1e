"""The training entry: corpora -> clean pairs -> vocab -> Seq2Seq, with exact resume.

Reproducibility: the weights, the dropout masks, the validation split and the data order
all derive from ``config.seed``; with ``TF_ENABLE_ONEDNN_OPTS=0`` (set by the CLI before
TensorFlow loads) and op determinism on, a run interrupted and resumed ends with the same
weights, bit for bit, as an uninterrupted one.

The concepts live in their own modules: ``data`` (read, clean, split, vocabulary),
``batches``, ``loss``, ``reply_metrics``, ``loop`` (one model's epochs and steps),
``summaries`` (its TensorBoard event files), ``resume`` (its checks), ``job`` (one model
into one folder) and ``directions`` (forward, backward or both in parallel processes).
"""

from __future__ import annotations

from pathlib import Path

from serve.runtime.tokenizer import Vocab
from training import checkpoint as ckpt
from training.config import TrainConfig
from training.corpus import CorpusError
from training.data import build_vocab, prepare_data
from training.directions import BACKWARD_DIR, plan_jobs, train_in_parallel
from training.job import train_model
from training.loop import TrainingInterrupted
from training.resume import check_folder

__all__ = ["TrainingInterrupted", "default_command", "train"]


def default_command(corpora: list[Path], out: Path, formats: list[str] | None) -> str:
    parts = ["python -m training"]
    parts += [f"--corpus {Path(c).name}" for c in corpora]
    parts += [f"--format {f}" for f in formats or []]
    return " ".join([*parts, f"--out {Path(out).name}"])


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
    jobs = plan_jobs(config, out)
    for job_config, _, folder in jobs:
        check_folder(job_config, folder, resume)
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
        train_in_parallel(jobs, data, vocab, resume=resume, command=command)
    return out
