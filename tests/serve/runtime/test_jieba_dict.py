"""jieba's dictionary, compact: the same segmentation as jieba's own dict, from arrays."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jieba
import pytest

from serve.runtime.jieba_dict import CompactFreq, build, load

ROOT = Path(__file__).resolve().parents[3]
DICTIONARY = Path(jieba.__file__).parent / "dict.txt"


@pytest.fixture(scope="module")
def compact(tmp_path_factory) -> CompactFreq:
    folder = tmp_path_factory.mktemp("cache") / "jieba"
    build(DICTIONARY, folder)
    return CompactFreq(folder)


def _texts() -> list[str]:
    messages = (ROOT / "data" / "everyday_messages.txt").read_text(encoding="utf-8")
    pairs = json.loads((ROOT / "artifacts" / "xiaox" / "index" / "pairs.json")
                       .read_text(encoding="utf-8"))
    return [m for m in messages.splitlines() if m.strip()] + [
        text for pair in pairs[::20] for text in pair] + ["", "ABC abc 123", "😀你好😀"]


def test_segmentation_is_jiebas_own(compact):
    jieba.setLogLevel(logging.WARNING)
    own = jieba.Tokenizer()
    own.initialize()
    ours = jieba.Tokenizer()
    ours.FREQ, ours.total, ours.initialized = compact, compact.total, True
    assert ours.total == own.total and len(compact) == len(own.FREQ)
    texts = _texts()
    assert len(texts) > 5000
    for text in texts:
        assert ours.lcut(text, HMM=True) == own.lcut(text, HMM=True), text
    for word in ("你好", "中华人民共和国", "你", "不存在的词语啊"):
        assert compact.get(word) == own.FREQ.get(word)
        assert (word in compact) == (word in own.FREQ)
    with pytest.raises(KeyError):
        compact["不存在的词语啊"]


def test_the_cache_is_built_once_and_a_failure_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = load(DICTIONARY)
    assert isinstance(first, CompactFreq) and first.get("你好")
    built = sorted(p.name for p in (tmp_path / "xiaox").iterdir())
    assert len(built) == 1 and load(DICTIONARY) is not None
    assert sorted(p.name for p in (tmp_path / "xiaox").iterdir()) == built  # reused
    assert load(tmp_path / "no-such-dict.txt") is None  # jieba's own dict then
