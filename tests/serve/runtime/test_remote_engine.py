"""``RemoteEngine``: the engine in its own process answers as the engine does here.

Each test starts a real engine process on the shipped model folder and stops it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path

import pytest

from serve.runtime.engine import Engine, EngineStopped, Overloaded
from serve.runtime.lanes import Lane
from serve.runtime.manifest import ModelError
from serve.runtime.model import OnnxSeq2Seq
from serve.runtime.options import MAX_LENGTH, DecodingOptions
from serve.runtime.remote_engine import RemoteEngine
from serve.runtime.replies import ReplySources

pytestmark = pytest.mark.timeout(120)

MESSAGES = ["你好", "今天天气怎么样", "你喜欢吃什么", "晚安"]
SAMPLED = DecodingOptions(sampling_topk=0, sampling_topp=0.9, sampling_temperature=0.7,
                          no_repeat_ngram_size=3, repetition_penalty=1.2, seed=7)


async def _here(model_dir, work) -> list:
    model = OnnxSeq2Seq.load(model_dir, intra_op_num_threads=1)
    engine = Engine(model, sources=ReplySources.load(model, intra_op_num_threads=1))
    await engine.start()
    try:
        return await work(engine)
    finally:
        await engine.stop()


async def _there(model_dir, work, **kwargs) -> list:
    engine = RemoteEngine(model_dir, threads=1, **kwargs)
    await engine.start()
    try:
        return await work(engine)
    finally:
        await engine.stop()


async def _replies(engine) -> list:
    """Greedy, seeded sampling (streamed) and hybrid replies to every message."""
    found = []
    for message in MESSAGES:
        greedy = await engine.generate(message, DecodingOptions(reply_mode="generate",
                                                                max_length=12))
        stream = engine.stream(message, SAMPLED)
        pieces = [p.text async for p in stream.pieces()]
        hybrid = await engine.generate(message, DecodingOptions(reply_mode="hybrid"))
        found.append((greedy.text, greedy.token_ids, greedy.finish_reason,
                      "".join(pieces), stream.result.text, hybrid.text, hybrid.source))
    return found


def test_replies_are_those_of_the_engine_here(shipped_model_dir):
    here = asyncio.run(_here(shipped_model_dir, _replies))
    there = asyncio.run(_there(shipped_model_dir, _replies))
    assert there == here
    assert all(streamed == text for _, _, _, streamed, text, _, _ in there)
    assert {source for *_, source in there} <= {"retrieved", "generated"}


def test_refusals_keep_their_kind_and_the_stop_ends_requests(shipped_model_dir):
    async def work(engine):
        forced = DecodingOptions(reply_mode="generate", min_length=20, max_length=20)
        many = [engine.generate("你好", forced) for _ in range(12)]
        outcomes = await asyncio.gather(*many, return_exceptions=True)
        with pytest.raises(ValueError, match="lane"):
            await engine.generate("你好", lane="nobody")
        return outcomes

    lanes = {"default": Lane(rows=1, queue=2)}
    outcomes = asyncio.run(_there(shipped_model_dir, work, lanes=lanes))
    assert any(isinstance(o, Overloaded) for o in outcomes)  # a full queue: 429's cause
    assert any(getattr(o, "finish_reason", None) == "length" for o in outcomes)

    async def stopped():
        engine = RemoteEngine(shipped_model_dir, threads=1)
        await engine.start()
        await engine.stop()
        assert not engine.running
        with pytest.raises(EngineStopped):
            await engine.generate("你好")
        with pytest.raises(EngineStopped):
            async for _ in engine.stream("你好").pieces():
                pass

    asyncio.run(stopped())


def test_a_stream_left_early_is_cancelled_there(shipped_model_dir):
    async def work(engine):
        # the longest reply: it cannot end before the cancel arrives
        forced = DecodingOptions(reply_mode="generate", min_length=MAX_LENGTH,
                                 max_length=MAX_LENGTH)
        pieces = engine.stream("你好", forced).pieces()
        assert (await anext(pieces)).text is not None
        await pieces.aclose()
        for _ in range(100):  # the counters trail the engine by a batch of events
            if engine.stats.requests_cancelled:
                break
            await asyncio.sleep(0.05)
        return engine.stats

    stats = asyncio.run(_there(shipped_model_dir, work))
    assert stats.requests_cancelled == 1 and stats.requests_finished == 0


async def _until(condition, seconds: float) -> None:
    for _ in range(int(seconds * 20)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {seconds} s")


def test_a_dead_engine_process_ends_its_requests_and_another_serves(shipped_model_dir):
    async def work(engine):
        await engine.generate("你好", reply_mode="generate", max_length=5)
        await _until(lambda: engine.stats.steps_total >= 5, 5)  # (they trail by a batch)
        steps_before = engine.stats.steps_total
        forced = DecodingOptions(reply_mode="generate", min_length=MAX_LENGTH,
                                 max_length=MAX_LENGTH)
        pieces = engine.stream("你好", forced).pieces()
        await anext(pieces)
        dead = engine._process.pid
        os.kill(dead, signal.SIGKILL)
        with pytest.raises(EngineStopped, match="process ended"):
            async for _ in pieces:
                pass
        assert not engine.running
        with pytest.raises(EngineStopped):
            await engine.generate("你好")
        await _until(lambda: engine.running, 60)
        assert engine._process.pid != dead
        again = await engine.generate("你好", reply_mode="generate", max_length=5)
        assert again.text
        await _until(lambda: engine.stats.steps_total > steps_before, 5)
        assert engine.stats.restarts_total == 1  # and the counters went on from before
        return True

    assert asyncio.run(_there(shipped_model_dir, work))


async def _killed_and_replaced(engine, hung) -> None:
    """``hung`` (the engine's process) was SIGKILLed and another one serves."""
    assert hung.wait(5) == -signal.SIGKILL
    await _until(lambda: engine.running, 60)
    assert (await engine.generate("你好", reply_mode="generate", max_length=5)).text
    assert engine.stats.restarts_total == 1


def test_a_hung_engine_process_is_killed_and_another_serves(shipped_model_dir):
    async def work(engine):
        await asyncio.sleep(4)  # idle, it still says it is alive: nothing is killed
        assert engine.running and engine.stats.restarts_total == 0
        forced = DecodingOptions(reply_mode="generate", min_length=MAX_LENGTH,
                                 max_length=MAX_LENGTH)
        pieces = engine.stream("你好", forced).pieces()
        await anext(pieces)
        hung = engine._process
        os.kill(hung.pid, signal.SIGSTOP)  # alive, and silent
        with pytest.raises(EngineStopped, match="sent nothing for 3 s"):
            async for _ in pieces:
                pass
        await _killed_and_replaced(engine, hung)
        return True

    assert asyncio.run(_there(shipped_model_dir, work, silence_seconds=3))


HANG_STEPS = Path(__file__).parent / "hang_steps"  # a sitecustomize that hangs a step


def test_an_engine_whose_steps_hang_is_killed_and_another_serves(shipped_model_dir,
                                                                  tmp_path, monkeypatch):
    # The process's event loop still runs (it says it is alive): its step thread is stuck.
    marker = tmp_path / "hung"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(HANG_STEPS), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setenv("XIAOX_TEST_HANG_STEPS", str(marker))

    async def work(engine):
        forced = DecodingOptions(reply_mode="generate", min_length=MAX_LENGTH,
                                 max_length=MAX_LENGTH)
        hung = engine._process
        with pytest.raises(EngineStopped, match="steps made no progress for 3 s"):
            async for _ in engine.stream("你好", forced).pieces():
                pass
        assert marker.exists()  # it hung where the hook made it hang
        await _killed_and_replaced(engine, hung)
        return True

    assert asyncio.run(_there(shipped_model_dir, work, silence_seconds=3))


def test_an_engine_that_cannot_start_again_is_retried_ever_more_slowly(
        shipped_model_dir, tmp_path, caplog):
    folder = tmp_path / "model"
    shutil.copytree(shipped_model_dir, folder)
    decoder = (folder / "decoder.onnx").read_bytes()

    async def work(engine):
        (folder / "decoder.onnx").write_bytes(b"not a model")  # every new process fails
        os.kill(engine._process.pid, signal.SIGKILL)

        def failures():
            return [r for r in caplog.records if "could not start again" in r.getMessage()]

        await _until(lambda: len(failures()) >= 2, 60)
        first, second = failures()[:2]
        assert "decoder.onnx" in first.getMessage() and not engine.running
        # tried 0.5 s after the death, then 1 s after that failure, then 2 s after...
        assert "retrying in 1.0 s" in first.getMessage()
        assert "retrying in 2.0 s" in second.getMessage()
        assert second.created - first.created >= 1.0
        (folder / "decoder.onnx").write_bytes(decoder)
        await _until(lambda: engine.running, 30)
        assert (await engine.generate("你好", reply_mode="generate", max_length=5)).text
        return True

    caplog.set_level("ERROR", logger="serve.runtime.remote_engine")
    assert asyncio.run(_there(folder, work))


def test_a_folder_the_engine_cannot_load_is_a_model_error(shipped_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(shipped_model_dir, broken)
    (broken / "decoder.onnx").write_bytes(b"not a model")

    async def start():
        engine = RemoteEngine(broken, threads=1)
        with pytest.raises(ModelError, match="decoder.onnx"):
            await engine.start()
        assert not engine.running

    asyncio.run(start())


def test_which_replies_are_chosen_is_known_here(shipped_model_dir):
    async def work(engine):
        here = ReplySources.load(OnnxSeq2Seq.load(shipped_model_dir, intra_op_num_threads=1))
        for options in (DecodingOptions(), DecodingOptions(reply_mode="generate"),
                        DecodingOptions(reply_mode="generate", sampling_topk=0,
                                        generated_candidates=3)):
            assert engine.sources.mode(options) == here.mode(options)
            assert engine.sources.needs_selection(options) == here.needs_selection(options)
        with pytest.raises(RuntimeError, match="engine's process"):
            engine.sources.index.retrieve  # noqa: B018 (the index is not in this process)
        return True

    assert asyncio.run(_there(shipped_model_dir, work))
