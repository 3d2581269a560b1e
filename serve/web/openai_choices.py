"""The choices of one API request: ``n`` replies, each cut at its first stop string, with
their per-token log-probs, as events both the JSON and the streamed answers are made of.

Two ways a request's choices come about:

- decoded (greedy or sampling, no choice among candidates): one engine request per
  choice (seeds seed, seed+1, ...), streamed token by token; a stop string cancels the
  rest of its request. Log-probs are the decoder's own (the processed ones the token was
  chosen from), with ``top_logprobs`` alternatives.
- whole (beam search, or a reply chosen among candidates: hybrid): one engine request
  whose n best (the beam's n-best, or the n best candidates after reranking) are the
  choices. Their log-probs are each reply's per-token forward log-probs from the folder's
  scoring graph (no rules applied), with no ``top_logprobs``; null without a scoring
  graph.

While streaming, text that could be the start of a stop string is held back until it
is known not to be one.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field, replace
from typing import Any

from serve.web.lanes import API_LANE, lane
from serve.web.openai_fields import ApiError, Wanted

FLOOR = -9999.0  # OpenAI's log-prob for "impossible" (JSON has no -inf)


@dataclass
class Event:
    """A piece of choice ``index``: its text and the log-prob entries of its tokens;
    ``finish`` is set on the choice's last event."""

    index: int
    text: str
    entries: list[dict[str, Any]] = field(default_factory=list)
    finish: str | None = None


def _log_prob(value: float) -> float:
    return float(value) if math.isfinite(value) else FLOOR


def entry(token: str, log_prob: float, top: list[tuple[str, float]] | None) -> dict:
    """One token's entry of ``choices[].logprobs.content``."""
    out: dict[str, Any] = {"token": token, "logprob": _log_prob(log_prob),
                           "bytes": list(token.encode("utf-8", "backslashreplace"))}
    out["top_logprobs"] = [{"token": t, "logprob": _log_prob(lp),
                            "bytes": list(t.encode("utf-8", "backslashreplace"))}
                           for t, lp in (top or [])]
    return out


class ChoiceText:
    """One choice's text as it grows: cut at the first stop string, text that could begin
    one held back, and each token's log-prob entry released with the last of its text."""

    def __init__(self, index: int, stop: tuple[str, ...]):
        self.index, self.stop = index, stop
        self.sent = 0  # characters released
        self.text = ""  # everything received (until a stop string)
        self.pending: list[tuple[int, int, dict]] = []  # (start, end, entry) held
        self.stopped = False
        self.tokens = 0

    def feed(self, text: str, entries: list[dict] | None = None, tokens: int = 1) -> Event:
        """Add a piece (with the entries of its tokens): what may be released now."""
        if not self.stop:  # nothing is ever held back: all of it, at once
            self.text += text
            self.tokens += tokens
            self.sent = len(self.text)
            return Event(self.index, text, entries or [])
        start = len(self.text)
        self.text += text
        self.tokens += tokens
        self.pending += [(start, len(self.text), e) for e in entries or []]
        # Nothing released can begin a stop string: look from there on only.
        found = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if found:
            cut = min(found)
            self.text, self.stopped = self.text[:cut], True
            return self._release(cut, lambda s, e: s < cut, "stop")
        upto = len(self.text) - self._held()
        return self._release(upto, lambda s, e: e <= upto)

    def _held(self) -> int:
        """How much of the text's end could begin a stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text) - self.sent), longest, -1):
                if self.text.endswith(s[:k]):
                    longest = k
                    break
        return longest

    def _release(self, upto: int, ready, finish: str | None = None) -> Event:
        text, self.sent = self.text[self.sent:upto], max(self.sent, upto)
        released = [e for s, end, e in self.pending if ready(s, end)]
        self.pending = [] if finish else [p for p in self.pending if not ready(p[0], p[1])]
        return Event(self.index, text, released, finish)

    def finish(self, reason: str) -> Event:
        """The choice ended without a stop string: all that is held back, and the end."""
        return self._release(len(self.text), lambda s, e: True, reason)


def _piece_entries(model, piece, last_piece: str, top_wanted: int) -> list[dict]:
    from serve.runtime.search import text_delta

    if piece.log_prob is None:
        return []
    top = None
    if top_wanted:
        top = [(text_delta(last_piece, model.tokenizer.id_to_piece(t)), lp)
               for t, lp in piece.log_prob.top[:top_wanted]]
    return [entry(piece.text, piece.log_prob.log_prob, top)]


@dataclass
class Decoded:
    """One engine stream per choice, each already begun (its first piece awaited)."""

    model: Any
    want: Wanted
    streams: list[Any]
    iterators: list[Any]
    firsts: list[Any]
    results: list[Any] = field(default_factory=list)

    async def events(self) -> AsyncIterator[Event]:
        for index, (stream, pieces, first) in enumerate(
                zip(self.streams, self.iterators, self.firsts, strict=True)):
            async for event in self._one(index, stream, pieces, first):
                yield event

    async def _one(self, index, stream, pieces, first) -> AsyncIterator[Event]:
        text, last = ChoiceText(index, self.want.stop), ""
        piece = first
        while piece is not None:
            entries = None
            if self.want.logprobs:
                entries = _piece_entries(self.model, piece, last, self.want.top_logprobs)
                if piece.token_id is not None:  # the top alternatives' deltas follow it
                    last = self.model.tokenizer.id_to_piece(piece.token_id)
            event = text.feed(piece.text, entries)
            if text.stopped:
                await pieces.aclose()  # the rest of this reply is not needed
                self.results.append((text.tokens, "stop"))
                yield event
                return
            if event.text or event.entries:
                yield event
            piece = await anext(pieces, None)
        result = stream.result
        self.results.append((len(result.token_ids) if result else text.tokens,
                             result.finish_reason if result else "stop"))
        yield text.finish(result.finish_reason if result else "stop")

    async def aclose(self) -> None:
        for pieces in self.iterators:
            await pieces.aclose()


async def _first(pieces):
    return await anext(pieces, None)


def _pieces(stream):
    """The stream's pieces (an engine without ``pieces()``, as the TensorFlow baseline:
    its text deltas as pieces without tokens)."""
    if hasattr(stream, "pieces"):
        return stream.pieces()
    from serve.runtime.engine import Piece

    async def texts():
        async for delta in stream:
            yield Piece(delta)

    return texts()


async def start_decoded(engine, text: str, options: Any, want: Wanted) -> Decoded:
    """The ``n`` engine requests, each begun: a refusal (429, 503) comes before any 200.
    ``options`` (``DecodingOptions``, validated) go to the engine as they are; only what
    a choice changes (log-probs, its seed) makes new ones."""
    if want.logprobs:
        options = replace(options, return_log_probs=True, top_log_probs=want.top_logprobs)
    seed = options.seed
    streams, iterators, firsts = [], [], []
    try:
        for i in range(want.n):
            seeded = options if i == 0 or seed is None else replace(options, seed=seed + i)
            stream = engine.stream(text, seeded, **lane(engine, API_LANE))
            pieces = _pieces(stream)
            streams.append(stream)
            iterators.append(pieces)
            firsts.append(await _first(pieces))
    except BaseException:
        for pieces in iterators:
            await pieces.aclose()
        raise
    return Decoded(engine.model, want, streams, iterators, firsts)


@dataclass
class Whole:
    """Choices known at once: a beam's n-best or the best candidates after reranking."""

    replies: list[tuple[str, list[int], str]]  # text, token ids, finish reason
    log_probs: list[list[float]] | None
    model: Any
    want: Wanted
    result: Any  # the engine's GenerationResult (choice 0)
    results: list[Any] = field(default_factory=list)

    async def events(self) -> AsyncIterator[Event]:
        from serve.runtime.replies import reply_deltas
        from serve.runtime.search import token_texts

        for index, (reply, ids, reason) in enumerate(self.replies):
            text = ChoiceText(index, self.want.stop)
            pieces = token_texts(self.model, ids)
            lps = self.log_probs[index] if self.log_probs is not None else None
            if "".join(pieces) != reply:  # a retrieved reply's own spelling
                pieces, lps = reply_deltas(self.model, reply) or [reply], None
            for i, piece in enumerate(pieces):
                entries = [entry(piece, lps[i], [])] if lps is not None else []
                event = text.feed(piece, entries, tokens=0)
                if text.stopped:
                    break
                if event.text:
                    yield event
            self.results.append((len(ids), "stop" if text.stopped else reason))
            yield event if text.stopped else text.finish(reason)

    async def aclose(self) -> None:
        return None


def _whole_replies(result, n: int, max_length: int, tokenizer) -> list[tuple[str, list, str]]:
    """The n best of a whole result: ranked candidates, else the beam's n-best."""
    replies = [(result.text, list(result.token_ids), result.finish_reason)]

    def reason(ids) -> str:
        return "length" if len(ids) >= max_length else "stop"

    if result.candidates:
        others = [(c.text, list(c.token_ids)) for c in result.candidates
                  if c.text != result.text]
    else:
        others = [(t, tokenizer.encode(t)) for t, _ in result.hypotheses[1:]]
    replies += [(t, ids, reason(ids)) for t, ids in others]
    return replies[:n]


def is_whole(engine, options) -> bool:
    """Whether the engine answers at once (beam search, or a reply chosen among
    candidates) rather than token by token."""
    if options.beam_size > 1:
        return True
    sources = getattr(engine, "sources", None)
    return sources is not None and sources.needs_selection(options)


async def start_whole(engine, text: str, options: Any, want: Wanted) -> Whole:
    decoding = options
    if want.n > 1 or want.candidates:
        if decoding.beam_size > 1:
            if want.n > decoding.beam_size:
                raise ApiError(400, f"n ({want.n}) must not exceed beam_size "
                               f"({decoding.beam_size})", "invalid_n", param="n")
            decoding = replace(decoding, num_hypotheses=max(decoding.num_hypotheses, want.n))
        elif decoding.sampling:
            decoding = replace(decoding, generated_candidates=max(
                decoding.generated_candidates, want.n))
        decoding = replace(decoding, return_candidates=True)
    result = await engine.generate(text, decoding, **lane(engine, API_LANE))
    replies = _whole_replies(result, want.n, decoding.max_length, engine.model.tokenizer)
    log_probs = None
    if want.logprobs and hasattr(engine, "forward_log_probs"):
        log_probs = await engine.forward_log_probs(text, [ids for _, ids, _ in replies])
    return Whole(replies, log_probs, engine.model, want, result)


async def start_choices(engine, text: str, options: Any, want: Wanted,
                        asked: Collection[str] = ()):
    """The request's choices (``options``: its ``DecodingOptions``; ``asked``: the fields
    the request set, to name in an error), begun (``Decoded``) or known (``Whole``)."""
    try:
        whole = is_whole(engine, options)
    except ValueError as e:  # e.g. reply_mode hybrid on a folder without a reply index
        name = str(e).split(" ", 1)[0]
        raise ApiError(400, str(e), "invalid_decoding_option",
                       param=name if name in asked else None) from None
    if whole:
        return await start_whole(engine, text, options, want)
    if want.n > 1 and not options.sampling:
        raise ApiError(400, "n > 1 needs sampling (temperature or top_p), beam search "
                       "(beam_size >= n) or the hybrid reply mode: greedy decoding has one "
                       "reply", "invalid_n", param="n")
    return await start_decoded(engine, text, options, want)
