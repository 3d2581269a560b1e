"""Corpus readers and cleaning: files of several formats -> clean (question, answer) pairs.

Formats (detected from the name and the first lines, or forced):

- ``conv``: xiaohuangji. ``E`` opens a session, ``M <utterance>`` lines follow; consecutive
  ``M`` lines make pairs. A line that is neither continues the previous utterance (the
  real file has multi-line answers).
- ``lccc``: a JSON list of dialogues, each a list of utterances whose characters are
  separated by spaces; consecutive utterances make pairs.
- ``cdial``: ``question<TAB>answer`` with characters separated by spaces.
- ``tsv``: plain ``question<TAB>answer``.

Cleaning runs on normalised text (``serve.runtime.tokenizer.normalize``: Traditional ->
Simplified, half-width, control characters removed) and counts what each rule dropped.
"""

from __future__ import annotations

import json
import logging
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from serve.runtime.blocklist import Blocklist  # noqa: F401 - one implementation, in serve
from serve.runtime.tokenizer import normalize

log = logging.getLogger("training")

FORMATS = ("conv", "lccc", "cdial", "tsv")
Pair = tuple[str, str]


class CorpusError(ValueError):
    """A corpus file is missing, malformed (the message names file and line) or empty."""


# -- readers ---------------------------------------------------------------------------


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            for number, line in enumerate(f, 1):
                yield number, line.rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_conv(path: Path) -> Iterator[Pair]:
    session: list[str] = []
    seen_marker = False

    def pairs() -> Iterator[Pair]:
        yield from zip(session, session[1:], strict=False)

    for number, line in _lines(path):
        if line == "E" or line.startswith("E "):
            yield from pairs()
            session, seen_marker = [], True
        elif line == "M" or line.startswith("M "):
            session.append(line[2:])
            seen_marker = True
        elif not line.strip():
            continue
        elif session:
            session[-1] += "\n" + line  # a multi-line utterance
        else:
            what = "a line" if seen_marker else "the first line"
            raise CorpusError(
                f"{path}:{number}: {what} of a .conv file must be 'E' or 'M <utterance>', "
                f"got {line[:40]!r}"
            )
    yield from pairs()


def _unspace(text: str) -> str:
    # LCCC/CDial separate every character by a space; real spaces are lost (see the README).
    return text.replace(" ", "")


def read_lccc(path: Path) -> Iterator[Pair]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise CorpusError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
    if not isinstance(data, list):
        raise CorpusError(f"{path}:1: an LCCC file is a JSON list of dialogues")
    for index, dialogue in enumerate(data):
        if not isinstance(dialogue, list) or not all(isinstance(u, str) for u in dialogue):
            raise CorpusError(
                f"{path}: dialogue {index + 1} is not a list of strings (LCCC format)"
            )
        utterances = [_unspace(u) for u in dialogue]
        yield from zip(utterances, utterances[1:], strict=False)


def _read_tab_pairs(path: Path, transform: Callable[[str], str]) -> Iterator[Pair]:
    for number, line in _lines(path):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            problem = "has no TAB" if len(parts) == 1 else f"has {len(parts) - 1} TABs"
            raise CorpusError(
                f"{path}:{number}: expected 'question<TAB>answer', the line {problem}"
            )
        yield transform(parts[0]), transform(parts[1])


def read_tsv(path: Path) -> Iterator[Pair]:
    return _read_tab_pairs(path, lambda text: text)


def read_cdial(path: Path) -> Iterator[Pair]:
    return _read_tab_pairs(path, _unspace)


READERS: dict[str, Callable[[Path], Iterator[Pair]]] = {
    "conv": read_conv,
    "lccc": read_lccc,
    "cdial": read_cdial,
    "tsv": read_tsv,
}

_SPACED = re.compile(r"^\S( \S)+$")  # "我 饿 了 。"


def detect_format(path: Path) -> str:
    """Guess the format from the extension and the first non-empty lines."""
    if path.suffix.lower() == ".conv":
        return "conv"
    if path.suffix.lower() == ".json":
        return "lccc"
    head: list[str] = []
    for _, line in _lines(path):
        if line.strip():
            head.append(line)
        if len(head) >= 20:
            break
    if not head:
        return "tsv"  # empty: cleaning reports it
    if head[0].lstrip().startswith("["):
        return "lccc"
    if head[0] in ("E", "M") or head[0].startswith(("E ", "M ")):
        return "conv"
    sides = [side for line in head if "\t" in line for side in line.split("\t")]
    long_sides = [s for s in sides if len(s) >= 3]
    if long_sides and sum(bool(_SPACED.match(s)) for s in long_sides) >= 0.8 * len(long_sides):
        return "cdial"
    return "tsv"


def read_corpus(path: Path, fmt: str | None = None) -> tuple[str, list[Pair]]:
    """(format, raw pairs) of one file; ``fmt`` forces the format."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"corpus file not found: {path}")
    if fmt is not None and fmt not in READERS:
        raise CorpusError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    fmt = fmt or detect_format(path)
    return fmt, list(READERS[fmt](path))


# -- cleaning --------------------------------------------------------------------------


def _garbled(text: str) -> bool:
    # U+FFFD (decoding damage), private-use, unassigned and surrogate code points.
    return any(
        ch == "\ufffd" or unicodedata.category(ch) in ("Co", "Cn", "Cs") for ch in text
    )


@dataclass
class CleaningReport:
    read: int = 0
    kept: int = 0
    renamed: int = 0  # pairs where a blocklist replacement applied (kept, not dropped)
    dropped: Counter = field(default_factory=Counter)

    def line(self) -> str:
        rules = ", ".join(f"{rule} {n}" for rule, n in self.dropped.items()) or "none"
        return (f"cleaning: {self.read} pairs read, {self.kept} kept; dropped: {rules}; "
                f"names replaced in {self.renamed}")

    def to_dict(self) -> dict:
        return {"read": self.read, "kept": self.kept, "renamed": self.renamed,
                **{rule: int(n) for rule, n in self.dropped.items()}}


RULES = ("empty", "garbled", "symbols_only", "blocklist", "generic_answer", "duplicate",
         "too_long", "frequent_answer")


def _symbols_only(text: str) -> bool:
    # "=。=", "==", "******": no letter and no digit. Such answers teach the bot to shrug.
    return not any(unicodedata.category(ch)[0] in "LN" for ch in text)


def answer_entropies(pairs: list[Pair]) -> dict[str, float]:
    """For each answer, the entropy in bits of the distribution of the questions it answers.

    H(a) = -sum_q p(q|a) log2 p(q|a), p(q|a) = count(q, a) / count(a), over the pairs as
    given (normalised texts, repeated pairs counted as often as they occur), as Csáky et
    al. 2019 ("Improving neural conversational models with entropy-based data filtering",
    target side, identity clustering). An answer that follows many different questions
    ("我也是") has a high entropy: it is a stock reply, not an answer to anything.
    """
    by_answer: dict[str, Counter] = {}
    for q, a in pairs:
        by_answer.setdefault(a, Counter())[q] += 1
    entropies = {}
    for a, questions in by_answer.items():
        total = sum(questions.values())
        entropies[a] = -sum(n / total * math.log2(n / total) for n in questions.values()) + 0.0
    return entropies


def _screen(pairs: list[Pair], blocklist: Blocklist | None,
            report: CleaningReport) -> list[Pair]:
    """The rules that judge one pair alone: normalised pairs that pass empty, garbled,
    symbols_only and blocklist (with name replacement)."""
    kept: list[Pair] = []
    for question, answer in pairs:
        q, a = normalize(question), normalize(answer)
        if not q or not a:
            report.dropped["empty"] += 1
            continue
        if _garbled(q) or _garbled(a):
            report.dropped["garbled"] += 1
            continue
        if _symbols_only(a):
            report.dropped["symbols_only"] += 1
            continue
        if blocklist is not None:
            q2, a2 = blocklist.replace(q), blocklist.replace(a)
            report.renamed += (q2, a2) != (q, a)
            q, a = q2, a2
            if blocklist.blocks(q) or blocklist.blocks(a):
                report.dropped["blocklist"] += 1
                continue
        kept.append((q, a))
    return kept


def _drop_generic(pairs: list[Pair], max_entropy: float, report: CleaningReport) -> list[Pair]:
    entropies = answer_entropies(pairs)
    generic = {a for a, h in entropies.items() if h > max_entropy}
    kept = [(q, a) for q, a in pairs if a not in generic]
    report.dropped["generic_answer"] += len(pairs) - len(kept)
    worst = sorted(generic, key=lambda a: -entropies[a])[:5]
    log.info("generic answers (entropy > %g bits): %d, dropping %d pairs; highest: %s",
             max_entropy, len(generic), len(pairs) - len(kept),
             ", ".join(f"{a} {entropies[a]:.1f}" for a in worst) or "none")
    return kept


def _dedupe_segment_cap(pairs: list[Pair], segment: Callable[[str], list[str]], *,
                        max_src_len: int, max_tgt_len: int, max_answer_repeats: int,
                        report: CleaningReport):
    """duplicate, too_long (in tokens of ``segment``) and the frequent_answer cap."""
    seen: set[Pair] = set()
    answer_counts: Counter = Counter()
    segmented: list[tuple[list[str], list[str]]] = []
    texts: list[Pair] = []
    for q, a in pairs:
        if (q, a) in seen:
            report.dropped["duplicate"] += 1
            continue
        seen.add((q, a))
        q_words, a_words = segment(q), segment(a)
        if not q_words or not a_words:
            report.dropped["empty"] += 1
            continue
        if len(q_words) > max_src_len or len(a_words) > max_tgt_len:
            report.dropped["too_long"] += 1
            continue
        if max_answer_repeats and answer_counts[a] >= max_answer_repeats:
            report.dropped["frequent_answer"] += 1
            continue
        answer_counts[a] += 1
        segmented.append((q_words, a_words))
        texts.append((q, a))
    return segmented, texts


def clean_pairs(
    pairs: list[Pair],
    segment: Callable[[str], list[str]],
    *,
    max_src_len: int,
    max_tgt_len: int,
    blocklist: Blocklist | None = None,
    max_answer_repeats: int = 0,
    max_answer_entropy: float = 0.0,
) -> tuple[list[tuple[list[str], list[str]]], list[Pair], CleaningReport]:
    """Normalise and filter pairs; return (segmented pairs, normalised text pairs, report).

    Rules, in order: ``empty`` (a side is empty once normalised: control characters and
    whitespace only), ``garbled`` (decoding damage), ``symbols_only`` (an answer with no
    letter or digit), ``blocklist`` (a blocked term on either side, after name replacement),
    ``generic_answer`` (with ``max_answer_entropy`` > 0: every pair whose answer's entropy,
    see ``answer_entropies``, is above it), ``duplicate`` (the same normalised pair seen
    before), ``too_long`` (more tokens than max_src_len / max_tgt_len), ``frequent_answer``
    (an answer already kept ``max_answer_repeats`` times; 0 = no cap).

    The entropy rule runs on all the pairs the per-pair rules kept, repeats included and
    before the cap: the cap keeps a few copies of every answer and so would hide which
    answers follow everything. Both cure stock replies on the data side: without them a
    few answers ("哈哈", "是的", "我也是") dominate what the model learns.
    """
    report = CleaningReport(read=len(pairs), dropped=Counter({rule: 0 for rule in RULES}))
    screened = _screen(pairs, blocklist, report)
    if max_answer_entropy > 0:
        screened = _drop_generic(screened, max_answer_entropy, report)
    segmented, texts = _dedupe_segment_cap(
        screened, segment, max_src_len=max_src_len, max_tgt_len=max_tgt_len,
        max_answer_repeats=max_answer_repeats, report=report)
    report.kept = len(texts)
    return segmented, texts, report
