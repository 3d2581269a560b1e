"""The searches: greedy, sampling and beam, in numpy over the model's decoder steps.

Everything here is a pure function of the model's log-probs and the request's own
history (and its own seeded RNG), which is what lets the engine batch requests without
changing any request's result.

Scores: every chosen token adds its log-prob after the request's rules (renormalized,
``serve.runtime.rules``), and a hypothesis's score is that sum divided by
``length ** length_penalty``, where length counts the generated tokens including the
final ``</s>``. Greedy and beam report the same kind of score, so they can be compared.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from serve.runtime.model import EncoderState, OnnxSeq2Seq, StepOutput
from serve.runtime.options import DecodingOptions
from serve.runtime.rules import TokenRules, mask_rows, process_rows
from serve.runtime.sampling import choose_token as choose_token  # re-exported (moved)
from serve.runtime.sampling import choose_tokens

MAX_SOURCE_LENGTH = 64  # longer messages keep their last tokens (the model saw short ones)
# A message this short is tokenized on the event loop (about 40 us for ten characters,
# 0.2-0.4 ms for 32): a hop to a worker thread and back costs more. A longer one (jieba
# on 2,000 characters takes milliseconds) goes to a thread.
INLINE_TOKENIZE_CHARS = 32


@dataclass(frozen=True)
class TokenLogProb:
    """A reply token's log-prob as decoding chose it, and the most likely tokens there."""

    token_id: int
    log_prob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, log-prob), most likely first


def token_log_prob(processed: np.ndarray, token: int, top: int) -> TokenLogProb:
    """``token``'s entry of one row of processed log-probs, with its ``top`` best tokens
    (ties by lower id)."""
    best: tuple[tuple[int, float], ...] = ()
    if top > 0:
        k = min(top, processed.shape[0])
        head = np.argpartition(-processed, k - 1)[:k]
        head = head[np.lexsort((head, -processed[head]))]
        best = tuple((int(i), float(processed[i])) for i in head)
    return TokenLogProb(int(token), float(processed[token]), best)


@dataclass
class GenerationResult:
    """A decoded reply: its text and tokens (no ``</s>``), and the n-best for beams."""

    text: str
    token_ids: list[int]
    score: float | None  # None unless return_scores
    finish_reason: str  # "stop" (</s>) or "length" (max_length reached)
    hypotheses: list[tuple[str, float | None]] = field(default_factory=list)  # n-best, best first
    source: str = "generated"  # or "retrieved": where the chosen reply came from
    candidates: list = field(default_factory=list)  # selection.Candidate, with return_candidates
    # with return_log_probs (greedy and sampling): one per token of token_ids
    log_probs: list[TokenLogProb] | None = None


class DecodingCancelled(Exception):
    """A decode stopped because its request was cancelled."""


def normalized_score(total: float, length: int, length_penalty: float) -> float:
    return float(total) / max(length, 1) ** length_penalty


# Unseeded requests' seeds: drawn from one generator seeded once, rather than an entropy
# read (a system call that hands the GIL to the other threads) for every request.
_SEEDS = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _SEEDS.seed(os.urandom(32)))  # no twin draws


def make_rng(seed: int | None) -> np.random.Generator:
    """The generator of seed ``seed``; a fresh, unpredictable one when None."""
    return np.random.default_rng(_SEEDS.getrandbits(128) if seed is None else seed)


def request_rng(options: DecodingOptions) -> np.random.Generator | None:
    """A request's own generator, from its seed; None for greedy, which draws nothing
    (an unseeded generator costs an entropy read)."""
    return make_rng(options.seed) if options.sampling else None


class SequenceDecoder:
    """One greedy or sampling reply, advanced one token per decoder step.

    The engine keeps one per active request; ``decode_alone`` uses the same class, so a
    request decoded in a batch and alone goes through exactly the same code.
    """

    def __init__(self, rules: TokenRules, rng: np.random.Generator | None):
        self.rules = rules
        self.options = rules.options
        self.rng = rng
        self.token_ids: list[int] = []
        self.total = 0.0
        self.finish_reason: str | None = None
        self.log_probs: list[TokenLogProb] = []  # with return_log_probs
        # whether its choice reads its whole row of log-probs (choose_rows)
        self.reads_whole = self.options.sampling or self.options.return_log_probs

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def advance(self, log_probs: np.ndarray, *, in_place: bool = False) -> int:
        """Choose the next token from the model's log-probs [V]; returns it (``</s>``
        ends). ``in_place``: ``log_probs`` is the caller's to spend (see process_rows)."""
        tokens, rows = choose_rows(log_probs[None, :], [self], in_place=in_place)
        return self.accept(tokens[0], rows[0])

    def accept(self, token: int, processed: np.ndarray) -> int:
        """Take ``token``, chosen from ``processed`` (this request's row of process_rows)."""
        self.total += float(processed[token])
        if token == self.rules.eos_id:
            self.finish_reason = "stop"
        else:
            if self.options.return_log_probs:
                self.log_probs.append(
                    token_log_prob(processed, token, self.options.top_log_probs))
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
            text, list(self.token_ids), score, self.finish_reason or "length", [(text, score)],
            log_probs=list(self.log_probs) if self.options.return_log_probs else None,
        )


WHOLE_ROWS_BELOW = 4  # batches of fewer rows are renormalised whole (choose_rows)


def choose_rows(log_probs: np.ndarray, decoders: Sequence[SequenceDecoder], *,
                in_place: bool = False) -> tuple[list[int], np.ndarray]:
    """Each decoder's next token from the model's log-probs [B,V] (its row's rules, then
    its choice), and the rows chosen from, for ``accept``: the engine's batch and a
    reply alone both choose here. The tokens are ``choose_tokens`` of ``process_rows``;
    so are the rows of those that sample or return log-probs, but a greedy row is only
    renormalised at its token (``_greedy_at_their_tokens``): the last pass over the
    whole batch is spent only on the rows that read it."""
    if len(decoders) == 1:  # a reply alone, every token: no lists to build
        d = decoders[0]
        out, shift = mask_rows(log_probs, [d.rules], [d.token_ids], in_place=in_place)
        out -= shift[:, None]
        return choose_tokens(out, [d.options], [d.rng]), out
    options = [d.options for d in decoders]
    out, shift = mask_rows(log_probs, [d.rules for d in decoders],
                           [d.token_ids for d in decoders], in_place=in_place)
    # (a few rows: the whole pass costs less than the bookkeeping that spares it)
    few = len(decoders) < WHOLE_ROWS_BELOW
    whole = [i for i, d in enumerate(decoders) if few or d.reads_whole]
    if len(whole) == len(options):
        out -= shift[:, None]
    else:
        for i in whole:
            out[i] -= shift[i]
    rngs = [d.rng for d in decoders]
    tokens = choose_tokens(out, options, rngs)
    if len(whole) < len(options):
        _greedy_at_their_tokens(out, shift, sorted(set(range(len(options))) - set(whole)),
                                tokens, options, rngs)
    return tokens, out


def _greedy_at_their_tokens(out: np.ndarray, shift: np.ndarray, rows: list[int],
                            tokens: list[int], options: Sequence[DecodingOptions],
                            rngs: Sequence) -> None:
    """The greedy ``rows`` of ``out`` (not renormalised: each its max's ``tokens``)
    given their token's renormalised entry, ``out - shift``, in place, exactly as if
    the whole row had been: subtracting a row's shift keeps its order (rounding is
    monotonic), so its max stays where it was, unless the float just below the max
    rounds onto the same value, where an entry of a lower id could tie with it. Such a
    row (rare) is renormalised whole and chooses again."""
    at, chosen = np.array(rows), np.array([tokens[i] for i in rows])
    top = out[at, chosen]
    value = top - shift[at]
    clash = np.nextafter(top, np.float32(-np.inf)) - shift[at] == value
    out[at[~clash], chosen[~clash]] = value[~clash]
    for i in at[clash].tolist():
        out[i] -= shift[i]
        tokens[i] = choose_tokens(out[i : i + 1], [options[i]], [rngs[i]])[0]


def text_delta(previous_piece: str, piece: str) -> str:
    """What a reply's text grows by when ``piece`` follows ``previous_piece`` (the piece
    and, between two Latin words, a space): two pieces detokenized, not the whole reply."""
    # detokenize([previous_piece, piece])[len(previous_piece):], without the lists (this
    # runs for every streamed token): a space only between two Latin words.
    if previous_piece and piece and _latin(previous_piece[-1]) and _latin(piece[0]):
        return " " + piece
    return piece


def _latin(ch: str) -> bool:
    return ch.isascii() and ch.isalnum()  # the tokenizer's own test (detokenize)


def token_texts(model: OnnxSeq2Seq, token_ids: list[int]) -> list[str]:
    """What each token adds to the reply's text, as the engine streams it (joined: the
    decoded reply)."""
    texts, last = [], ""
    for token in token_ids:
        piece = model.tokenizer.id_to_piece(token)
        texts.append(text_delta(last, piece))
        last = piece
    return texts


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
    decoder = SequenceDecoder(TokenRules.for_model(model, options), request_rng(options))
    prev, h, c = np.array([model.bos_id], np.int64), state.h, state.c
    while not decoder.done:
        out = model.step(prev, h, c, state.memory, state.memory_keys, state.src_mask)
        # The step's outputs are this loop's own: the rules may overwrite the log-probs,
        # and the input the step read may take the next token.
        prev[0] = decoder.advance(out.log_probs[0], in_place=True)
        h, c = out.h, out.c
    return decoder.result(model)


Hypothesis = tuple[list[int], float, str]  # tokens, cumulative log-prob, finish reason


def repeat_rows(state: EncoderState, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A one-row encoder state's memory, memory keys and mask for ``rows`` decoder rows."""
    return (np.repeat(state.memory, rows, axis=0), np.repeat(state.memory_keys, rows, axis=0),
            np.repeat(state.src_mask, rows, axis=0))


@dataclass
class _Beam:
    """The live hypotheses of a beam search and the decoder state that continues them."""

    tokens: list[list[int]]
    scores: np.ndarray  # cumulative log-probs
    prev: np.ndarray  # each one's last token
    h: np.ndarray
    c: np.ndarray

    @classmethod
    def start(cls, model: OnnxSeq2Seq, state: EncoderState) -> _Beam:
        return cls([[]], np.zeros(1), np.array([model.bos_id], np.int64), state.h, state.c)

    def follow(self, kept: list[tuple[int, int, float]], out: StepOutput) -> _Beam:
        """The beam of the kept extensions (row, token, score) of this step's rows."""
        rows = np.array([row for row, _, _ in kept])
        return _Beam([self.tokens[row] + [token] for row, token, _ in kept],
                     np.array([score for _, _, score in kept]),
                     np.array([token for _, token, _ in kept], np.int64),
                     out.h[rows], out.c[rows])


def _extend(
    scores: np.ndarray, processed: np.ndarray, k: int, eos: int
) -> tuple[list[tuple[int, int, float]], list[tuple[int, float]], bool]:
    """One step's ranking of every extension of the live rows by cumulative log-prob:
    the best ``k`` that do not end (row, token, score), the endings ranked among the top
    ``k`` (row, score), and whether the top-ranked extension ends."""
    candidates = (scores[:, None] + processed).ravel()
    ranked = _top_ranked(candidates, 2 * k)
    kept: list[tuple[int, int, float]] = []
    ended: list[tuple[int, float]] = []
    for rank, flat in enumerate(ranked):
        score = float(candidates[flat])
        if not math.isfinite(score):
            break
        row, token = divmod(int(flat), processed.shape[1])
        if token == eos:
            if rank < k:
                ended.append((row, score))
        elif len(kept) < k:
            kept.append((row, token, score))
    return kept, ended, int(ranked[0]) % processed.shape[1] == eos


def _n_best(
    model: OnnxSeq2Seq, finished: list[Hypothesis], options: DecodingOptions
) -> GenerationResult:
    """The finished hypotheses ranked by their length-normalized score."""

    def final_score(item: Hypothesis) -> float:
        tokens, total, reason = item
        return normalized_score(total, len(tokens) + (reason == "stop"), options.length_penalty)

    best = sorted(finished, key=final_score, reverse=True)[: options.num_hypotheses]
    hypotheses = [
        (model.tokenizer.decode(t), final_score((t, s, r)) if options.return_scores else None)
        for t, s, r in best
    ]
    tokens, _, reason = best[0]
    return GenerationResult(hypotheses[0][0], list(tokens), hypotheses[0][1], reason, hypotheses)


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
    rules = TokenRules.for_model(model, options)
    state = model.encode([src_ids])
    memory = repeat_rows(state, options.beam_size)
    antilm = AntiLanguageModel(model, options.beam_size) if options.antilm_weight else None
    beam, finished = _Beam.start(model, state), []
    for position in range(options.max_length):
        if should_stop is not None and should_stop():
            raise DecodingCancelled()
        n = len(beam.tokens)
        out = model.step(beam.prev, beam.h, beam.c, *(m[:n] for m in memory))
        processed = process_rows(out.log_probs, [rules] * n, beam.tokens)
        if antilm is not None and position < options.antilm_steps:
            processed -= options.antilm_weight * antilm.step(beam.prev)
        kept, ended, top_ends = _extend(beam.scores, processed, options.beam_size, model.eos_id)
        finished += [(beam.tokens[row], score, "stop") for row, score in ended]
        if (top_ends and len(finished) >= options.num_hypotheses) or not kept:
            break
        beam = beam.follow(kept, out)
        if antilm is not None:
            antilm.reorder(np.array([row for row, _, _ in kept]))
    else:
        finished += [(t, float(s), "length") for t, s in zip(beam.tokens, beam.scores, strict=True)]
    return _n_best(model, finished, options)


class AntiLanguageModel:
    """The decoder as a language model: its log-probs for the beam's prefixes given a
    question of only ``</s>``, which stands in for "no question". Li et al. (2016) train a
    separate language model for p(T); this stand-in costs no training and no second model.
    ``</s>`` itself is not penalised, so that the penalty never favours ending early."""

    def __init__(self, model: OnnxSeq2Seq, rows: int):
        self.model = model
        state = model.encode([[model.eos_id]])
        self.memory, self.keys, self.mask = repeat_rows(state, rows)
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
