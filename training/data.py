"""The data of a run: corpora read, cleaned and split into train/valid/test pairs (or
split as an earlier run was, ``holdout_from``), and the vocabulary built on them."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serve.runtime.blocklist import Blocklist, BlocklistError
from serve.runtime.tokenizer import (
    SPECIAL_TOKENS,
    Tokenizer,
    TokenizerSettings,
    Vocab,
    normalize,
)
from training import checkpoint as ckpt
from training.config import TrainConfig
from training.corpus import CleaningReport, CorpusError, Pair, clean_pairs, read_corpus

log = logging.getLogger("training")

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
