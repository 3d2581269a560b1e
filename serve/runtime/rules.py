"""The token rules of a request: what it may not say next, applied to rows of log-probs.

Pure functions of a row's log-probs and its own history, resolved once per request
against the model's vocabulary (``TokenRules.for_model``). The vocabulary scans behind
suppressed words are cached per model, a bounded number of word lists each.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from serve.runtime.options import DecodingOptions
from serve.runtime.tokenizer import detokenize

SCAN_CACHE_SIZE = 64  # word lists remembered per model: requests may bring their own


class Vocabulary(Protocol):
    """What the rules read of a model (``OnnxSeq2Seq`` or a stand-in with its interface)."""

    pad_id: int
    unk_id: int
    bos_id: int
    eos_id: int
    blocklist_words: tuple[str, ...]
    tokenizer: object  # .vocab.tokens: the pieces, by id


def apply_repetition_penalty(
    log_probs: np.ndarray, previous: Sequence[int], penalty: float
) -> np.ndarray:
    """CTranslate2's rule on already generated tokens: negative scores are multiplied by
    ``penalty``, positive ones divided (log-probs are <= 0, so > 1 lowers them)."""
    if penalty == 1.0 or not previous:
        return log_probs
    ids = np.unique(np.asarray(previous, np.int64))
    out = log_probs.copy()
    values = out[ids]
    out[ids] = np.where(values < 0, values * penalty, values / penalty)
    return out


def apply_count_penalties(
    log_probs: np.ndarray, previous: Sequence[int], frequency: float, presence: float
) -> np.ndarray:
    """OpenAI's presence and frequency penalties over the reply's own tokens:
    ``logit[t] -= frequency * count[t] + presence * (count[t] > 0)`` (on log-probs: the
    same, as the row is renormalized afterwards)."""
    if (frequency == 0 and presence == 0) or not previous:
        return log_probs
    ids, counts = np.unique(np.asarray(previous, np.int64), return_counts=True)
    out = log_probs.copy()
    out[ids] -= (frequency * counts + presence).astype(out.dtype)
    return out


def ngram_blocked_ids(previous: Sequence[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already present in ``previous``."""
    if n <= 0 or len(previous) < n - 1:
        return []
    if n == 1:
        return list(set(previous))
    prefix = tuple(previous[len(previous) - n + 1 :])
    return [
        previous[i + n - 1]
        for i in range(len(previous) - n + 1)
        if tuple(previous[i : i + n - 1]) == prefix
    ]


@dataclass(frozen=True)
class WordGuard:
    """Bans the tokens that would finish a suppressed word spelled across several tokens
    (傻 then 逼): for each way of splitting a word, when the reply so far ends with the
    first part, every token whose piece begins the rest (or is its start) is banned."""

    pieces: list[str]
    by_ending: dict[str, np.ndarray]  # what the reply ends with -> the ids to ban
    longest: int  # the longest ending: only that much of the reply's tail is looked at

    @classmethod
    def build(cls, pieces: list[str], words: tuple[str, ...]) -> WordGuard:
        lowered = [p.lower() for p in pieces]
        by_ending: dict[str, set[int]] = {}
        for word in words:
            for k in range(1, len(word)):
                rest = word[k:]
                ids = [
                    i
                    for i, piece in enumerate(lowered)
                    if i >= 4 and piece and (piece.startswith(rest) or rest.startswith(piece))
                ]
                if ids:
                    by_ending.setdefault(word[:k], set()).update(ids)
        return cls(
            pieces,
            {ending: np.array(sorted(ids), np.int64) for ending, ids in by_ending.items()},
            max(map(len, by_ending), default=0),
        )

    def banned(self, previous: Sequence[int]) -> list[np.ndarray]:
        # One dict lookup per tail length (a few), not one test per split: this runs for
        # every row at every step.
        if not previous or not self.by_ending:
            return []
        tail = detokenize([self.pieces[t] for t in previous[-self.longest :]]).lower()
        endings = (tail[-k:] for k in range(1, min(self.longest, len(tail)) + 1))
        return [self.by_ending[e] for e in endings if e in self.by_ending]


def _ids_containing(pieces: list[str], words: tuple[str, ...]) -> np.ndarray:
    wanted = [w for w in words if w]
    return np.array(
        [i for i, piece in enumerate(pieces) if i >= 4 and any(w in piece.lower() for w in wanted)],
        np.int64,
    )


class _LRU:
    """A bounded map of word lists to what a vocabulary scan found for them."""

    def __init__(self, build: Callable[[tuple[str, ...]], object], size: int):
        self._build, self._size = build, size
        self._items: OrderedDict[tuple[str, ...], object] = OrderedDict()
        self._lock = threading.Lock()  # rules are built in worker threads

    def __len__(self) -> int:
        return len(self._items)

    def get(self, words: tuple[str, ...]):
        with self._lock:
            if words in self._items:
                self._items.move_to_end(words)
                return self._items[words]
        value = self._build(words)  # outside the lock: a scan takes milliseconds
        with self._lock:
            self._items[words] = value
            self._items.move_to_end(words)
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return value


class VocabularyScans:
    """The scans of one model's vocabulary for suppressed words, each cached (LRU)."""

    def __init__(self, pieces: list[str], size: int = SCAN_CACHE_SIZE):
        self.ids_containing = _LRU(lambda words: _ids_containing(pieces, words), size)
        self.word_guards = _LRU(lambda words: WordGuard.build(pieces, words), size)


_SCANS: weakref.WeakKeyDictionary[object, VocabularyScans] = weakref.WeakKeyDictionary()
_SCANS_LOCK = threading.Lock()


def vocabulary_scans(model: Vocabulary) -> VocabularyScans:
    """The model's scans (made on first use, dropped with the model)."""
    with _SCANS_LOCK:
        scans = _SCANS.get(model)
        if scans is None:
            scans = _SCANS[model] = VocabularyScans(model.tokenizer.vocab.tokens)
        return scans


def ids_containing(model: Vocabulary, words: tuple[str, ...]) -> np.ndarray:
    """Every token id whose piece contains one of ``words`` (cached per model)."""
    return vocabulary_scans(model).ids_containing.get(words)


def word_guard(model: Vocabulary, words: tuple[str, ...]) -> WordGuard:
    """The WordGuard for ``words`` over the model's vocabulary (cached per model)."""
    return vocabulary_scans(model).word_guards.get(words)


@dataclass
class TokenRules:
    """The rules of one request, resolved once against the model's vocabulary."""

    options: DecodingOptions
    eos_id: int
    banned: np.ndarray  # never produced: <pad>, <s>, <unk> if disabled, suppressed words
    guard: WordGuard | None = None  # suppressed words spelled across tokens

    @classmethod
    def for_model(cls, model: Vocabulary, options: DecodingOptions) -> TokenRules:
        """The request's rules; the model folder's blocklist is always among them."""
        banned = [model.pad_id, model.bos_id] + ([model.unk_id] if options.disable_unk else [])
        words = tuple(sorted({*options.suppress_words, *model.blocklist_words}))
        guard = None
        if words:
            banned.extend(ids_containing(model, words).tolist())
            guard = word_guard(model, words)
        return cls(options, model.eos_id, np.unique(np.array(banned, np.int64)), guard)

    def mask_row(self, row: np.ndarray, previous: Sequence[int]) -> None:
        """Apply this request's rules to one row of log-probs, in place."""
        o = self.options
        if o.repetition_penalty != 1.0 and previous:
            row[:] = apply_repetition_penalty(row, previous, o.repetition_penalty)
        if (o.presence_penalty or o.frequency_penalty) and previous:
            row[:] = apply_count_penalties(row, previous, o.frequency_penalty,
                                           o.presence_penalty)
        row[self.banned] = -np.inf
        if self.guard is not None:
            for ids in self.guard.banned(previous):
                row[ids] = -np.inf
        blocked = ngram_blocked_ids(previous, o.no_repeat_ngram_size)
        if blocked:
            row[blocked] = -np.inf
        if len(previous) < o.min_length:
            row[self.eos_id] = -np.inf

    def process(self, log_probs: np.ndarray, previous: Sequence[int]) -> np.ndarray:
        """One row of model log-probs -> the log-probs decoding chooses from."""
        return process_rows(log_probs[None, :], [self], [previous])[0]


def process_rows(
    log_probs: np.ndarray, rules: Sequence[TokenRules], histories: Sequence[Sequence[int]]
) -> np.ndarray:
    """Model log-probs [B,V] -> what decoding chooses from: each row's rules applied, then
    renormalized (log-softmax per row).

    Greedy, sampling and beam, alone or batched, all go through here: a row's result does
    not depend on the other rows (per-row reductions), which the engine's promise that a
    batched request equals the same request alone relies on.
    """
    out = np.array(log_probs, dtype=np.float32, copy=True)
    for row, row_rules, previous in zip(out, rules, histories, strict=True):
        row_rules.mask_row(row, previous)
    top = out.max(axis=1, keepdims=True)  # ndarray methods: no np.* dispatch per step
    dead = ~np.isfinite(top[:, 0])
    if dead.any():  # every token ruled out: ending is the only way
        for i in np.flatnonzero(dead):
            out[i] = -np.inf
            out[i, rules[i].eos_id] = 0.0
        top[dead] = 0.0
    out -= top
    out -= np.log(np.exp(out).sum(axis=1, keepdims=True))
    return out
