"""Replies chosen among retrieved and generated candidates (serve.runtime.replies), alone
and through the engine, on a model folder with a reply index and scoring graphs."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from serve.runtime.engine import Engine
from serve.runtime.model import OnnxSeq2Seq
from serve.runtime.options import DecodingOptions
from serve.runtime.replies import ReplySources, reply_deltas, select_reply
from serve.runtime.selection import SelectionWeights

ROOM = {"sampling_topk": 0, "sampling_topp": 0.9, "sampling_temperature": 0.7,
        "generated_candidates": 2, "max_length": 20}
MESSAGES = ["你好呀", "今天好冷", "中午吃啥", "你会跳舞吗", "我发烧了", "推荐一本书吧"]


@pytest.fixture(scope="module")
def sources(model: OnnxSeq2Seq) -> ReplySources:
    loaded = ReplySources.load(model, intra_op_num_threads=1)
    if loaded.index is None or loaded.scorer is None:
        pytest.fail(f"{model.model_dir} has no reply index or scoring graph")
    return loaded


def retrieval_only(sources: ReplySources) -> ReplySources:
    return replace(sources, weights=SelectionWeights(forward=0.0, backward=0.0, retrieval=1.0))


def test_the_hybrid_reply_is_the_best_of_retrieved_and_generated_candidates(model, sources):
    options = DecodingOptions(**ROOM, seed=3, reply_mode="hybrid", return_candidates=True)
    result = select_reply(model, sources, "今天好冷", options)
    kinds = {c.source for c in result.candidates}
    assert kinds == {"retrieved", "generated"}
    scores = [c.score for c in result.candidates]
    assert scores == sorted(scores, reverse=True)
    assert result.text == result.candidates[0].text and result.source in kinds
    assert 1 < len(result.candidates) <= ROOM["generated_candidates"] + 8


def test_the_same_seed_gives_the_same_reply(model, sources):
    options = DecodingOptions(**ROOM, seed=11, reply_mode="hybrid")
    replies = [select_reply(model, sources, m, options).text for m in MESSAGES]
    assert replies == [select_reply(model, sources, m, options).text for m in MESSAGES]


def test_generate_mode_reranks_the_models_own_samples_only(model, sources):
    options = DecodingOptions(**ROOM, seed=5, reply_mode="generate", return_candidates=True)
    result = select_reply(model, sources, "你喜欢什么", options)
    assert result.candidates and {c.source for c in result.candidates} == {"generated"}
    assert result.source == "generated"


def test_a_retrieved_reply_with_a_suppressed_word_is_dropped_and_only_it(model, sources):
    # Each word is first looked for in all the retrieved replies at once: the replies
    # kept are still exactly those in which no word is found, one by one.
    options = DecodingOptions(**ROOM, reply_mode="hybrid", retrieval_candidates=20)
    every = sources.retrieved(model, "今天好冷", options)
    word = next(w for c in every for w in c.text if w.isalnum())
    for words in ((word,), ("QWZXV", word.upper(), "不在任何回复里")):
        kept = sources.retrieved(model, "今天好冷", replace(options, suppress_words=words))
        assert kept == [c for c in every if not any(w.lower() in c.text.lower()
                                                    for w in words)]
        assert len(kept) < len(every)


def test_a_message_tokenized_once_retrieves_what_its_text_does(model, sources):
    # The caller's token ids stand for the text: the same replies, and the ids are what
    # is searched (other ids, other replies).
    options = DecodingOptions(**ROOM, reply_mode="hybrid")
    for message in MESSAGES:
        ids = model.tokenizer.encode(message)
        assert sources.retrieved(model, message, options, ids=ids) == \
            sources.retrieved(model, message, options)
    other = model.tokenizer.encode(MESSAGES[1])
    assert sources.retrieved(model, MESSAGES[0], options, ids=other) == \
        sources.retrieved(model, MESSAGES[1], options)


def test_a_folder_without_index_or_graphs_serves_plain_generation(model):
    bare = ReplySources()
    options = DecodingOptions(max_length=10)
    assert not bare.needs_selection(options) and bare.mode(options) == "generate"
    with pytest.raises(ValueError, match="reply index"):
        bare.mode(DecodingOptions(reply_mode="hybrid"))


def test_a_retrieved_reply_streams_in_the_pieces_a_decoded_one_would(model):
    text = "多穿点衣服，别感冒了"
    deltas = reply_deltas(model, text)
    assert len(deltas) > 2 and "".join(deltas) == text


async def test_the_engine_streams_a_retrieved_reply_piece_by_piece(model, sources):
    engine = Engine(model, max_batch_size=8, sources=retrieval_only(sources))
    await engine.start()
    try:
        stream = engine.stream("今天好冷", **ROOM, seed=1)
        deltas = [d async for d in stream]
    finally:
        await engine.stop()
    assert stream.result.source == "retrieved"
    assert len(deltas) > 1 and "".join(deltas) == stream.result.text
    top = sources.index.search("今天好冷", 8)
    assert stream.result.text in {hit.reply for hit in top}


async def test_the_engine_scores_concurrent_requests_together(model, sources):
    engine = Engine(model, max_batch_size=32, sources=sources)
    await engine.start()
    try:
        results = await asyncio.gather(*(engine.generate(m, **ROOM, seed=i)
                                         for i, m in enumerate(MESSAGES * 2)))
    finally:
        await engine.stop()
    assert all(r.text for r in results)
    assert engine._scoring.calls < len(results)  # several requests shared a scoring call


async def test_the_engine_gives_the_same_reply_for_the_same_seed(model, sources):
    engine = Engine(model, max_batch_size=8, sources=sources)
    await engine.start()
    try:
        first = [(await engine.generate(m, **ROOM, seed=7)).text for m in MESSAGES]
        second = [(await engine.generate(m, **ROOM, seed=7)).text for m in MESSAGES]
    finally:
        await engine.stop()
    assert first == second


async def test_cancelling_a_hybrid_request_frees_its_rows(model, sources):
    engine = Engine(model, max_batch_size=8, sources=sources)
    await engine.start()
    try:
        # No retrieved reply is 400 tokens long: the sample must be decoded, for seconds.
        task = asyncio.create_task(engine.generate("你好", **{**ROOM, "max_length": 400,
                                                            "min_length": 400}))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(1000):  # a loaded machine may take a few steps to let them go
            if engine.stats.active == 0 and engine.stats.queue_size == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.stats.active == 0 and engine.stats.queue_size == 0
    finally:
        await engine.stop()


async def test_a_real_folder_without_index_and_scoring_graphs_serves_as_before(model_dir,
                                                                               tmp_path):
    import json
    import shutil

    folder = tmp_path / "bare"
    shutil.copytree(model_dir, folder)
    shutil.rmtree(folder / "index", ignore_errors=True)
    for name in ("score.onnx", "backward_score.onnx"):
        (folder / name).unlink(missing_ok=True)
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    manifest["files"] = {n: h for n, h in manifest["files"].items() if (folder / n).is_file()}
    (folder / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False))
    bare = OnnxSeq2Seq.load(folder, intra_op_num_threads=1)
    sources = ReplySources.load(bare)
    assert sources.index is None and sources.scorer is None
    engine = Engine(bare, max_batch_size=4, sources=sources)
    await engine.start()
    try:
        deltas = [d async for d in engine.stream("你好", **ROOM, seed=2)]
        result = await engine.generate("你好", max_length=8)
    finally:
        await engine.stop()
    assert "".join(deltas) and result.source == "generated" and not result.candidates
