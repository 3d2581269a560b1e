"""Corpus readers (each real format) and cleaning."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from training.config import PROJECT_ROOT
from training.corpus import (
    Blocklist,
    CorpusError,
    answer_entropies,
    clean_pairs,
    detect_format,
    read_corpus,
)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def chars(text: str) -> list[str]:
    return list(text)  # a stand-in segmenter: fast, and enough for the cleaning rules


# -- readers on small files -----------------------------------------------------------------


def test_conv_pairs_consecutive_utterances_and_joins_continuation_lines(tmp_path):
    text = "E\nM 你好\nM 你好呀\nM 吃了吗\nE\nM 讲个笑话\nM 从前\n有座山\n"
    path = write(tmp_path / "x.conv", text)
    fmt, pairs = read_corpus(path)
    assert fmt == "conv"
    assert pairs == [("你好", "你好呀"), ("你好呀", "吃了吗"), ("讲个笑话", "从前\n有座山")]


def test_lccc_dialogues_give_consecutive_pairs_without_the_spaces(tmp_path):
    dialogues = [["我 饿 了 。", "吃 饭 去", "好 的"], ["在 吗", "在"]]
    path = write(tmp_path / "d.json", json.dumps(dialogues, ensure_ascii=False))
    fmt, pairs = read_corpus(path)
    assert fmt == "lccc"
    assert pairs == [("我饿了。", "吃饭去"), ("吃饭去", "好的"), ("在吗", "在")]


def test_cdial_is_detected_from_spaced_characters_and_unspaced(tmp_path):
    path = write(tmp_path / "c.txt", "今 天 好 热\t是 啊 ， 热 死 了\n下 雨 了\t带 伞\n")
    assert detect_format(path) == "cdial"
    assert read_corpus(path)[1] == [("今天好热", "是啊，热死了"), ("下雨了", "带伞")]


def test_plain_tsv_keeps_its_text_and_format_can_be_forced(tmp_path):
    path = write(tmp_path / "p.txt", "今天好热\t是啊\nhello world\thi there\n")
    assert detect_format(path) == "tsv"
    assert read_corpus(path)[1][1] == ("hello world", "hi there")
    assert read_corpus(path, "cdial")[1][1] == ("helloworld", "hithere")


@pytest.mark.parametrize(
    ("name", "text", "where"),
    [
        ("bad.tsv", "你好\t你好呀\n\n这一行没有制表符\n", "bad.tsv:3:"),
        ("bad2.tsv", "a\tb\nc\td\te\n", "bad2.tsv:2:"),
        ("bad.conv", "你好\nE\nM 你好\n", "bad.conv:1:"),
        ("bad.json", '[["a", "b"],\n ["c", "d"\n', "bad.json:3:"),
    ],
)
def test_a_malformed_line_names_file_and_line(tmp_path, name, text, where):
    fmt = {"bad.tsv": "tsv", "bad2.tsv": "tsv", "bad.conv": "conv", "bad.json": "lccc"}[name]
    with pytest.raises(CorpusError, match=where.replace(".", r"\.")):
        read_corpus(write(tmp_path / name, text), fmt)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(CorpusError, match="not found"):
        read_corpus(tmp_path / "nope.tsv")
    with pytest.raises(CorpusError, match="unknown format"):
        read_corpus(write(tmp_path / "a.tsv", "a\tb\n"), "yaml")


# -- readers on the real corpora ------------------------------------------------------------


def test_real_xiaohuangji_conv(shared_data):
    fmt, pairs = read_corpus(shared_data / "XHJ_5w.txt")
    assert fmt == "conv"
    assert len(pairs) == 49946  # the README's count
    assert pairs[0] == ("呵呵", "是王若猫的。")


def test_real_lccc_json(shared_data):
    fmt, pairs = read_corpus(shared_data / "LCCC-base_valid.json")
    assert fmt == "lccc"
    assert len(pairs) == 36917  # the README's count
    assert pairs[0][0] == "啊我好爱虾仁蛋黄酱金枪鱼蛋黄酱"
    assert not any(" " in q for q, _ in pairs[:1000])


def test_real_cdial_tsv(shared_data):
    fmt, pairs = read_corpus(shared_data / "CDial-toy_train.txt")
    assert fmt == "cdial"
    assert len(pairs) == 10000
    assert pairs[1] == ("我也要去健身懒半年了", "我一直懒现在终于动起来了")


def test_the_project_demo_corpus_is_plain_tsv():
    demo = PROJECT_ROOT / "data" / "demo_corpus.tsv"
    if not demo.is_file():
        pytest.skip("data/demo_corpus.tsv is not written yet")
    fmt, pairs = read_corpus(demo)
    assert fmt == "tsv" and len(pairs) >= 100


# -- cleaning ---------------------------------------------------------------------------------


@pytest.fixture
def blocklist(tmp_path) -> Blocklist:
    return Blocklist.load(write(tmp_path / "block.txt", "# names\n小黄鸡 -> 小X\n小通 -> 小X\n"
                                                        "黄鸡\n傻逼  # an insult\nSB\n"))


def test_each_rule_drops_and_counts(blocklist):
    pairs = [
        ("你好", "你好呀"),
        ("你好", "你好呀"),                  # duplicate
        ("\x00\x01", "hi"),                  # empty once control characters go
        ("你好\ufffd", "嗯"),                # garbled
        ("你是傻逼", "你才是"),              # blocklist (question)
        ("你是谁", "我是大黄鸡"),            # blocklist (what the replacements leave)
        ("笑话", "sb"),                      # blocklist, case-insensitive
        ("长" * 12, "短"),                   # too long
        ("再发表情", "=。="),                 # symbols only: an answer with no letter or digit
        ("你叫什么", "我是小黄鸡，也叫小通"),  # kept, renamed
        ("小黃雞在嗎", "在"),                # Traditional: normalised then renamed
    ]
    segmented, texts, report = clean_pairs(pairs, chars, max_src_len=10, max_tgt_len=10,
                                           blocklist=blocklist)
    assert texts == [("你好", "你好呀"), ("你叫什么", "我是小X，也叫小X"), ("小X在吗", "在")]
    assert segmented[0] == (["你", "好"], ["你", "好", "呀"])
    assert dict(report.dropped) == {"empty": 1, "garbled": 1, "symbols_only": 1, "blocklist": 3,
                                    "generic_answer": 0, "duplicate": 1, "too_long": 1,
                                    "frequent_answer": 0}
    assert report.renamed == 2 and report.read == 11 and report.kept == 3
    assert "11 pairs read, 3 kept" in report.line() and "blocklist 3" in report.line()


def test_answer_repeats_are_capped_in_reading_order():
    pairs = [("你好", "哈哈"), ("早", "哈哈"), ("晚安", "晚安"), ("在吗", "哈哈"),
             ("吃了吗", "哈哈")]
    _, texts, report = clean_pairs(pairs, chars, max_src_len=10, max_tgt_len=10,
                                   max_answer_repeats=2)
    assert texts == [("你好", "哈哈"), ("早", "哈哈"), ("晚安", "晚安")]
    assert report.dropped["frequent_answer"] == 2
    _, uncapped, _ = clean_pairs(pairs, chars, max_src_len=10, max_tgt_len=10)
    assert len(uncapped) == 5


def generic_corpus() -> list[tuple[str, str]]:
    """"我也是" answers 8 different questions (3 bits); every other answer answers one
    question, or "好的" two (1 bit), or "晚安" the same question twice (0 bits)."""
    questions = ["我喜欢猫", "我饿了", "今天好累", "我在上班", "我想睡觉", "我爱吃面",
                 "下雨了", "我考完了"]
    pairs = [(q, "我也是") for q in questions]
    pairs += [("你叫什么", "我叫小X"), ("几点了", "三点了"), ("去吃饭吗", "好的"),
              ("帮我个忙", "好的"), ("晚安", "晚安"), ("晚安", "晚安"), ("猫呢", "在睡觉")]
    return pairs


def test_answer_entropy_is_the_entropy_of_the_questions_an_answer_follows():
    entropies = answer_entropies(generic_corpus())
    assert entropies["我也是"] == pytest.approx(3.0)
    assert entropies["好的"] == pytest.approx(1.0)
    assert entropies["晚安"] == 0.0 and entropies["我叫小X"] == 0.0
    assert answer_entropies([("a", "x"), ("a", "x"), ("b", "x")])["x"] == pytest.approx(
        -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3)))


def test_generic_answers_are_dropped_exactly_and_before_the_repeat_cap():
    pairs = generic_corpus()
    _, texts, report = clean_pairs(pairs, chars, max_src_len=10, max_tgt_len=10,
                                   max_answer_entropy=1.5)
    assert report.dropped["generic_answer"] == 8 and "generic_answer 8" in report.line()
    assert [a for _, a in texts] == ["我叫小X", "三点了", "好的", "好的", "晚安", "在睡觉"]
    # With the cap too: the cap sees only what the entropy rule kept; a cap alone would
    # have kept two copies of the stock reply.
    _, capped, report = clean_pairs(pairs, chars, max_src_len=10, max_tgt_len=10,
                                    max_answer_entropy=1.5, max_answer_repeats=1)
    assert [a for _, a in capped] == ["我叫小X", "三点了", "好的", "晚安", "在睡觉"]
    assert report.dropped["generic_answer"] == 8 and report.dropped["frequent_answer"] == 1
    _, off, _ = clean_pairs(pairs, chars, max_src_len=10, max_tgt_len=10)
    assert len(off) == len(pairs) - 1  # only the duplicate 晚安 pair


def test_the_project_blocklist_renames_the_other_bots():
    blocklist = Blocklist.load(PROJECT_ROOT / "data" / "blocklist.txt")
    assert blocklist.replace("我是小黄鸡") == "我是小X"
    assert blocklist.replace("小通来了") == "小X来了"
    assert blocklist.blocks("你个傻逼") and blocklist.blocks("你是SB")
    assert not blocklist.blocks("今天天气真好") and not blocklist.blocks("我是处女座")


def test_cleaning_real_xiaohuangji_drops_profanity_and_the_old_names(shared_data):
    _, pairs = read_corpus(shared_data / "XHJ_5w.txt")
    blocklist = Blocklist.load(PROJECT_ROOT / "data" / "blocklist.txt")
    _, texts, report = clean_pairs(pairs[:3000], chars, max_src_len=60, max_tgt_len=60,
                                   blocklist=blocklist)
    assert report.dropped["blocklist"] > 30 and report.renamed > 0
    assert not any("小黄鸡" in a or "小通" in a or "傻逼" in a for _, a in texts)
