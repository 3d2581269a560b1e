"""The one tokenizer of xiaoX: training, export and serving all import it from here.

Pipeline: ``normalize`` (Traditional -> Simplified, full-width -> half-width, whitespace)
-> tokens (jieba words, or with the ``char`` segmenter one token a character, a run of
ASCII letters and digits staying one token) -> ids through a ``Vocab``. A word missing
from the vocabulary falls back to its characters, and a character missing too becomes
``<unk>`` (the original dropped unknown words silently, which taught the model replies to
questions nobody asked).
"""

from __future__ import annotations

import re
import threading
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)

VOCAB_FILE = "vocab.txt"

_WHITESPACE = re.compile(r"\s+")
# A space survives normalisation only between two ASCII letters or digits ("hello world",
# "iPhone 12"); between CJK characters it is noise (LCCC separates every character).
_SPACE_TO_DROP = re.compile(r"(?<![A-Za-z0-9]) | (?![A-Za-z0-9])")
# The "char" segmenter: an ASCII letter/digit run ("iPhone", "12") or any one other
# non-space character. Whitespace is dropped; ``detokenize`` puts the one space back.
_CHAR_TOKEN = re.compile(r"[A-Za-z0-9]+|\S")
SEGMENTERS = ("jieba", "char")


def _is_word_char(ch: str) -> bool:
    return ch.isascii() and ch.isalnum()


@lru_cache(maxsize=1)
def _t2s():
    import opencc  # imported lazily: loading its dictionaries takes a moment

    return opencc.OpenCC("t2s")


def _to_half_width(text: str) -> str:
    # Full-width ASCII letters, digits and the ideographic space become half-width;
    # Chinese punctuation (，。！？) is left alone: it is the punctuation of the language.
    out = []
    for ch in text:
        code = ord(ch)
        if ch == "\u3000":
            out.append(" ")
        elif 0xFF10 <= code <= 0xFF19 or 0xFF21 <= code <= 0xFF3A or 0xFF41 <= code <= 0xFF5A:
            out.append(chr(code - 0xFEE0))
        else:
            out.append(ch)
    return "".join(out)


def normalize(text: str) -> str:
    """Canonical form of a message: what the model sees and what round-trips exactly.

    Traditional characters become Simplified, full-width letters and digits half-width,
    control characters are removed, and runs of whitespace shrink to one space that is
    kept only between two ASCII letters or digits.
    """
    text = _to_half_width(text)
    text = "".join(
        " " if ch.isspace() else ch
        for ch in text
        if ch.isspace() or unicodedata.category(ch) not in ("Cc", "Cf") or ch == "\u200d"
    )
    text = _WHITESPACE.sub(" ", text).strip()
    text = _SPACE_TO_DROP.sub("", text)
    return _t2s().convert(text) if text else text


@dataclass(frozen=True)
class TokenizerSettings:
    """What the manifest records so that serving tokenizes exactly as training did."""

    normalization: str = "opencc-t2s+halfwidth+whitespace"
    segmenter: str = "jieba"  # or "char" (see SEGMENTERS)
    char_fallback: bool = True
    lowercase: bool = False

    def __post_init__(self) -> None:
        # A manifest asking for a segmenter we do not have must fail loudly, not tokenize
        # differently from training.
        if self.segmenter not in SEGMENTERS:
            raise ValueError(f"unknown segmenter {self.segmenter!r}; "
                             f"known: {', '.join(SEGMENTERS)}")

    def to_dict(self) -> dict:
        return asdict(self)


class Vocab:
    """Tokens and their ids. Ids 0-3 are ``<pad> <unk> <s> </s>``; the file is one token a line."""

    def __init__(self, tokens: Sequence[str]):
        if tuple(tokens[:4]) != SPECIAL_TOKENS:
            raise ValueError(f"a vocabulary must start with {SPECIAL_TOKENS}")
        self.tokens: list[str] = list(tokens)
        self._ids = {token: i for i, token in enumerate(self.tokens)}
        if len(self._ids) != len(self.tokens):
            raise ValueError("a vocabulary must not repeat a token")

    @classmethod
    def build(
        cls,
        segmented: Iterable[Sequence[str]],
        *,
        min_freq: int = 2,
        max_size: int = 20000,
        char_fallback: bool = True,
    ) -> Vocab:
        """Count words over segmented texts; keep those seen ``min_freq`` times, most frequent
        first, up to ``max_size`` entries in all (special tokens included).

        With ``char_fallback`` the characters of every word are counted too, so a rare word
        can still be spelled out of known characters instead of becoming ``<unk>``.
        """
        if min_freq < 1 or max_size <= len(SPECIAL_TOKENS):
            raise ValueError("min_freq must be >= 1 and max_size > 4")
        words: Counter[str] = Counter()
        chars: Counter[str] = Counter()
        for tokens in segmented:
            words.update(tokens)
            if char_fallback:
                for token in tokens:
                    if len(token) > 1:
                        chars.update(token)
        counts = words + chars if char_fallback else words
        kept = [
            token
            for token, n in sorted(counts.items(), key=lambda item: (-item[1], item[0]))
            if n >= min_freq and token not in SPECIAL_TOKENS and not token.isspace()
        ]
        return cls(list(SPECIAL_TOKENS) + kept[: max_size - len(SPECIAL_TOKENS)])

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        path = Path(path)
        if path.is_dir():
            path = path / VOCAB_FILE
        lines = path.read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        return cls(lines)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir():
            path = path / VOCAB_FILE
        path.write_text("\n".join(self.tokens) + "\n", encoding="utf-8")
        return path

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self._ids

    def id(self, token: str) -> int:
        return self._ids.get(token, UNK_ID)

    def token(self, token_id: int) -> str:
        return self.tokens[token_id]


class Tokenizer:
    """Text <-> ids. ``decode(encode(text)) == normalize(text)`` whenever no word is unknown."""

    def __init__(self, vocab: Vocab, settings: TokenizerSettings | None = None):
        self.vocab = vocab
        self.settings = settings or TokenizerSettings()
        self._jieba_lock = threading.Lock()

    @classmethod
    def from_dir(cls, model_dir: str | Path, settings: dict | None = None) -> Tokenizer:
        return cls(Vocab.load(Path(model_dir) / VOCAB_FILE), TokenizerSettings(**(settings or {})))

    def segment(self, text: str) -> list[str]:
        """Normalised tokens (jieba words or characters), whitespace dropped (``detokenize``
        puts it back)."""
        text = normalize(text)
        if self.settings.lowercase:
            text = text.lower()
        if not text:
            return []
        if self.settings.segmenter == "char":
            return _CHAR_TOKEN.findall(text)
        with self._jieba_lock:  # jieba's lazy initialisation is not thread-safe
            words = _jieba().lcut(text, HMM=True)
        return [w for w in words if not w.isspace()]

    def tokens_to_ids(self, words: Sequence[str]) -> list[int]:
        ids: list[int] = []
        for word in words:
            if word in self.vocab:
                ids.append(self.vocab.id(word))
            elif self.settings.char_fallback:
                ids.extend(self.vocab.id(ch) for ch in word)
            else:
                ids.append(UNK_ID)
        return ids

    def encode(self, text: str, *, add_eos: bool = False) -> list[int]:
        ids = self.tokens_to_ids(self.segment(text))
        return ids + [EOS_ID] if add_eos else ids

    def id_to_piece(self, token_id: int) -> str:
        return self.vocab.token(token_id)

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        """Join pieces: CJK with no space, a single space between two Latin words."""
        pieces = []
        for token_id in ids:
            token_id = int(token_id)
            if token_id == EOS_ID and skip_special:
                break
            if skip_special and token_id in (PAD_ID, BOS_ID):
                continue
            pieces.append(self.vocab.token(token_id))
        return detokenize(pieces)


def detokenize(pieces: Sequence[str]) -> str:
    out: list[str] = []
    for piece in pieces:
        if out and out[-1] and piece and _is_word_char(out[-1][-1]) and _is_word_char(piece[0]):
            out.append(" ")
        out.append(piece)
    return "".join(out)


@lru_cache(maxsize=1)
def _jieba():
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)
    tokenizer = jieba.Tokenizer()
    from serve.runtime.jieba_dict import load

    # jieba's own dictionary, as a compact memory-mapped stand-in for its 70 MB dict
    # (the same answers: the same segmentation the model was trained with).
    compact = load(Path(jieba.__file__).parent / "dict.txt")
    if compact is None:
        tokenizer.initialize()
    else:
        tokenizer.FREQ, tokenizer.total = compact, compact.total
        tokenizer.initialized = True
    return tokenizer
