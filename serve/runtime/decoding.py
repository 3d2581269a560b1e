"""Decoding options and the search algorithms (greedy, sampling, beam) in numpy.

The options follow CTranslate2's ``translate_batch`` names and defaults, so whoever knows
one knows the other. Everything here is a pure function of the model's log-probs and the
request's own history (and its own seeded RNG), which is what lets the engine batch
requests without changing any request's result.

Scores: every chosen token adds its log-prob after the rules below (renormalized), and a
hypothesis's score is that sum divided by ``length ** length_penalty``, where length
counts the generated tokens including the final ``</s>``. Greedy and beam report the same
kind of score, so they can be compared.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields

import numpy as np

from serve.runtime.model import OnnxSeq2Seq
from serve.runtime.tokenizer import detokenize

MAX_SOURCE_LENGTH = 64  # longer messages keep their last tokens (the model saw short ones)


@dataclass(frozen=True)
class DecodingOptions:
    """How to decode one request. Defaults are CTranslate2's ``translate_batch`` defaults,
    except ``max_length`` (a chat reply, not a document)."""

    beam_size: int = 1  # 1 = greedy or sampling; > 1 = beam search (final n-best, no streaming)
    num_hypotheses: int = 1  # how many of the beam's hypotheses to return (<= beam_size)
    length_penalty: float = 1.0  # score = sum(log p) / length ** length_penalty
    repetition_penalty: float = 1.0  # > 1 makes already generated tokens less likely
    no_repeat_ngram_size: int = 0  # > 0: never repeat an n-gram of this size
    min_length: int = 1  # </s> is forbidden before this many reply tokens
    max_length: int = 40  # reply tokens at most (finish_reason "length" when reached)
    sampling_temperature: float = 1.0  # > 1 flatter, < 1 sharper (sampling only)
    sampling_topk: int = 1  # 1 = greedy (argmax), 0 = sample from the whole vocabulary
    sampling_topp: float = 1.0  # nucleus: sample among the smallest set with this mass
    seed: int | None = None  # sampling seed: the same seed gives the same reply
    disable_unk: bool = True  # never produce <unk>
    suppress_words: tuple[str, ...] = ()  # no token whose piece contains one of these
    # MMI-antiLM (Li et al. 2016), beam search only: for the first ``antilm_steps`` reply
    # tokens, subtract ``antilm_weight`` x the log-prob the decoder gives the token with
    # no question at all. Replies any question would get ("我也是") lose; 0 = off.
    antilm_weight: float = 0.0
    antilm_steps: int = 3
    return_scores: bool = False  # fill GenerationResult.score and the hypotheses' scores

    def __post_init__(self) -> None:
        words = self.suppress_words
        if isinstance(words, str):
            words = (words,)
        if not isinstance(words, list | tuple | set | frozenset) or not all(
            isinstance(w, str) for w in words
        ):
            raise ValueError(f"suppress_words must be a list of strings, got {words!r}")
        object.__setattr__(self, "suppress_words", tuple(sorted(set(words))))
        self.validate()

    @classmethod
    def from_kwargs(cls, **kwargs) -> DecodingOptions:
        """Options from keyword arguments; an unknown name is a ValueError that lists the
        known ones (a misspelt option must not be silently ignored)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(
                f"unknown decoding option(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        return cls(**kwargs)

    @property
    def sampling(self) -> bool:
        return self.sampling_topk != 1

    def validate(self) -> None:
        def integer(name: str, low: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")

        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value!r}")
            return float(value)

        integer("beam_size", 1)
        integer("num_hypotheses", 1)
        integer("no_repeat_ngram_size", 0)
        integer("min_length", 0)
        integer("max_length", 1)
        integer("sampling_topk", 0)
        integer("antilm_steps", 0)
        number("length_penalty")
        if not 0 <= number("antilm_weight") < 1:
            raise ValueError(f"antilm_weight must be in [0, 1), got {self.antilm_weight!r}")
        if self.antilm_weight and self.beam_size == 1:
            raise ValueError("antilm_weight needs beam search (beam_size > 1)")
        if number("repetition_penalty") <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if number("sampling_temperature") <= 0:
            raise ValueError(f"sampling_temperature must be > 0, got {self.sampling_temperature!r}")
        if not 0 < number("sampling_topp") <= 1:
            raise ValueError(f"sampling_topp must be in (0, 1], got {self.sampling_topp!r}")
        if self.min_length > self.max_length:
            raise ValueError(
                f"min_length ({self.min_length}) must not exceed max_length ({self.max_length})"
            )
        if self.num_hypotheses > self.beam_size:
            raise ValueError(
                f"num_hypotheses ({self.num_hypotheses}) must not exceed beam_size "
                f"({self.beam_size}): a beam of n keeps n hypotheses"
            )
        if self.beam_size > 1 and self.sampling:
            raise ValueError("sampling (sampling_topk != 1) needs beam_size=1")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0
        ):
            raise ValueError(f"seed must be a non-negative integer or None, got {self.seed!r}")
        if not all(isinstance(w, str) for w in self.suppress_words):
            raise ValueError("suppress_words must be strings")


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    score: float | None  # None unless return_scores
    finish_reason: str  # "stop" (</s>) or "length" (max_length reached)
    hypotheses: list[tuple[str, float | None]] = field(default_factory=list)  # n-best, best first


class DecodingCancelled(Exception):
    """A decode stopped because its request was cancelled."""


# -- logit rules: pure functions over one row of log-probs --------------------------------


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


@dataclass
class TokenRules:
    """The rules of one request, resolved once against the model's vocabulary."""

    options: DecodingOptions
    eos_id: int
    banned: np.ndarray  # never produced: <pad>, <s>, <unk> if disabled, suppressed words
    guard: WordGuard | None = None  # suppressed words spelled across tokens

    @classmethod
    def for_model(cls, model: OnnxSeq2Seq, options: DecodingOptions) -> TokenRules:
        """The request's rules; the model folder's blocklist is always among them."""
        banned = [model.pad_id, model.bos_id] + ([model.unk_id] if options.disable_unk else [])
        words = tuple(sorted({*options.suppress_words, *model.blocklist_words}))
        guard = None
        if words:
            banned.extend(model.ids_containing(words).tolist())
            guard = model.word_guard(words)
        return cls(options, model.eos_id, np.unique(np.array(banned, np.int64)), guard)

    def mask_row(self, row: np.ndarray, previous: Sequence[int]) -> None:
        """Apply this request's rules to one row of log-probs, in place."""
        o = self.options
        if o.repetition_penalty != 1.0 and previous:
            row[:] = apply_repetition_penalty(row, previous, o.repetition_penalty)
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


def choose_token(log_probs: np.ndarray, options: DecodingOptions, rng: np.random.Generator) -> int:
    """Greedy argmax when ``sampling_topk == 1``; otherwise temperature, top-k, top-p and
    one draw from ``rng`` (inverse CDF over the kept tokens in id order, so a seed
    reproduces across numpy versions)."""
    if not options.sampling:
        return int(np.argmax(log_probs))
    logits = log_probs.astype(np.float64)
    if options.sampling_temperature != 1.0:
        logits /= options.sampling_temperature
    k = options.sampling_topk
    candidates = np.argpartition(-logits, k - 1)[:k] if 0 < k < logits.shape[0] else None
    if candidates is not None:
        logits = logits[candidates]
    probs = np.exp(logits - np.max(logits))
    probs /= probs.sum()
    kept = _nucleus(probs, options.sampling_topp) if options.sampling_topp < 1.0 else None
    if kept is not None:
        probs = probs[kept] / probs[kept].sum()
        ids = kept if candidates is None else candidates[kept]
    else:
        ids = np.arange(len(probs)) if candidates is None else candidates
    order = np.argsort(ids, kind="stable")  # id order: independent of partition internals
    ids, probs = ids[order], probs[order]
    cdf = np.cumsum(probs)
    draw = rng.random() * cdf[-1]
    return int(ids[min(int(np.searchsorted(cdf, draw, side="right")), len(ids) - 1)])


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Indices of the smallest set of most probable entries whose mass reaches ``top_p``
    (ties broken by index). Looks at the head first: a full sort of a 20k vocabulary
    costs milliseconds, and the nucleus is usually a few dozen tokens."""
    size = min(64, len(probs))
    while True:
        head = np.argpartition(-probs, size - 1)[:size] if size < len(probs) else None
        if head is None:
            head = np.arange(len(probs))
        head = head[np.lexsort((head, -probs[head]))]  # by probability, then by index
        cumulative = np.cumsum(probs[head])
        if cumulative[-1] >= top_p or size >= len(probs):
            return head[: int(np.searchsorted(cumulative, top_p)) + 1]
        size = min(size * 4, len(probs))


def normalized_score(total: float, length: int, length_penalty: float) -> float:
    return float(total) / max(length, 1) ** length_penalty


def make_rng(seed: int | None) -> np.random.Generator:
    return np.random.default_rng(seed)


class SequenceDecoder:
    """One greedy or sampling reply, advanced one token per decoder step.

    The engine keeps one per active request; ``decode_alone`` uses the same class, so a
    request decoded in a batch and alone goes through exactly the same code.
    """

    def __init__(self, rules: TokenRules, rng: np.random.Generator):
        self.rules = rules
        self.options = rules.options
        self.rng = rng
        self.token_ids: list[int] = []
        self.total = 0.0
        self.finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def advance(self, log_probs: np.ndarray) -> int:
        """Choose the next token from the model's log-probs; returns it (``</s>`` ends)."""
        processed = self.rules.process(log_probs, self.token_ids)
        return self.accept(choose_token(processed, self.options, self.rng), processed)

    def accept(self, token: int, processed: np.ndarray) -> int:
        """Take ``token``, chosen from ``processed`` (this request's row of process_rows)."""
        self.total += float(processed[token])
        if token == self.rules.eos_id:
            self.finish_reason = "stop"
        else:
            self.token_ids.append(token)
            if len(self.token_ids) >= self.options.max_length:
                self.finish_reason = "length"
        return token

    @property
    def score(self) -> float:
        length = len(self.token_ids) + (self.finish_reason == "stop")
        return normalized_score(self.total, length, self.options.length_penalty)

    def result(self, model: OnnxSeq2Seq) -> GenerationResult:
        text = model.tokenizer.decode(self.token_ids)
        score = self.score if self.options.return_scores else None
        return GenerationResult(
            text, list(self.token_ids), score, self.finish_reason or "length", [(text, score)]
        )


# -- whole decodes of one request ---------------------------------------------------------


def source_ids(model: OnnxSeq2Seq, text: str, max_source_length: int = MAX_SOURCE_LENGTH):
    """Token ids of a message; a message with nothing to encode is a ValueError."""
    if not isinstance(text, str):
        raise ValueError("the message must be a string")
    ids = model.tokenizer.encode(text)
    if not ids:
        raise ValueError("the message is empty after normalization")
    return ids[-max_source_length:]


def decode_alone(
    model: OnnxSeq2Seq, src_ids: list[int], options: DecodingOptions
) -> GenerationResult:
    """Greedy or sampling decode of one request with batch size 1 (the reference the
    engine's batched result must equal)."""
    state = model.encode([src_ids])
    decoder = SequenceDecoder(TokenRules.for_model(model, options), make_rng(options.seed))
    prev, h, c = np.array([model.bos_id], np.int64), state.h, state.c
    while not decoder.done:
        out = model.step(prev, h, c, state.memory, state.memory_keys, state.src_mask)
        prev = np.array([decoder.advance(out.log_probs[0])], np.int64)
        h, c = out.h, out.c
    return decoder.result(model)


def beam_search(
    model: OnnxSeq2Seq,
    src_ids: list[int],
    options: DecodingOptions,
    should_stop: Callable[[], bool] | None = None,
) -> GenerationResult:
    """Beam search over its own batch of ``beam_size`` rows.

    Each step ranks all extensions of the live hypotheses by their cumulative log-prob
    and keeps the best ``beam_size`` that do not end; an ending among the top
    ``beam_size`` ranks becomes a finished hypothesis. The search stops when the
    top-ranked extension ends and ``num_hypotheses`` are finished (CTranslate2's and
    OpenNMT's rule; with beam_size 1 this is exactly greedy), or at ``max_length``, where
    the live hypotheses finish with reason "length". Finished hypotheses are ranked by
    their length-normalized score. With ``antilm_weight`` the ranking and the scores are
    the MMI-antiLM ones (see ``AntiLanguageModel``).
    """
    k, eos = options.beam_size, model.eos_id
    rules = TokenRules.for_model(model, options)
    state = model.encode([src_ids])
    antilm = AntiLanguageModel(model, k) if options.antilm_weight else None
    memory = np.repeat(state.memory, k, axis=0)
    keys = np.repeat(state.memory_keys, k, axis=0)
    mask = np.repeat(state.src_mask, k, axis=0)
    live: list[list[int]] = [[]]
    live_scores = np.zeros(1)
    prev, h, c = np.array([model.bos_id], np.int64), state.h, state.c
    finished: list[tuple[list[int], float, str]] = []
    for position in range(options.max_length):
        if should_stop is not None and should_stop():
            raise DecodingCancelled()
        n = len(live)
        out = model.step(prev, h, c, memory[:n], keys[:n], mask[:n])
        processed = process_rows(out.log_probs, [rules] * n, live)
        if antilm is not None and position < options.antilm_steps:
            processed -= options.antilm_weight * antilm.step(prev)
        candidates = (live_scores[:, None] + processed).ravel()
        ranked = _top_ranked(candidates, 2 * k)
        kept: list[tuple[int, int, float]] = []
        for rank, flat in enumerate(ranked):
            score = float(candidates[flat])
            if not math.isfinite(score):
                break
            row, token = divmod(int(flat), processed.shape[1])
            if token == eos:
                if rank < k:
                    finished.append((live[row], score, "stop"))
            elif len(kept) < k:
                kept.append((row, token, score))
        top_ends = int(ranked[0]) % processed.shape[1] == eos
        if (top_ends and len(finished) >= options.num_hypotheses) or not kept:
            break
        rows = np.array([row for row, _, _ in kept])
        live = [live[row] + [token] for row, token, _ in kept]
        live_scores = np.array([score for _, _, score in kept])
        prev = np.array([token for _, token, _ in kept], np.int64)
        h, c = out.h[rows], out.c[rows]
        if antilm is not None:
            antilm.reorder(rows)
    else:
        finished.extend(
            (tokens, float(s), "length") for tokens, s in zip(live, live_scores, strict=True)
        )

    def final_score(item: tuple[list[int], float, str]) -> float:
        tokens, total, reason = item
        return normalized_score(total, len(tokens) + (reason == "stop"), options.length_penalty)

    best = sorted(finished, key=final_score, reverse=True)[: options.num_hypotheses]
    hypotheses = [
        (model.tokenizer.decode(t), final_score((t, s, r)) if options.return_scores else None)
        for t, s, r in best
    ]
    tokens, _, reason = best[0]
    return GenerationResult(hypotheses[0][0], list(tokens), hypotheses[0][1], reason, hypotheses)


class AntiLanguageModel:
    """The decoder as a language model: its log-probs for the beam's prefixes given a
    question of only ``</s>``, which stands in for "no question". Li et al. (2016) train a
    separate language model for p(T); this stand-in costs no training and no second model.
    ``</s>`` itself is not penalised, so that the penalty never favours ending early."""

    def __init__(self, model: OnnxSeq2Seq, rows: int):
        self.model = model
        state = model.encode([[model.eos_id]])
        self.memory = np.repeat(state.memory, rows, axis=0)
        self.keys = np.repeat(state.memory_keys, rows, axis=0)
        self.mask = np.repeat(state.src_mask, rows, axis=0)
        self.h, self.c = state.h, state.c
        self._last = None

    def step(self, prev: np.ndarray) -> np.ndarray:
        """Log-probs [n,V] of the next token after each of the ``n`` live prefixes."""
        n = len(prev)
        self._last = self.model.step(
            prev, self.h, self.c, self.memory[:n], self.keys[:n], self.mask[:n]
        )
        log_probs = self._last.log_probs.copy()
        log_probs[:, self.model.eos_id] = 0.0
        return log_probs

    def reorder(self, rows: np.ndarray) -> None:
        """Follow the beam: row ``i`` continues the prefix that was row ``rows[i]``."""
        if self._last is not None:
            self.h, self.c = self._last.h[rows], self._last.c[rows]
            self._last = None


def _top_ranked(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` best scores, best first, ties by lower index: exactly
    ``np.argsort(-scores, kind="stable")[:n]`` without sorting all beam x vocab scores."""
    if n >= scores.shape[0]:
        return np.argsort(-scores, kind="stable")
    threshold = scores[np.argpartition(-scores, n - 1)[n - 1]]
    head = np.flatnonzero(scores >= threshold)  # every tie at the threshold, in index order
    return head[np.argsort(-scores[head], kind="stable")][:n]


def generate(
    model: OnnxSeq2Seq,
    text: str,
    options: DecodingOptions | None = None,
    *,
    max_source_length: int = MAX_SOURCE_LENGTH,
) -> GenerationResult:
    """Answer one message without an engine (``python -m serve ask``, evaluation)."""
    options = options or DecodingOptions()
    src = source_ids(model, text, max_source_length)
    if options.beam_size > 1:
        return beam_search(model, src, options)
    return decode_alone(model, src, options)
