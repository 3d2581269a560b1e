"""Choosing a reply among candidates: retrieved replies and the model's own, reranked.

Every candidate reply ``r`` to a message ``m`` gets one score::

    score(r) = w_forward  * log p_fwd(r | m) / |r|
             + w_backward * log p_bwd(m | r) / |m|
             + w_retrieval * bm25(r) / max bm25 over the message's retrieved replies

``|r|`` counts the reply's tokens and its ``</s>``; ``|m|`` the message's tokens and its
``</s>``. The forward term is how well the reply follows the message; the backward one
(MMI-bidi, Li et al. 2016) how well the message can be told back from the reply, which
is what a stock reply ("我也是") lacks; the retrieval term is how close the question the
reply once answered is to this message (0 for generated replies). The weights are chosen
on the validation split (``serve.runtime.tuning``), never on the test split, and travel
in the manifest.

Before scoring, candidates that must never be said are dropped: empty ones, over-long
ones, echoes of the message, and duplicates (the retrieved copy is kept).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

from serve.runtime.tokenizer import normalize

MAX_REPLY_CHARS = 60  # a chat reply, not a story: the corpora's long jokes read badly


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """One possible reply and what is known of it (the scores are filled by scoring)."""

    text: str
    token_ids: tuple[int, ...]
    source: str  # "retrieved" or "generated"
    retrieval_score: float = 0.0  # BM25 of the question it answered (retrieved only)
    forward: float = 0.0  # sum of log p(reply tokens and </s> | message)
    reply_length: int = 1  # tokens of the reply plus its </s>
    backward: float = 0.0  # sum of log p(message tokens and </s> | reply)
    message_length: int = 1
    score: float | None = None  # the formula's value, once ranked

    def features(self, top_retrieval: float) -> tuple[float, float, float]:
        """(forward per token, backward per token, relative retrieval score)."""
        retrieval = self.retrieval_score / top_retrieval if top_retrieval > 0 else 0.0
        return (
            self.forward / max(self.reply_length, 1),
            self.backward / max(self.message_length, 1),
            retrieval,
        )

    def to_dict(self) -> dict:
        out = asdict(self)
        out["token_ids"] = list(self.token_ids)
        return out


@dataclass(frozen=True, kw_only=True)
class SelectionWeights:
    """The formula's weights (module docstring). The defaults are a neutral start; the
    weights a model folder serves with are the tuned ones in its manifest."""

    forward: float = 1.0
    backward: float = 1.0
    retrieval: float = 1.0
    chosen_on: str = "defaults"  # where the weights come from (e.g. "valid.tsv, 500 pairs")
    objective: dict = field(default_factory=dict)  # what tuning reached, for the record

    def score(self, features: tuple[float, float, float]) -> float:
        f, b, r = features
        return self.forward * f + self.backward * b + self.retrieval * r

    @classmethod
    def from_dict(cls, data: dict | None) -> SelectionWeights:
        if not data:
            return cls()
        known = {"forward", "backward", "retrieval", "chosen_on", "objective"}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)


def usable(candidates: Sequence[Candidate], message: str) -> list[Candidate]:
    """The candidates that may be said: not empty, not over MAX_REPLY_CHARS, no echo of
    the message, one of each text (the retrieved copy first: it has a retrieval score)."""
    said = normalize(message)
    kept: dict[str, Candidate] = {}
    for candidate in sorted(candidates, key=lambda c: c.source != "retrieved"):
        text = normalize(candidate.text)
        if not text or len(text) > MAX_REPLY_CHARS or not candidate.token_ids:
            continue
        if said and (text == said or (len(said) >= 4 and said in text)):
            continue
        if text not in kept:
            kept[text] = candidate
    return list(kept.values())


def rank(candidates: Sequence[Candidate], weights: SelectionWeights) -> list[Candidate]:
    """The candidates with their scores, best first (ties: retrieved first, then by text,
    so that the order never depends on the order the candidates arrived in)."""
    top = max((c.retrieval_score for c in candidates if c.source == "retrieved"), default=0.0)
    scored = [replace(c, score=weights.score(c.features(top))) for c in candidates]
    return sorted(scored, key=lambda c: (-c.score, c.source != "retrieved", c.text))
