"""The reply index export builds: train.tsv only, each filter counted, names made 小X."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from export.reply_index import TRAIN_FILE, build_reply_index, rename_bots
from serve.runtime.blocklist import Blocklist
from serve.runtime.manifest import load_manifest
from serve.runtime.paths import DEFAULT_BLOCKLIST
from serve.runtime.retrieval import PAIRS_FILE, ReplyIndex
from serve.runtime.tokenizer import Tokenizer
from tests.conftest import SHIPPED_MODEL

GOOD = [
    ("今天天气好冷啊", "多穿点衣服，别着凉。"),
    ("你喜欢吃火锅吗", "喜欢，尤其是麻辣的。"),
    ("周末去哪里玩", "去公园散散步吧。"),
    ("我好累啊", "早点休息，明天会更好。"),
    ("你叫什么名字", "我是小通，你呢？"),  # the old bot's name: kept as 小X
]
DROPPED = {
    "person_name": ("谁最帅", "当然是阮德培啦"),
    "url_or_mention": ("给我个网址", "去看看 http://example.com 吧"),
    "blocklist": ("你是谁", "你才是傻逼"),
    "too_long": ("讲个故事", "从前有座山，" * 12),
    "symbols_only": ("哈哈", "……！！"),
    "echo": ("晚安", "晚安"),
    "held_out": ("你会唱歌吗", "我只会唱两只老虎。"),
    "empty": ("在吗", ""),
}
MENTION = ("叫谁", "@小通 出来")
VALID = [("你会唱歌吗", "我只会唱两只老虎。"), ("你几岁了", "我永远十八岁。")]
TEST = [("你住在哪里", "我住在你的手机里。")]


def write_tsv(path: Path, pairs) -> None:
    path.write_text("".join(f"{q}\t{a}\n" for q, a in pairs), encoding="utf-8")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(SHIPPED_MODEL, load_manifest(SHIPPED_MODEL).tokenizer)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tokenizer):
    """A checkpoint-like folder (train/valid/test.tsv) and the model folder indexed from it."""
    root = tmp_path_factory.mktemp("reply_index")
    ckpt, model = root / "ckpt", root / "model"
    ckpt.mkdir()
    model.mkdir()
    train = [*GOOD, GOOD[0], *DROPPED.values(), MENTION, VALID[0]]  # a duplicate, a held-out pair
    write_tsv(ckpt / TRAIN_FILE, train)
    write_tsv(ckpt / "valid.tsv", VALID)
    write_tsv(ckpt / "test.tsv", TEST)
    record = build_reply_index(
        ckpt / TRAIN_FILE, model / "index", tokenizer, blocklist=Blocklist.load(DEFAULT_BLOCKLIST)
    )
    return model, record


def indexed(model: Path) -> list[tuple[str, str]]:
    return [tuple(p) for p in json.loads((model / "index" / PAIRS_FILE).read_text("utf-8"))]


def test_each_filter_drops_and_counts(built):
    model, record = built
    replies = [a for _, a in indexed(model)]
    for reason, (_, reply) in DROPPED.items():
        assert reply not in replies, reason
    assert not any("阮德培" in r or "http" in r or "@" in r or "傻逼" in r for r in replies)
    dropped = record["dropped"]
    for reason in DROPPED:
        assert dropped[reason] >= 1, reason
    assert dropped["url_or_mention"] == 2  # the URL and the @mention
    assert dropped["held_out"] == 2  # DROPPED's and VALID[0]: the same pair twice
    assert dropped["duplicate"] == 1
    assert record["indexed"] == len(GOOD) == len(replies)
    assert record["read"] == record["indexed"] + sum(dropped.values())


def test_no_valid_or_test_pair_is_indexed(built):
    pairs = set(indexed(built[0]))
    assert not pairs & {*VALID, *TEST}


def test_the_old_bots_names_become_xiaox(built):
    assert ("你叫什么名字", "我是小X，你呢？") in indexed(built[0])
    assert rename_bots("小通在此，小黄鸡也在，黄小通来了") == "小X在此，小X也在，小X来了"
    assert rename_bots("我叫SimSimi") == "我叫小X"
    assert rename_bots("大小通吃") == "大小通吃"  # an idiom, not the bot


def test_the_record_says_how_it_was_built(built):
    record = built[1]
    assert record["source"] == "train.tsv"
    assert {"k1", "b", "tokenizer", "library"} <= set(record)
    assert record["tokenizer"]["segmenter"] == "jieba"


def test_a_query_returns_the_reply_of_the_most_similar_question(built, tokenizer):
    index = ReplyIndex.load(built[0], tokenizer)
    assert index is not None and len(index) == len(GOOD)
    best = index.search("今天好冷", k=3)[0]
    assert (best.question, best.reply) == GOOD[0]
    assert index.search("火锅你喜欢吗", k=1)[0].reply == GOOD[1][1]


@pytest.mark.tensorflow
def test_export_indexes_the_checkpoints_train_tsv(tiny_model_dir, tiny_checkpoint):
    manifest = load_manifest(tiny_model_dir)
    assert (tiny_checkpoint / TRAIN_FILE).is_file()
    assert manifest.retrieval["source"] == TRAIN_FILE and manifest.retrieval["indexed"] > 0
    assert any(name.startswith("index/") for name in manifest.files)
    held_out = {
        tuple(line.split("\t", 1))
        for name in ("valid.tsv", "test.tsv")
        if (tiny_checkpoint / name).is_file()
        for line in (tiny_checkpoint / name).read_text(encoding="utf-8").splitlines()
    }
    assert held_out and not set(indexed(tiny_model_dir)) & held_out
