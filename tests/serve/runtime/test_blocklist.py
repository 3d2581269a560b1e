import pytest

from serve.runtime.blocklist import Blocklist, BlocklistError
from tests.conftest import ROOT


def test_project_blocklist_parses_terms_and_renames():
    blocklist = Blocklist.load(ROOT / "data" / "blocklist.txt")
    assert blocklist.replacements["小黄鸡"] == "小X"
    assert "小通" in blocklist.words and "小黄鸡" in blocklist.words
    assert blocklist.terms


def test_matching_is_on_normalised_lowercase_text(tmp_path):
    path = tmp_path / "blocklist.txt"
    path.write_text("# comment\nSB\n小黃雞 -> 小X\n", encoding="utf-8")
    blocklist = Blocklist.load(path)
    assert blocklist.blocks("你是sb吗")
    assert blocklist.replace("我是小黄鸡") == "我是小X"
    assert blocklist.hits("我是小黃雞") == ["小黄鸡"]


def test_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(BlocklistError, match="not found"):
        Blocklist.load(tmp_path / "missing.txt")
    bad = tmp_path / "bad.txt"
    bad.write_text("ok\n -> 小X\n", encoding="utf-8")
    with pytest.raises(BlocklistError, match=r"bad.txt:2"):
        Blocklist.load(bad)


def test_word_guard_bans_words_spelled_across_tokens():
    from serve.runtime.rules import WordGuard

    pieces = ["<pad>", "<unk>", "<s>", "</s>", "傻", "逼", "瓜", "小", "黄鸡", "黄"]
    guard = WordGuard.build(pieces, ("傻逼", "小黄鸡"))
    banned = lambda previous: sorted(int(i) for ids in guard.banned(previous) for i in ids)  # noqa: E731
    assert banned([4]) == [5]  # after 傻: not 逼, but 瓜 is fine
    assert banned([7]) == [8, 9]  # after 小: neither 黄鸡 nor 黄
    assert banned([6]) == []


def test_model_folder_blocklist_is_always_suppressed(shipped_model_dir):
    import numpy as np

    from serve.runtime.model import OnnxSeq2Seq
    from serve.runtime.options import DecodingOptions
    from serve.runtime.rules import TokenRules

    model = OnnxSeq2Seq.load(shipped_model_dir)
    vocab = model.tokenizer.vocab
    first, second = (t for t in ("你", "好") if t in vocab)
    model.blocklist_words = ("你好",)  # as if the folder's blocklist.txt listed it
    rules = TokenRules.for_model(model, DecodingOptions())
    row = np.zeros(len(vocab), np.float32)
    rules.mask_row(row, [vocab.id(first)])
    assert row[vocab.id(second)] == -np.inf
    if "你好" in vocab:
        assert vocab.id("你好") in rules.banned
