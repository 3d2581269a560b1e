"""The reply index: BM25 over the questions 小X was trained on, returning their replies.

``python -m export`` builds it (export/reply_index.py) from the checkpoint's ``train.tsv``,
filtered (no names, URLs, blocklisted words, long jokes...), into the model folder:

```
index/           bm25s's own files (data/indices/indptr .npy, vocab and params .json)
index/pairs.json [[question, reply], ...]: document i of the BM25 index is pair i
index/reply_ids.npy, reply_ends.npy  every reply's token ids (int32, one array) and
                 where each ends: a retrieved reply is not tokenized again per request
```

Questions are tokenized with the model's own tokenizer (jieba words, character fallback),
so a message and an indexed question are split the same way. Ranking is bm25s's (numpy
only); nothing here imports TensorFlow.

    index = ReplyIndex.load(model_dir)          # None when the folder has no index
    index.search("今天好冷", k=5)               # [Retrieved(question, reply, score), ...]
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serve.runtime.manifest import INDEX_DIR, Manifest, ModelError
from serve.runtime.tokenizer import UNK_ID, Tokenizer

PAIRS_FILE = "pairs.json"
REPLY_IDS_FILE, REPLY_ENDS_FILE = "reply_ids.npy", "reply_ends.npy"


@dataclass(frozen=True)
class Retrieved:
    question: str  # the indexed question that matched
    reply: str  # its reply, as indexed (normalised, the old bots' names made 小X)
    score: float  # BM25 score of the question for the message (higher is closer)
    reply_ids: tuple[int, ...] | None = None  # its token ids, when the index stores them


def index_tokens(tokenizer: Tokenizer, text: str) -> list[str]:
    """The terms BM25 sees: the model's token pieces, without ``<unk>`` and without pure
    punctuation (a "?" would match every question). One function for build and query."""
    pieces = (tokenizer.id_to_piece(i) for i in tokenizer.encode(text) if i != UNK_ID)
    return [p for p in pieces if _is_term(p)]


def _is_term(piece: str) -> bool:
    return any(ch.isalnum() for ch in piece)


class PairStore:
    """The indexed (question, reply) pairs, compact: their UTF-8 text in one bytes object
    and its offsets, not 130k Python strings (30 MB per process for the shipped index).
    Read from ``pairs.json`` one pair at a time, so the whole list never exists."""

    def __init__(self, text: str):
        decoder, chunks, ends, at = json.JSONDecoder(), [], [0], _skip(text, 0)
        if text[at : at + 1] != "[":
            raise ValueError("pairs.json is not a JSON array")
        at = _skip(text, at + 1)
        while text[at : at + 1] != "]":
            pair, at = decoder.raw_decode(text, at)
            if not (isinstance(pair, list) and len(pair) == 2
                    and all(isinstance(x, str) for x in pair)):
                raise ValueError(f"pair {len(ends) // 2}: not [question, reply]")
            for part in pair:
                chunks.append(part.encode("utf-8"))
                ends.append(ends[-1] + len(chunks[-1]))
            at = _skip(text, at)
            if text[at : at + 1] == ",":
                at = _skip(text, at + 1)
            elif text[at : at + 1] != "]":
                raise ValueError(f"pairs.json: ',' or ']' expected at {at}")
        self._text = b"".join(chunks)
        self._ends = np.array(ends, np.int64)

    def __len__(self) -> int:
        return (len(self._ends) - 1) // 2

    def __getitem__(self, i: int) -> tuple[str, str]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        a, b, c = (int(x) for x in self._ends[2 * i : 2 * i + 3])
        return self._text[a:b].decode("utf-8"), self._text[b:c].decode("utf-8")


def reply_id_arrays(tokenizer: Tokenizer, pairs) -> tuple[np.ndarray, np.ndarray]:
    """Every reply's token ids in one int32 array, and where each ends (reply i is
    ``ids[ends[i]:ends[i + 1]]``): what export stores beside pairs.json."""
    ids = [tokenizer.encode(reply) for _, reply in pairs]
    ends = np.zeros(len(ids) + 1, np.int64)
    np.cumsum([len(x) for x in ids], out=ends[1:])
    flat = np.fromiter((t for x in ids for t in x), np.int32, count=int(ends[-1]))
    return flat, ends


def _skip(text: str, at: int) -> int:
    while at < len(text) and text[at] in " \t\r\n":
        at += 1
    return at


class ReplyIndex:
    """A loaded reply index. ``search`` is thread-safe: bm25s scoring only reads its arrays
    and the tokenizer serialises jieba."""

    def __init__(self, retriever, pairs: PairStore | list[tuple[str, str]],
                 tokenizer: Tokenizer,
                 reply_ids: tuple[np.ndarray, np.ndarray] | None = None):
        self._retriever = retriever
        self._pairs = pairs
        self._tokenizer = tokenizer
        self._terms = retriever.vocab_dict
        # Each token id's BM25 term id, -1 for none (<unk>, punctuation, not indexed):
        # ``index_tokens`` and the term lookup once per vocabulary entry, not per message.
        self._term_of = [self._terms.get(piece, -1) if i != UNK_ID and _is_term(piece)
                         else -1 for i, piece in enumerate(tokenizer.vocab.tokens)]
        # (ids, ends) as plain arrays over the memory map: a memmap's slices are objects
        # of their own, each with a finaliser, a cost per retrieved reply.
        self._reply_ids = None if reply_ids is None else tuple(np.asarray(a) for a in reply_ids)

    def __len__(self) -> int:
        return len(self._pairs)

    @classmethod
    def load(cls, model_dir: str | Path, tokenizer: Tokenizer | None = None) -> ReplyIndex | None:
        """The folder's index, or None when it has none. ``tokenizer``: the model's (read
        from the folder's vocab.txt and manifest when not given). Files are not re-hashed
        here: loading the model folder verifies every sha256 of the manifest, index included.
        """
        model_dir = Path(model_dir)
        index_dir = model_dir / INDEX_DIR
        if not (index_dir / PAIRS_FILE).is_file():
            return None
        import bm25s  # imported on demand: a folder without an index never pays for it

        if tokenizer is None:
            tokenizer = Tokenizer.from_dir(model_dir, Manifest.read(model_dir).tokenizer)
        logging.getLogger("bm25s").setLevel(logging.WARNING)
        try:
            # backend numpy: numba, when installed, would compile on load (slow cold start)
            retriever = bm25s.BM25.load(index_dir, show_progress=False, backend="numpy")
            pairs = PairStore((index_dir / PAIRS_FILE).read_text("utf-8"))
            reply_ids = _load_reply_ids(index_dir)
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"{index_dir}: unreadable reply index ({e})") from e
        if len(pairs) != int(retriever.scores["num_docs"]):
            raise ModelError(
                f"{index_dir}: {len(pairs)} pairs for {retriever.scores['num_docs']} documents"
            )
        if reply_ids is not None and len(reply_ids[1]) != len(pairs) + 1:
            raise ModelError(f"{index_dir}: {len(reply_ids[1]) - 1} stored replies' token "
                             f"ids for {len(pairs)} pairs")
        return cls(retriever, pairs, tokenizer, reply_ids)

    def search(self, text: str, k: int = 5, *, ids: Sequence[int] | None = None
               ) -> list[Retrieved]:
        """The replies of the (at most ``k``) questions closest to ``text``, best first;
        only questions sharing a term with it (none for a message of unknown words).
        ``ids``: ``text``'s token ids (the tokenizer's ``encode``, whole), when the caller
        has them: the message is then not tokenized again."""
        term_of = self._term_of
        if ids is None:
            ids = self._tokenizer.encode(text)
        terms = [t for t in (term_of[i] for i in ids) if t >= 0]
        k = min(k, len(self._pairs))
        if not terms or k < 1:
            return []
        scores = self._retriever.get_scores(terms)  # bm25s's sums, term by term
        head = self._head(scores, k)
        head = head[np.lexsort((head, -scores[head]))]  # best first, ties by index
        return [Retrieved(*self._pairs[doc], float(scores[doc]), ids)
                for doc, ids in zip(head.tolist(), self._ids_of(head), strict=True)]

    @staticmethod
    def _head(scores: np.ndarray, k: int) -> np.ndarray:
        """The documents of the ``k`` best positive scores, a tie at the k-th place kept
        by the lower document index (the same on every machine: numpy's partition picks
        among the tied by the whole array and its SIMD code path). Only the questions
        sharing a term with the message score above 0, a few thousand of 66k."""
        docs = np.flatnonzero(scores > 0)
        if len(docs) <= k:
            return docs
        kept = scores[docs]
        kth = _kth_largest(kept, k)
        above = kept > kth
        tied = np.flatnonzero(kept == kth)[: k - np.count_nonzero(above)]  # docs ascend
        return np.concatenate([docs[above], docs[tied]])

    def _ids_of(self, docs: np.ndarray) -> list[tuple[int, ...] | None]:
        if self._reply_ids is None:
            return [None] * len(docs)
        ids, ends = self._reply_ids
        return [tuple(ids[a:b].tolist())
                for a, b in zip(ends[docs].tolist(), ends[docs + 1].tolist(), strict=True)]


def _kth_largest(values: np.ndarray, k: int) -> float:
    """The k-th largest of ``values`` (k <= len). A strided sample's k-th largest is a
    lower bound: partitioning only what reaches it is cheaper than all (numpy partitions
    19k scores in 200 us)."""
    if len(values) > 4096:
        sample = values[:: len(values) // 2048]
        values = values[values >= np.partition(sample, len(sample) - k)[len(sample) - k]]
    return float(np.partition(values, len(values) - k)[len(values) - k])


def _load_reply_ids(index_dir: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The stored replies' token ids (memory-mapped), or None for a folder without them."""
    if not (index_dir / REPLY_IDS_FILE).is_file():
        return None
    ids = np.load(index_dir / REPLY_IDS_FILE, mmap_mode="r")
    ends = np.load(index_dir / REPLY_ENDS_FILE, mmap_mode="r")
    if ids.dtype != np.int32 or ends.dtype != np.int64 or ends.ndim != 1 or \
            len(ends) == 0 or int(ends[-1]) != len(ids):
        raise ValueError("reply_ids.npy and reply_ends.npy do not fit together")
    return ids, ends
