"""The token rules of a request: what it may not say next, applied to rows of log-probs.

Pure functions of a row's log-probs and its own history, resolved once per request
against the model's vocabulary (``TokenRules.for_model``). The vocabulary scans behind
suppressed words are cached per model, a bounded number of word lists each.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from serve.runtime.options import DecodingOptions
from serve.runtime.tokenizer import detokenize

SCAN_CACHE_SIZE = 64  # word lists remembered per model: requests may bring their own
GUARD_MEMO_SIZE = 65536  # reply tails remembered per word guard (a few MB at most)


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
    p = previous
    if p.count(p[-1]) < 2:  # an n-gram can only repeat where its last token did (most rows)
        return []
    if n == 2:  # the common sizes without a tuple per position (every row, every step)
        last = p[-1]
        return [b for a, b in zip(p, p[1:], strict=False) if a == last]
    if n == 3:
        x, y = p[-2], p[-1]
        return [c for a, b, c in zip(p, p[1:], p[2:], strict=False) if a == x and b == y]
    prefix = tuple(p[len(p) - n + 1 :])
    return [p[i + n - 1] for i in range(len(p) - n + 1) if tuple(p[i : i + n - 1]) == prefix]


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

    memo: dict = field(default_factory=dict, compare=False, repr=False)  # tail -> banned
    # by token: whether a reply that ends with it may end with one of the endings
    may_end: list[bool] = field(default_factory=list, compare=False, repr=False)

    def __post_init__(self) -> None:
        # A match needs the lowered tail's last character to end an ending, and that
        # character is the last piece's own, lowered (str.lower maps every character
        # alone but a capital sigma; an empty piece leaves the one before last).
        last = {e[-1] for e in self.by_ending}
        self.may_end[:] = [not p or "Σ" in p or p.lower()[-1] in last for p in self.pieces]

    def banned(self, previous: Sequence[int]) -> list[np.ndarray]:
        # This runs for every row at every step: most tokens can end no ending (one
        # list lookup); the others are remembered by the reply's last tokens (the only
        # ones it reads), then one dict lookup per tail length.
        if not previous or not self.by_ending or not self.may_end[previous[-1]]:
            return []
        key = tuple(previous[-self.longest :])
        found = self.memo.get(key)
        if found is None:
            tail = detokenize([self.pieces[t] for t in key]).lower()
            endings = (tail[-k:] for k in range(1, min(self.longest, len(tail)) + 1))
            found = [self.by_ending[e] for e in endings if e in self.by_ending]
            if len(self.memo) >= GUARD_MEMO_SIZE:
                self.memo.clear()  # a bound, not an LRU: tails repeat across replies
            self.memo[key] = found
        return found


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
    """The scans of one model's vocabulary for suppressed words, each cached (LRU), and
    the fixed bans of a request's rules (``fixed_bans``)."""

    def __init__(self, pieces: list[str], size: int = SCAN_CACHE_SIZE):
        self.ids_containing = _LRU(lambda words: _ids_containing(pieces, words), size)
        self.word_guards = _LRU(lambda words: WordGuard.build(pieces, words), size)
        self._rules: dict[tuple, _LRU] = {}  # by the model's ids and blocklist
        self._lock = threading.Lock()
        self._size = size

    def fixed_bans(self, model: Vocabulary, disable_unk: bool,
                   suppress_words: tuple[str, ...]):
        """(banned, its sorted forms, the guard) of a request's rules, made once per
        word list (the engine makes rules for every request)."""
        ids = (model.pad_id, model.bos_id, model.unk_id, model.eos_id, model.blocklist_words)
        with self._lock:
            made = self._rules.get(ids)
            if made is None:  # (no reference to the model kept: the scans die with it)
                made = self._rules[ids] = _LRU(lambda key: self._fixed(ids, *key),
                                               self._size)
        return made.get((disable_unk, suppress_words))

    def _fixed(self, ids: tuple, disable_unk: bool, suppress_words: tuple[str, ...]):
        pad, bos, unk, eos, blocklist = ids
        banned = [pad, bos] + ([unk] if disable_unk else [])
        words = tuple(sorted({*suppress_words, *blocklist}))
        guard = None
        if words:
            banned.extend(self.ids_containing.get(words).tolist())
            guard = self.word_guards.get(words)
        banned_ids = np.array(banned, np.int64)
        fixed = sorted_bans(banned_ids, eos)
        for a in fixed:
            a.flags.writeable = False  # shared by requests
        return banned_ids, fixed, guard


def sorted_bans(banned: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """The fixed bans sorted without repeats, alone and with </s> (for replies shorter
    than min_length): most rows at most steps are banned exactly one of the two, which
    process_rows then needs neither to merge nor to deduplicate."""
    ids = set(np.asarray(banned, np.int64).ravel().tolist())
    return np.array(sorted(ids), np.int64), np.array(sorted(ids | {eos_id}), np.int64)


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
    # ``banned`` sorted without repeats, alone and with </s>, when already made so
    # (``for_model``'s, shared by every request with the same words: read-only)
    fixed: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False,
                                                        compare=False)

    def __post_init__(self) -> None:
        # The fixed bans sorted without repeats, alone and with </s> (for replies shorter
        # than min_length): most rows at most steps are banned exactly one of the two,
        # which process_rows then needs neither to merge nor to deduplicate.
        if self.fixed is None:
            self.fixed = sorted_bans(self.banned, self.eos_id)
        self.banned, self._banned_and_eos = self.fixed
        o = self.options
        self.penalises = (o.repetition_penalty != 1.0 or o.presence_penalty != 0
                          or o.frequency_penalty != 0)  # process_rows' _penalties
        self._min_length, self._ngram = o.min_length, o.no_repeat_ngram_size  # row_bans'

    @classmethod
    def for_model(cls, model: Vocabulary, options: DecodingOptions) -> TokenRules:
        """The request's rules; the model folder's blocklist is always among them."""
        # Resolved once per word list and model (the engine makes rules per request):
        # the same bans, in arrays shared by the requests that have them.
        banned, fixed, guard = vocabulary_scans(model).fixed_bans(
            model, options.disable_unk, options.suppress_words)
        return cls(options, model.eos_id, banned, guard, fixed)

    def row_bans(self, previous: Sequence[int]) -> list:
        """The ids this request may not say after ``previous`` (arrays or lists; may
        repeat): the fixed bans, the guard's, the n-gram's and an early ``</s>``. Only
        the first when there are no others: one sorted array without repeats."""
        # (every row, every step: no attribute chains)
        bans: list = [self._banned_and_eos if len(previous) < self._min_length
                      else self.banned]
        guard = self.guard  # (most tokens end no guarded word: no call for them)
        if guard is not None and previous and guard.may_end[previous[-1]]:
            bans.extend(guard.banned(previous))
        n = self._ngram
        if n > 0 and len(previous) >= n - 1:
            blocked = ngram_blocked_ids(previous, n)
            if blocked:
                bans.append(blocked)
        return bans

    def mask_row(self, row: np.ndarray, previous: Sequence[int]) -> None:
        """Apply this request's rules to one row of log-probs, in place (no
        renormalisation: ``process`` does both)."""
        o = self.options
        row[:] = apply_count_penalties(
            apply_repetition_penalty(row, previous, o.repetition_penalty),
            previous, o.frequency_penalty, o.presence_penalty)
        for ids in self.row_bans(previous):
            row[np.asarray(ids, np.int64)] = -np.inf

    def process(self, log_probs: np.ndarray, previous: Sequence[int]) -> np.ndarray:
        """One row of model log-probs -> the log-probs decoding chooses from."""
        return process_rows(log_probs[None, :], [self], [previous])[0]


# A row whose rules removed more than this share of its mass is renormalised by a full
# log-softmax: 1 - removed would then lose digits (the model's rows sum to 1 only to
# float32 precision), and a row the rules emptied must end.
FULL_RENORMALISATION_BELOW = 1e-3


def process_rows(
    log_probs: np.ndarray, rules: Sequence[TokenRules], histories: Sequence[Sequence[int]],
    *, in_place: bool = False,
) -> np.ndarray:
    """Model log-probs [B,V] (each row a log-softmax) -> what decoding chooses from: each
    row's rules applied, then renormalised.

    The rules change a few entries of a row (bans, penalties on the reply's own tokens),
    so a row is renormalised by the mass they removed, ``log(1 - sum(p_old - p_new))``
    over the changed entries, not by a log-softmax over the whole vocabulary (which cost
    more than the rules themselves at batch 32). The changes of all rows are gathered and
    applied with one indexed write per kind.

    Greedy, sampling and beam, alone or batched, all go through here: a row's result does
    not depend on the other rows (each row's sums run over its own entries, in the same
    order alone or batched), which the engine's promise that a batched request equals the
    same request alone relies on. ``in_place``: ``log_probs`` (float32, the caller's to
    spend) is overwritten and returned, the same values without a copy of the batch (a
    read-only array, as another framework's output may be, is copied all the same).
    """
    out, shift = mask_rows(log_probs, rules, histories, in_place=in_place)
    out -= shift[:, None]
    return out


def mask_rows(
    log_probs: np.ndarray, rules: Sequence[TokenRules], histories: Sequence[Sequence[int]],
    *, in_place: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``process_rows`` but its last pass over the batch: (the rows with their rules
    applied, ``shift`` [B] float32), where ``process_rows`` is ``rows - shift[:, None]``
    (a row the rules (nearly) emptied is renormalised in full here, its shift 0). A
    caller that needs only a few entries of a row renormalised subtracts only there."""
    source = np.asarray(log_probs, dtype=np.float32)
    out = source if in_place and source.flags.writeable else source.copy()
    rows, vocab = out.shape
    if rows == 0:
        return out, np.zeros(0, np.float32)
    penalties = _penalties(source, rules, histories)
    changed, removed = _apply(out.reshape(-1), _flat_bans(rules, histories, vocab), penalties)
    kept = 1.0 - np.bincount(changed // vocab, weights=removed, minlength=rows)
    full = (kept < FULL_RENORMALISATION_BELOW).nonzero()[0]
    if full.size:
        kept[full] = 1.0  # these rows: a log-softmax of their own (x - 0 is x after it)
    for i in full:
        _log_softmax_row(out[i], rules[i].eos_id)
    return out, np.log(kept).astype(np.float32)


def _apply(flat: np.ndarray, banned: np.ndarray,
           penalties: tuple[np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
    """Write the penalties, then the bans, into the flat batch: the flat indices changed
    and the probability mass each change removed (in that order: an entry both penalised
    and banned loses p_old - p_pen, then p_pen, so no merged index set is needed)."""
    if penalties is None:
        removed = np.exp(flat[banned].astype(np.float64))
        flat[banned] = -np.inf
        return banned, removed
    penalised, values = penalties
    before = np.exp(flat[penalised].astype(np.float64))
    flat[penalised] = values
    removed = np.exp(flat[banned].astype(np.float64))
    flat[banned] = -np.inf
    return (np.concatenate([penalised, banned]),
            np.concatenate([before - np.exp(values.astype(np.float64)), removed]))


def _flat_bans(rules: Sequence[TokenRules], histories: Sequence[Sequence[int]],
               vocab: int) -> np.ndarray:
    """Every row's banned ids as flat indices into the batch, without repeats (each
    row's sorted, the rows in order)."""
    bans = [r.row_bans(previous) for r, previous in zip(rules, histories, strict=True)]
    if len(bans) == 1:  # row 0: its ids are its flat indices
        only = bans[0]
        return only[0] if len(only) == 1 else _sorted_distinct(np.concatenate(only))[0]
    first = bans[0][0]
    if all(len(b) == 1 and b[0] is first for b in bans):  # for_model's shared bans in all
        return (first + np.arange(0, len(bans) * vocab, vocab, dtype=np.int64)[:, None]
                ).ravel()
    parts = [ids for b in bans for ids in b]
    distinct = len(parts) == len(bans)  # every row one sorted array without repeats
    flat = np.concatenate(parts).astype(np.int64, copy=False)
    flat += np.repeat(np.arange(len(bans), dtype=np.int64) * vocab,
                      [sum(map(len, b)) for b in bans])
    return flat if distinct else _sorted_distinct(flat)[0]


def _sorted_distinct(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``values`` sorted without repeats, and where each run starts in ``sorted(values)``:
    ``np.unique`` by a sort (numpy 2's, hash-based then sorted, costs several times more
    on the few to few hundred ids of a step)."""
    ordered = np.sort(values)
    first = np.empty(len(ordered), bool)
    first[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    starts = first.nonzero()[0]
    return ordered[starts], starts


def _penalties(
    source: np.ndarray, rules: Sequence[TokenRules], histories: Sequence[Sequence[int]],
) -> tuple[np.ndarray, np.ndarray] | None:
    """The repetition and count penalties of every row on its own tokens: the flat
    indices they change (sorted, without repeats) and their new values; None if none."""
    vocab = source.shape[1]
    rows, tokens, params = [], [], []
    for i, (row_rules, previous) in enumerate(zip(rules, histories, strict=True)):
        if previous and row_rules.penalises:
            o = row_rules.options
            rows.append(i)
            tokens.append(previous)
            params.append((o.repetition_penalty, o.frequency_penalty, o.presence_penalty))
    if not rows:
        return None
    lengths = list(map(len, tokens))
    # One array from all the histories (np.concatenate would convert each list apart)
    keys = np.fromiter(itertools.chain.from_iterable(tokens), np.int64, sum(lengths))
    if rows != [0]:
        keys += np.repeat(np.array(rows, np.int64) * vocab, lengths)
    flat, starts = _sorted_distinct(keys)
    uniform = len(set(params)) == 1  # the common case: every row's the same, as scalars
    if uniform:
        repetition, frequency, presence = params[0]
    else:
        by_row = np.zeros((source.shape[0], 3))
        by_row[rows] = params
        repetition, frequency, presence = by_row[flat // vocab].T
    values = source.reshape(-1)[flat].astype(np.float64)
    # (a penalty of 1.0 or 0 changes no value: not computed, where the rows share it)
    if not uniform or repetition != 1.0:
        values = np.where(values < 0, values * repetition, values / repetition)
    if not uniform or frequency != 0 or presence != 0:
        values -= frequency * _run_lengths(starts, len(keys)) + presence
    return flat, values.astype(np.float32)


def _run_lengths(starts: np.ndarray, total: int) -> np.ndarray:
    """How often each distinct value occurs, from where its run starts in the sorted
    values (np.diff's wrapper costs more than these three lines)."""
    counts = np.empty_like(starts)
    counts[:-1] = starts[1:] - starts[:-1]
    counts[-1] = total - starts[-1]
    return counts


def _log_softmax_row(row: np.ndarray, eos_id: int) -> None:
    """Renormalise one row in place; a row with nothing left can only end."""
    top = row.max()
    if not np.isfinite(top):
        row[:] = -np.inf
        row[eos_id] = 0.0
        return
    row -= top
    row -= np.log(np.exp(row).sum())
