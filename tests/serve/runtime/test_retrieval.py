"""serve.runtime.retrieval: loading a model folder's reply index and querying it."""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from export.reply_index import build_reply_index
from serve.runtime.manifest import Manifest, ModelError, load_manifest
from serve.runtime.retrieval import PAIRS_FILE, ReplyIndex, Retrieved, index_tokens
from serve.runtime.tokenizer import Tokenizer

PAIRS = [
    ("今天天气好冷啊", "多穿点衣服，别着凉。"),
    ("今天天气怎么样", "阳光明媚，适合出去走走。"),
    ("你喜欢吃火锅吗", "喜欢，尤其是麻辣的。"),
    ("周末去哪里玩", "去公园散散步吧。"),
    ("我好累啊", "早点休息，明天会更好。"),
    ("你会唱歌吗", "我只会唱两只老虎。"),
    ("你几岁了", "我永远十八岁。"),
    ("晚上吃什么", "吃饺子吧。"),
]


@pytest.fixture(scope="module")
def indexed_model(shipped_model_dir, tmp_path_factory) -> Path:
    """A copy of the shipped model folder with a small index built into it."""
    folder = tmp_path_factory.mktemp("retrieval") / "model"
    shutil.copytree(shipped_model_dir, folder)
    shutil.rmtree(folder / "index", ignore_errors=True)
    source = folder.parent / "train.tsv"
    source.write_text("".join(f"{q}\t{a}\n" for q, a in PAIRS), encoding="utf-8")
    manifest = Manifest.read(folder)
    tokenizer = Tokenizer.from_dir(folder, manifest.tokenizer)
    manifest.retrieval = build_reply_index(source, folder / "index", tokenizer)
    manifest.write(folder)
    return folder


@pytest.fixture(scope="module")
def index(indexed_model) -> ReplyIndex:
    loaded = ReplyIndex.load(indexed_model)
    assert loaded is not None
    return loaded


def test_a_folder_without_an_index_loads_none(shipped_model_dir, tmp_path):
    assert ReplyIndex.load(tmp_path) is None
    if not (shipped_model_dir / "index").exists():
        assert ReplyIndex.load(shipped_model_dir) is None


def test_search_ranks_by_bm25_best_first(index):
    results = index.search("今天好冷", k=3)
    assert all(isinstance(r, Retrieved) for r in results)
    assert results[0].question == "今天天气好冷啊"
    assert len(results) <= 3
    assert [r.score for r in results] == sorted((r.score for r in results), reverse=True)
    assert all(r.score > 0 for r in results)


def test_k_is_respected_and_unknown_messages_retrieve_nothing(index):
    assert len(index.search("今天天气", k=1)) == 1
    assert len(index.search("今天天气", k=100)) <= len(PAIRS)
    assert index.search("qwzxv", k=5) == []
    assert index.search("", k=5) == []
    assert index.search("？？？", k=5) == []  # punctuation is not a term
    assert index.search("今天天气", k=0) == []


def test_search_is_thread_safe(index):
    queries = ["今天天气冷", "火锅好吃", "周末玩什么", "好累", "唱首歌", "几岁", "吃什么"] * 8
    serial = [index.search(q, k=3) for q in queries]
    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(lambda q: index.search(q, k=3), queries)) == serial


def test_index_terms_are_the_models_pieces(indexed_model):
    tokenizer = Tokenizer.from_dir(indexed_model, Manifest.read(indexed_model).tokenizer)
    terms = index_tokens(tokenizer, "今天天气好冷啊！")
    assert terms and "！" not in terms and "<unk>" not in terms
    assert all(t in tokenizer.vocab for t in terms)


def test_the_manifest_hashes_the_index_and_catches_a_changed_file(indexed_model, tmp_path):
    manifest = load_manifest(indexed_model)
    assert f"index/{PAIRS_FILE}" in manifest.files
    assert manifest.retrieval["indexed"] == len(PAIRS)
    copy = shutil.copytree(indexed_model, tmp_path / "copy")
    pairs = json.loads((copy / "index" / PAIRS_FILE).read_text(encoding="utf-8"))
    pairs[0][1] = "something else"
    (copy / "index" / PAIRS_FILE).write_text(json.dumps(pairs), encoding="utf-8")
    with pytest.raises(ModelError, match="index/pairs.json"):
        load_manifest(copy)


def test_a_truncated_pairs_file_is_refused(indexed_model, tmp_path):
    copy = shutil.copytree(indexed_model, tmp_path / "copy")
    pairs = json.loads((copy / "index" / PAIRS_FILE).read_text(encoding="utf-8"))
    (copy / "index" / PAIRS_FILE).write_text(json.dumps(pairs[:-1]), encoding="utf-8")
    with pytest.raises(ModelError, match="pairs"):
        ReplyIndex.load(copy)


def test_loading_is_fast(indexed_model):
    started = time.perf_counter()
    ReplyIndex.load(indexed_model)
    assert time.perf_counter() - started < 2.0


def test_the_pair_store_reads_pairs_json_as_json_does():
    import json as _json

    from serve.runtime.retrieval import PairStore

    pairs = [["你好", "你好呀"], ["a \"quoted\"\\n", "é\u2028"], ["", "x"]]
    store = PairStore(" " + _json.dumps(pairs, ensure_ascii=False, indent=1) + "\n")
    assert len(store) == 3 and [store[i] for i in range(3)] == [tuple(p) for p in pairs]
    with pytest.raises(IndexError):
        store[3]
    for bad in ("{}", "[[1, 2]]", "[[\"a\"]]", "[[\"a\", \"b\"] [\"c\", \"d\"]]"):
        with pytest.raises(ValueError):
            PairStore(bad)


def test_retrieved_replies_carry_their_stored_token_ids(indexed_model, index, tmp_path):
    # Export stores every reply's tokens: a retrieved reply is not tokenized per request,
    # and its ids are those the tokenizer gives; an older folder without them still
    # loads (the ids are then made per request), and mismatched arrays are refused.
    tokenizer = Tokenizer.from_dir(indexed_model, Manifest.read(indexed_model).tokenizer)
    hits = index.search("今天好冷", k=3)
    assert hits and all(h.reply_ids == tuple(tokenizer.encode(h.reply)) for h in hits)
    older = shutil.copytree(indexed_model, tmp_path / "older")
    for name in ("reply_ids.npy", "reply_ends.npy"):
        (older / "index" / name).unlink()
    assert all(h.reply_ids is None for h in ReplyIndex.load(older).search("今天好冷", k=3))
    broken = shutil.copytree(indexed_model, tmp_path / "broken")
    np.save(broken / "index" / "reply_ends.npy", np.array([0, 1], np.int64))
    with pytest.raises(ModelError, match="reply"):
        ReplyIndex.load(broken)


def test_the_shipped_index_stores_every_replys_token_ids(shipped_model_dir):
    loaded = ReplyIndex.load(shipped_model_dir)
    if loaded is None:
        pytest.skip("the shipped folder has no index")
    tokenizer = Tokenizer.from_dir(shipped_model_dir, Manifest.read(shipped_model_dir).tokenizer)
    messages = ("你好", "今天天气怎么样", "晚安", "你喜欢吃什么")
    hits = [h for q in messages for h in loaded.search(q, 8)]
    assert hits and all(h.reply_ids == tuple(tokenizer.encode(h.reply)) for h in hits)


def _search_by_sorting(retriever, pairs, tokenizer, text: str, k: int) -> list[tuple]:
    """The k best by a sort of every positive score, ties by the lower document index
    (bm25s's public API and pairs.json alone)."""
    terms = [t for t in index_tokens(tokenizer, text) if t in retriever.vocab_dict]
    if not terms or k < 1:
        return []
    scores = retriever.get_scores([retriever.vocab_dict[t] for t in terms])
    docs = np.flatnonzero(scores > 0)
    head = docs[np.lexsort((docs, -scores[docs]))][:k]
    return [(*pairs[doc], float(scores[doc])) for doc in head]


def test_the_shipped_index_retrieves_the_k_best_ties_by_lower_index(shipped_model_dir):
    # Only the questions sharing a term with the message are ranked, and a tie at the
    # k-th place goes to the lower document index. Searches with and without such a tie
    # occur among these messages; every result is that of sorting every score.
    import bm25s

    loaded = ReplyIndex.load(shipped_model_dir)
    if loaded is None:
        pytest.skip("the shipped folder has no index")
    index_dir = shipped_model_dir / "index"
    retriever = bm25s.BM25.load(index_dir, show_progress=False, backend="numpy")
    pairs = json.loads((index_dir / PAIRS_FILE).read_text(encoding="utf-8"))
    tokenizer = Tokenizer.from_dir(shipped_model_dir, Manifest.read(shipped_model_dir).tokenizer)
    everyday = Path(__file__).resolve().parents[3] / "data" / "everyday_messages.txt"
    messages = [m for m in everyday.read_text(encoding="utf-8").splitlines() if m.strip()]
    messages += [pairs[i][0] for i in range(0, len(pairs), 997)]
    messages += ["我", "你好你好", "哈哈哈哈", "？？", "qwzxv", ""]
    ties = 0  # searches whose k-th score is shared by a question left out
    for k in (1, 8, 30):
        for message in messages:
            before = _search_by_sorting(retriever, pairs, tokenizer, message, k)
            assert [(h.question, h.reply, h.score) for h in loaded.search(message, k)] == \
                before, (message, k)
            if len(before) == k:
                ties += _at_least(retriever, tokenizer, message, before[-1][2]) > k
    assert 0 < ties < 3 * len(messages)


def _at_least(retriever, tokenizer, message: str, score: float) -> int:
    terms = [t for t in index_tokens(tokenizer, message) if t in retriever.vocab_dict]
    return int(np.count_nonzero(
        retriever.get_scores([retriever.vocab_dict[t] for t in terms]) >= np.float32(score)))
