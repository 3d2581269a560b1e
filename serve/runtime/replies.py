"""Where a reply comes from: the decoder alone, or a choice among candidates.

A model folder may hold, beside its encoder and decoder, a reply index (retrieval),
scoring graphs (forward and backward) and tuned selection weights (its manifest's
``selection``). ``ReplySources`` bundles them and decides, per request, whether the reply
is decoded as it streams (plain generation) or chosen (``serve.runtime.selection``):

- ``reply_mode="hybrid"``: the replies of the ``retrieval_candidates`` most similar
  indexed questions, plus the model's own proposals, reranked;
- ``reply_mode="generate"``: the model's own proposals only, reranked when there are
  several (``generated_candidates`` samples, or a beam's ``num_hypotheses``).

The engine runs the proposals through its shared batch and the scoring through one
batched call (``serve.runtime.engine``); ``select_reply`` here does the same one request at
a time, for ``serve ask``, ``serve evaluate`` and tuning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache

from serve.runtime.batching import pad_id_rows
from serve.runtime.manifest import SCORE_OUTPUTS
from serve.runtime.model import OnnxSeq2Seq
from serve.runtime.options import DecodingOptions
from serve.runtime.retrieval import ReplyIndex
from serve.runtime.scoring import CandidateScorer, IdPair, PairScore
from serve.runtime.search import (
    MAX_SOURCE_LENGTH,
    GenerationResult,
    generate,
    source_ids,
    text_delta,
)
from serve.runtime.selection import Candidate, SelectionWeights, rank, usable
from serve.runtime.sessions import run_named
from serve.runtime.tokenizer import EOS_ID, PAD_ID, UNK_ID


@dataclass
class ReplySources:
    """The model folder's reply index, scoring graphs and selection weights (each may be
    absent: a folder exported before them serves as plain generation)."""

    index: ReplyIndex | None = None
    scorer: CandidateScorer | None = None
    weights: SelectionWeights = field(default_factory=SelectionWeights)

    @classmethod
    def load(cls, model: OnnxSeq2Seq, *, intra_op_num_threads: int = 0) -> ReplySources:
        return cls(
            index=ReplyIndex.load(model.model_dir, model.tokenizer),
            scorer=CandidateScorer.load(model.model_dir,
                                        intra_op_num_threads=intra_op_num_threads),
            weights=SelectionWeights.from_dict(model.manifest.selection),
        )

    def mode(self, options: DecodingOptions) -> str:
        """The request's reply mode: hybrid by default where there is an index."""
        if options.reply_mode == "hybrid" and self.index is None:
            raise ValueError("reply_mode hybrid needs a model folder with a reply index")
        if options.reply_mode is None:
            return "hybrid" if self.index is not None else "generate"
        return options.reply_mode

    def needs_selection(self, options: DecodingOptions) -> bool:
        """Whether the reply is chosen among candidates rather than decoded as it streams."""
        if self.mode(options) == "hybrid":
            return True
        if self.scorer is None:  # first: proposals() copies the options (every request)
            return False
        return options.num_hypotheses > 1 if options.beam_size > 1 else len(
            self.proposals(options)) > 1

    def proposals(self, options: DecodingOptions) -> list[DecodingOptions]:
        """The decodes whose replies are the model's candidates: one, or one per sample
        (seeds seed, seed+1, ...)."""
        plain = replace(options, reply_mode="generate", generated_candidates=1,
                        return_candidates=False)
        if not options.sampling or options.generated_candidates == 1:
            return [plain]
        return [replace(plain, seed=None if options.seed is None else options.seed + i)
                for i in range(options.generated_candidates)]

    def retrieved(self, model: OnnxSeq2Seq, text: str, options: DecodingOptions, *,
                  ids: Sequence[int] | None = None) -> list[Candidate]:
        """The replies of the ``retrieval_candidates`` indexed questions closest to
        ``text`` that obey the request's rules (worker thread: BM25 and jieba take a
        fraction of a millisecond). ``ids``: ``text``'s whole token ids, when known (a
        source cut to its last tokens is not)."""
        if self.index is None:
            return []
        hits = [
            Candidate(text=hit.reply, token_ids=hit.reply_ids if hit.reply_ids is not None
                      else tuple(model.tokenizer.encode(hit.reply)),
                      source="retrieved", retrieval_score=hit.score)
            for hit in self.index.search(text, options.retrieval_candidates, ids=ids)
        ]
        # Each word is looked for once in all the replies: only a word found somewhere
        # is looked for in each (usually none of the 84 blocklisted words is found).
        replies = "\0".join(c.text.lower() for c in hits)
        words = (*_lowered(options.suppress_words),
                 *_lowered_blocklist(tuple(model.blocklist_words)))
        words = tuple(w for w in words if w in replies)
        return [c for c in hits if obeys(c, options, model, words)]

    def choose(self, model: OnnxSeq2Seq, message: str, candidates: Sequence[Candidate],
               scores: Sequence[PairScore], generated: Sequence[GenerationResult],
               options: DecodingOptions) -> GenerationResult:
        """The best candidate as a GenerationResult (the first proposal when no candidate
        may be said)."""
        scored = [with_scores(c, s) for c, s in zip(candidates, scores, strict=True)]
        ranked = rank(scored, self.weights)
        if not ranked:
            return generated[0]
        best = ranked[0]
        from_model = next((g for g in generated if g.text == best.text), None)
        return GenerationResult(
            text=best.text,
            token_ids=list(best.token_ids),
            score=best.score if options.return_scores else None,
            finish_reason=from_model.finish_reason if from_model else "stop",
            hypotheses=[(c.text, c.score if options.return_scores else None)
                        for c in ranked[: max(options.num_hypotheses, 1)]],
            source=best.source,
            candidates=ranked if options.return_candidates else [],
        )


def _lowered(words: Sequence[str]) -> tuple[str, ...]:
    return tuple(w.lower() for w in words if w)


@lru_cache(maxsize=4)
def _lowered_blocklist(words: tuple[str, ...]) -> tuple[str, ...]:
    """The model's blocklist lowered once, not per request (a model's is one tuple)."""
    return _lowered(words)


def obeys(candidate: Candidate, options: DecodingOptions, model: OnnxSeq2Seq,
          words: tuple[str, ...] | None = None) -> bool:
    """A retrieved reply keeps the rules a decoded one keeps: its length, no suppressed
    word, no <unk> if disabled, no repeated n-gram. ``words``: the suppressed and
    blocklisted words lowered, when the caller checks several candidates."""
    ids, text = candidate.token_ids, candidate.text.lower()
    if not options.min_length <= len(ids) <= options.max_length:
        return False
    if words is None:
        words = _lowered((*options.suppress_words, *model.blocklist_words))
    if any(w in text for w in words):
        return False
    if options.disable_unk and model.unk_id in ids:
        return False
    n = options.no_repeat_ngram_size
    grams = [ids[i:i + n] for i in range(len(ids) - n + 1)] if n > 0 else []
    return len(grams) == len(set(grams))


def generated_candidates(model: OnnxSeq2Seq, results: Sequence[GenerationResult]
                         ) -> list[Candidate]:
    """The model's proposals as candidates (a beam's whole n-best)."""
    out = []
    for result in results:
        texts = [t for t, _ in result.hypotheses] or [result.text]
        for i, text in enumerate(texts):
            ids = result.token_ids if i == 0 else model.tokenizer.encode(text)
            out.append(Candidate(text=text, token_ids=tuple(ids), source="generated"))
    return out


def with_scores(candidate: Candidate, score: PairScore) -> Candidate:
    return replace(candidate, forward=score.forward, reply_length=score.reply_length,
                   backward=score.backward or 0.0, message_length=score.message_length)


def score_pairs(sources: ReplySources, pairs: Sequence[IdPair]) -> list[PairScore]:
    """Scores of (message ids, reply ids) pairs in one call per graph (zeros where the
    folder has no scoring graphs: then only the retrieval term ranks)."""
    if sources.scorer is None:
        return [PairScore(0.0, len(r) + 1, None, len(m) + 1) for m, r in pairs]
    # A term with weight 0 cannot change the ranking: its graph need not run.
    return sources.scorer.score(pairs, forward=sources.weights.forward != 0)


def forward_token_log_probs(sources: ReplySources, message: Sequence[int],
                            replies: Sequence[Sequence[int]]) -> list[list[float]] | None:
    """Each reply's per-token forward log-probs (its ``</s>`` left out) from the scoring
    graph, one call for all; None when the folder has no scoring graph."""
    if sources.scorer is None:
        return None
    if not replies:
        return []
    src_ids, src_len = pad_id_rows([list(message)] * len(replies), pad_id=PAD_ID,
                                   empty_id=UNK_ID)
    tgt_ids, tgt_len = pad_id_rows([[*r, EOS_ID] for r in replies], pad_id=PAD_ID)
    feeds = {"src_ids": src_ids, "src_len": src_len, "tgt_ids": tgt_ids, "tgt_len": tgt_len}
    per_token = run_named(sources.scorer.forward, SCORE_OUTPUTS, feeds)[SCORE_OUTPUTS[0]]
    return [[float(v) for v in per_token[i, :len(r)]] for i, r in enumerate(replies)]


def gather_candidates(model: OnnxSeq2Seq, sources: ReplySources, text: str,
                      options: DecodingOptions
                      ) -> tuple[list[GenerationResult], list[Candidate], list[PairScore]]:
    """One request's proposals, usable candidates and their scores, without an engine:
    the proposals decoded one after another, the retrieved replies, one scoring call."""
    src = source_ids(model, text)
    generated = [generate(model, text, o) for o in sources.proposals(options)]
    whole = src if len(src) < MAX_SOURCE_LENGTH else None  # else it may have been cut
    retrieved = (sources.retrieved(model, text, options, ids=whole)
                 if sources.mode(options) == "hybrid" else [])
    candidates = usable([*retrieved, *generated_candidates(model, generated)], text)
    return generated, candidates, score_pairs(sources, [(src, c.token_ids)
                                                        for c in candidates])


def select_reply(model: OnnxSeq2Seq, sources: ReplySources, text: str,
                 options: DecodingOptions) -> GenerationResult:
    """One request's reply without an engine (``serve ask``, ``serve evaluate``)."""
    if not sources.needs_selection(options):
        return generate(model, text, options)
    generated, candidates, scores = gather_candidates(model, sources, text, options)
    return sources.choose(model, text, candidates, scores, generated, options)


def reply_deltas(model: OnnxSeq2Seq, text: str) -> list[str]:
    """A chosen reply's text in the pieces a decoded reply would stream in (the
    tokenizer's words or characters), so that it streams like one."""
    pieces = model.tokenizer.segment(text)
    deltas, last = [], ""
    for piece in pieces:
        delta = text_delta(last, piece)
        last = piece
        if delta:
            deltas.append(delta)
    return deltas
