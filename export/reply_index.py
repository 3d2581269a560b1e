"""Build the reply index (serve.runtime.retrieval) from a checkpoint's ``train.tsv``.

Only the pairs the model was trained on are indexed: never ``valid.tsv`` nor ``test.tsv``
(a pair of theirs found in train.tsv is dropped too), so evaluating on them stays honest.
Replies are filtered first, each filter counted in the manifest: the raw corpora's replies
carry people's names, the old bots' names, links and long jokes that 小X must not repeat.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from serve.runtime.blocklist import Blocklist
from serve.runtime.retrieval import (
    PAIRS_FILE,
    REPLY_ENDS_FILE,
    REPLY_IDS_FILE,
    index_tokens,
    reply_id_arrays,
)
from serve.runtime.tokenizer import Tokenizer, normalize

TRAIN_FILE = "train.tsv"  # question<TAB>answer: the pairs training learned from
HELD_OUT_FILES = ("valid.tsv", "test.tsv")
MAX_REPLY_CHARS = 60  # longer replies are jokes and copy-pasted stories, not chat
BM25_K1, BM25_B = 1.5, 0.75  # bm25s's defaults (Lucene's BM25)
BOT_NAME = "小X"
# How the xiaohuangji corpus's bot calls itself (XHJ_5w.txt: 小通 1,546 lines, simsimi 70
# (SimSimi, the Korean bot 小黄鸡 localised), 小黄鸭 63, 黄小通; 小黄鸡 is its public name).
# Longest first; 大小通吃 is an idiom, not a name. 鸡鸡 and 黄鸡 are left to the blocklist,
# which drops them (they are insults there too). 小鸡 is not there (and 小鸡炖蘑菇 is a dish).
_BOT_NAMES = re.compile(r"黄小通|小黄鸡|小黄鸭|(?<!大)小通|simsimi", re.IGNORECASE)
_URL = re.compile(r"https?://|www\.|\b[a-z0-9-]+\.(?:com|cn|net|org|cc|me)\b", re.IGNORECASE)
# "@小通", "@you"; not the emoticon "@_@"
_MENTION = re.compile(r"@[A-Za-z0-9\u4e00-\u9fff]")
# In the order they apply: a pair is counted by the first filter that drops it.
FILTERS = (
    "empty",
    "held_out",
    "too_long",
    "symbols_only",
    "echo",
    "url_or_mention",
    "blocklist",
    "duplicate",
    "person_name",
    "no_terms",
)

log = logging.getLogger("export")


def rename_bots(text: str) -> str:
    """The old bots' names -> 小X (小通在此 -> 小X在此)."""
    return _BOT_NAMES.sub(BOT_NAME, text)


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """question<TAB>answer lines; a line without a tab is read as an empty pair."""
    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        question, _, answer = line.partition("\t")
        pairs.append((question, answer))
    return pairs


# The commonest Chinese surnames (and the double ones of the corpora's jokes).
_SURNAMES = set(
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜"
    "叶程苏魏吕丁任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯龙史陶"
    "黎贺顾毛郝龚邵万钱严覃武戴莫孔向汤阮易倪殷毕常乐傅齐康伍俞萧祁舒葛庞纪柳温庄牛聂欧柴鲁"
)
_RARE_IN_DICTIONARY = 100  # jieba dictionary frequency under which an nr word is a name


def _person_name_checker():
    """A test for people's names in a reply, from jieba's part-of-speech tagger.

    jieba tags many everyday words nr (谢谢, 老公, 宝贝, 明白: 11% of the corpora's replies
    would go), so a word tagged nr/nrt/nrfg counts as a name only when it has 2-4
    characters and either starts with a common surname while rare in (or absent from)
    jieba's dictionary (许兵, 周杰伦; not 祝福), or is absent from it with 3 characters or
    more (found by its HMM: the raw chats' people, 阮德培; a 2-character HMM word is as
    often 别太 or 真香). A heuristic: it still drops a few nicknames (毛毛, 恩恩).
    """
    import jieba
    import jieba.posseg

    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()
    frequency = jieba.dt.FREQ  # the dictionary jieba.posseg segments with

    def is_name(word: str, flag: str) -> bool:
        if not flag.startswith("nr") or not 2 <= len(word) <= 4 or word == BOT_NAME:
            return False
        if word.isascii():
            return False
        count = frequency.get(word) or 0
        if word[0] in _SURNAMES and count < _RARE_IN_DICTIONARY:
            return True
        return count == 0 and len(word) >= 3

    return lambda text: any(is_name(w, f) for w, f in jieba.posseg.lcut(text))


def _cheap_filter(question: str, reply: str, held_out: set, blocklist: Blocklist | None) -> str:
    """The first filter (not needing the tagger) that drops a normalised pair, or ''."""
    if not question or not reply:
        return "empty"
    if (question, reply) in held_out:
        return "held_out"
    if len(reply) > MAX_REPLY_CHARS:
        return "too_long"
    if not any(ch.isalnum() for ch in reply):  # isalnum: letters, digits and CJK
        return "symbols_only"
    if reply == question:
        return "echo"
    if _URL.search(reply) or _MENTION.search(reply):
        return "url_or_mention"
    if blocklist is not None and blocklist.blocks(reply):
        return "blocklist"
    return ""


def _canonical(text: str, blocklist: Blocklist | None) -> str:
    text = rename_bots(normalize(text))
    return blocklist.replace(text) if blocklist is not None else text


def filter_pairs(
    pairs: Iterable[tuple[str, str]],
    tokenizer: Tokenizer,
    *,
    blocklist: Blocklist | None = None,
    held_out: Iterable[tuple[str, str]] = (),
) -> tuple[list[tuple[str, str]], list[list[str]], dict[str, Any]]:
    """(kept pairs, their questions' BM25 terms, report). Both sides are normalised and the
    old bots' names become 小X before any filter looks at them."""
    held = {(_canonical(q, blocklist), _canonical(a, blocklist)) for q, a in held_out}
    dropped: Counter = Counter({name: 0 for name in FILTERS})
    seen: set[tuple[str, str]] = set()
    has_name = _person_name_checker()
    kept, terms, read, renamed = [], [], 0, 0
    for raw_q, raw_a in pairs:
        read += 1
        q, a = _canonical(raw_q, blocklist), _canonical(raw_a, blocklist)
        renamed += a != normalize(raw_a)
        reason = _cheap_filter(q, a, held, blocklist)
        if not reason and (q, a) in seen:
            reason = "duplicate"
        seen.add((q, a))
        if not reason and has_name(a):
            reason = "person_name"
        question_terms = index_tokens(tokenizer, q) if not reason else []
        if not reason and not question_terms:
            reason = "no_terms"  # a question BM25 could never match
        if reason:
            dropped[reason] += 1
            continue
        kept.append((q, a))
        terms.append(question_terms)
    report = {"read": read, "renamed": renamed, "dropped": dict(dropped), "indexed": len(kept)}
    return kept, terms, report


def write_index(
    index_dir: Path, pairs: Sequence[tuple[str, str]], terms: Sequence[Sequence[str]],
    tokenizer: Tokenizer,
) -> None:
    """bm25s's files, pairs.json (document i = pair i) and every reply's token ids
    (reply_ids.npy, reply_ends.npy) into ``index_dir``."""
    import bm25s

    if not pairs:
        raise ValueError("nothing to index: every pair was filtered out")
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    retriever = bm25s.BM25(k1=BM25_K1, b=BM25_B, backend="numpy")
    retriever.index([list(t) for t in terms], show_progress=False)
    index_dir.mkdir(parents=True, exist_ok=True)
    retriever.save(index_dir, show_progress=False)
    text = json.dumps([list(p) for p in pairs], ensure_ascii=False, separators=(",", ":"))
    (index_dir / PAIRS_FILE).write_text(text, encoding="utf-8")
    ids, ends = reply_id_arrays(tokenizer, pairs)
    np.save(index_dir / REPLY_IDS_FILE, ids)
    np.save(index_dir / REPLY_ENDS_FILE, ends)


def build_reply_index(
    source: Path,
    index_dir: Path,
    tokenizer: Tokenizer,
    *,
    blocklist: Blocklist | None = None,
) -> dict[str, Any]:
    """Index ``source`` (a checkpoint's train.tsv) minus the pairs of the held-out files
    beside it; return the manifest's ``retrieval`` record."""
    import bm25s

    held_out = [
        p
        for name in HELD_OUT_FILES
        if (source.parent / name).is_file()
        for p in read_pairs(source.parent / name)
    ]
    kept, terms, report = filter_pairs(
        read_pairs(source), tokenizer, blocklist=blocklist, held_out=held_out
    )
    if not kept:
        log.warning("no reply index: every pair of %s was filtered out", source.name)
        return {"source": source.name, **report, "skipped": "every pair was filtered out"}
    write_index(index_dir, kept, terms, tokenizer)
    log.info(
        "reply index: %d of %d pairs (dropped %s)", len(kept), report["read"], report["dropped"]
    )
    return {
        "source": source.name,  # a name, never a path of the exporting machine
        **report,
        "k1": BM25_K1,
        "b": BM25_B,
        "method": "lucene",
        "library": f"bm25s {bm25s.__version__}",
        "tokenizer": {
            **tokenizer.settings.to_dict(),
            "terms": "model pieces, no <unk>, no punctuation-only pieces",
            "vocab_size": len(tokenizer.vocab),
        },
        "bot_name": BOT_NAME,
        "max_reply_chars": MAX_REPLY_CHARS,
    }
