"""The engine: continuous batching, streaming, cancellation, overload."""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading

import pytest

from serve.runtime.engine import Engine, EngineStopped, Lane, Overloaded
from serve.runtime.model import OnnxSeq2Seq
from serve.runtime.options import MAX_LENGTH, DecodingOptions
from serve.runtime.search import beam_search, decode_alone, source_ids

QUESTIONS = [
    "你好",
    "你叫什么名字",
    "今天天气怎么样",
    "我好累啊，今天上了一整天的班，回家还要做饭",
    "晚安",
    "你喜欢吃什么水果",
    "哈哈哈",
    "周末一起去看电影吧，听说新上映的那部很好看",
    "嗯",
]
ENDLESS = {"min_length": MAX_LENGTH, "max_length": MAX_LENGTH}  # the longest: tests cancel it


@contextlib.asynccontextmanager
async def running(model: OnnxSeq2Seq, **kwargs):
    # Not an async fixture: the engine's scheduler must live in the test's own event loop.
    engine = Engine(model, **kwargs)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


async def _hog(engine: Engine, started: asyncio.Event) -> None:
    async for _ in engine.stream("你好", **ENDLESS):
        started.set()


async def _until(predicate, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


@pytest.mark.tensorflow
async def test_batched_equals_alone_for_50_mixed_concurrent_requests(tiny_model_dir):
    # fp32: every row of a batched step is computed exactly as alone (int8 quantizes the
    # activations over the whole batch, so only the fp32 model can promise bit equality).
    model = OnnxSeq2Seq.load(tiny_model_dir, intra_op_num_threads=1)
    rng = random.Random(5)
    requests = []
    for i in range(50):
        options = {"max_length": rng.randint(3, 30), "return_scores": True}
        if i % 2:
            options |= {
                "sampling_topk": rng.choice([0, 5]),
                "sampling_topp": 0.9,
                "sampling_temperature": 0.8,
                "seed": i,
            }
        if i % 5 == 0:
            options |= {"repetition_penalty": 1.2, "no_repeat_ngram_size": 3}
        if i % 3 == 0:
            options |= {"presence_penalty": rng.choice([-0.5, 0.8]), "frequency_penalty": 0.6,
                        "return_log_probs": True, "top_log_probs": 3}
        requests.append((rng.choice(QUESTIONS), DecodingOptions(**options)))
    engine = Engine(model, max_batch_size=16)
    await engine.start()
    try:

        async def one(i, text, options):
            await asyncio.sleep(0.002 * (i % 7))  # arrive while others are mid-reply
            return await engine.generate(text, options)

        batched = await asyncio.gather(*(one(i, t, o) for i, (t, o) in enumerate(requests)))
    finally:
        await engine.stop()
    alone = [decode_alone(model, source_ids(model, t), o) for t, o in requests]
    assert batched == alone
    assert engine.stats.steps_total < engine.stats.tokens_total / 4  # rows shared steps
    assert engine.stats.requests_finished == 50 and engine.stats.active == 0


async def test_stream_yields_the_reply_piece_by_piece(model):
    seen = []
    engine = Engine(model, on_metric=lambda name, seconds: seen.append(name))
    await engine.start()
    try:
        stream = engine.stream("你好", min_length=5, max_length=8)
        deltas = [delta async for delta in stream]
    finally:
        await engine.stop()
    result = stream.result
    assert result is not None and "".join(deltas) == result.text
    assert len(deltas) == len(result.token_ids) >= 5
    assert result == decode_alone(
        model, source_ids(model, "你好"), DecodingOptions(min_length=5, max_length=8)
    )
    assert seen.count("time_to_first_token") == 1
    assert seen.count("inter_token_latency") == len(deltas) - 1
    assert seen.count("request_latency") == 1


async def test_pieces_carry_each_tokens_log_probs(model):
    options = DecodingOptions(min_length=3, max_length=6, return_log_probs=True,
                              top_log_probs=2, frequency_penalty=1.0)
    async with running(model) as engine:
        stream = engine.stream("你好", options)
        pieces = [piece async for piece in stream.pieces()]
        scored = await engine.forward_log_probs("你好", [stream.result.token_ids])
    result = stream.result
    assert result == decode_alone(model, source_ids(model, "你好"), options)
    assert [p.token_id for p in pieces] == result.token_ids
    assert [p.log_prob for p in pieces] == result.log_probs
    assert "".join(p.text for p in pieces) == result.text
    for entry in result.log_probs:
        assert len(entry.top) == 2 and entry.top[0][1] >= entry.top[1][1]
        assert entry.log_prob <= entry.top[0][1] <= 0  # greedy: the best is the chosen one
        assert entry.top[0][0] == entry.token_id
    # no scoring graph in a folder without one; else one log-prob per token
    assert scored is None  # the engine above was made without the folder's sources


async def test_cancelling_a_stream_consumer_frees_its_slot(model):
    engine = Engine(model, max_batch_size=1)
    await engine.start()
    try:
        started = asyncio.Event()
        hog = asyncio.create_task(_hog(engine, started))
        await asyncio.wait_for(started.wait(), 10)
        waiting = asyncio.create_task(engine.generate("晚安", max_length=5))
        await _until(lambda: engine.stats.queue_size == 1)
        await asyncio.sleep(0.05)
        assert not waiting.done() and engine.stats.active == 1  # the hog holds the only slot
        hog.cancel()
        result = await asyncio.wait_for(waiting, 10)
        assert 1 <= len(result.token_ids) <= 5
        assert engine.stats.requests_cancelled == 1
        await _until(lambda: engine.stats.active == 0)
    finally:
        await engine.stop()


async def test_cancelling_generate_or_leaving_the_loop_frees_the_slot(model):
    async with running(model) as engine:
        task = asyncio.create_task(engine.generate("你好", **ENDLESS))
        await _until(lambda: engine.stats.active == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _until(lambda: engine.stats.active == 0)

        async for _ in engine.stream("你好", **ENDLESS):
            break
        await _until(lambda: engine.stats.active == 0)
        assert engine.stats.requests_cancelled == 2


async def test_overloaded_past_the_queue_bound(model):
    engine = Engine(model, max_batch_size=1, max_queue=2)
    await engine.start()
    try:
        started = asyncio.Event()
        hog = asyncio.create_task(_hog(engine, started))
        await asyncio.wait_for(started.wait(), 10)
        queued = [asyncio.create_task(engine.generate("晚安", max_length=3)) for _ in range(2)]
        await _until(lambda: engine.stats.queue_size == 2)
        with pytest.raises(Overloaded, match="queue is full"):
            await engine.generate("你好")
        with pytest.raises(Overloaded):
            async for _ in engine.stream("你好"):
                pass
        assert engine.stats.overloaded_total == 2
        hog.cancel()
        for result in await asyncio.gather(*queued):
            assert len(result.token_ids) <= 3
    finally:
        await engine.stop()


async def _hog_in(engine: Engine, lane: str, started: asyncio.Event) -> None:
    async for _ in engine.stream("你好", lane=lane, **ENDLESS):
        started.set()


async def test_lanes_keep_their_queue_and_their_rows(model):
    # Two rows, one place in each lane's queue: a flood of "api" requests takes its row
    # and its place, is refused past them, and a "chat" reply still runs beside it.
    lanes = {"chat": Lane(rows=1, queue=1), "api": Lane(rows=1, queue=1)}
    engine = Engine(model, max_batch_size=2, max_queue=2, lanes=lanes)
    await engine.start()
    try:
        started = asyncio.Event()
        hog = asyncio.create_task(_hog_in(engine, "api", started))
        await asyncio.wait_for(started.wait(), 10)
        queued = asyncio.create_task(engine.generate("晚安", lane="api", max_length=3))
        await _until(lambda: engine.stats.queue_size == 1)
        with pytest.raises(Overloaded, match="lane 'api'"):
            await engine.generate("你好", lane="api")
        # the api lane's second row would be the chat lane's reserve: not lent
        assert engine.stats.active == 1 and not queued.done()
        reply = await engine.generate("你好", lane="chat", max_length=5)
        assert 0 < len(reply.token_ids) <= 5 and not hog.done()
        with pytest.raises(ValueError, match="unknown lane"):
            await engine.generate("你好", lane="web")
        hog.cancel()
        assert len((await queued).token_ids) <= 3
    finally:
        await engine.stop()


async def test_costly_word_lists_in_one_lane_do_not_delay_the_other(model):
    # Each new suppress list is a vocabulary scan (about 0.6 s for 16 words of 16
    # characters): eight of them in the api lane, then a chat request, which is made in
    # its own lane's thread and answered before the api lane has finished its second.
    lanes = {"chat": Lane(rows=4, queue=16), "api": Lane(rows=4, queue=16)}
    async with running(model, max_batch_size=8, lanes=lanes) as engine:
        costly = [asyncio.create_task(engine.generate("你好", lane="api", max_length=2,
                  suppress_words=[f"{i}{j:02d}" + "词" * 13 for j in range(16)]))
                  for i in range(8)]
        await asyncio.sleep(0.05)  # the first scan under way
        reply = await engine.generate("晚安", lane="chat", max_length=3)
        assert reply.token_ids
        assert engine.stats.requests_total - 1 < 2  # api requests made ready so far
        for task in costly:
            task.cancel()
        await asyncio.gather(*costly, return_exceptions=True)
        # the scan already under way runs to its end: wait for it, not the next test
        await asyncio.get_running_loop().run_in_executor(engine._preparers["api"], int)


async def test_chosen_replies_under_way_are_bounded_per_lane(model):
    # Retrieval and scoring queue outside the batch: a lane has at most its queue cap
    # of chosen replies under way, so those queues are bounded too.
    from serve.runtime.replies import ReplySources

    sources = ReplySources.load(model, intra_op_num_threads=1)
    lanes = {"chat": Lane(rows=2, queue=1), "api": Lane(rows=2, queue=1)}
    async with running(model, max_batch_size=4, lanes=lanes, sources=sources) as engine:
        hybrid = {"reply_mode": "hybrid", "max_length": 5}
        first = asyncio.create_task(engine.generate("你好", lane="chat", **hybrid))
        await asyncio.sleep(0)  # under way
        with pytest.raises(Overloaded, match="replies being chosen"):
            await engine.generate("晚安", lane="chat", **hybrid)
        other = await engine.generate("晚安", lane="api", **hybrid)  # its own bound
        assert other.text and (await first).text
        assert (await engine.generate("晚安", lane="chat", **hybrid)).text  # freed


async def test_seeded_sampling_reproduces_through_the_engine(model):
    async with running(model) as engine:
        options = DecodingOptions(sampling_topk=0, sampling_temperature=1.3, seed=42, max_length=20)
        # One after the other: concurrent rows of the int8 model share their activations'
        # quantization scale, so only the fp32 test above can promise equality in a batch.
        first = await engine.generate("你好", options)
        second = await engine.generate("你好", options)
        assert first == second


async def test_beam_runs_beside_the_batch_and_returns_the_n_best(model):
    async with running(model) as engine:
        options = DecodingOptions(beam_size=4, num_hypotheses=3, return_scores=True)
        greedy, beam = await asyncio.gather(
            engine.generate("今天天气怎么样", max_length=10),
            engine.generate("今天天气怎么样", options),
        )
        assert beam == beam_search(model, source_ids(model, "今天天气怎么样"), options)
        assert len(beam.hypotheses) == 3
        stream = engine.stream("今天天气怎么样", options)
        assert [d async for d in stream] == [beam.text]
        assert greedy.finish_reason in ("stop", "length")


async def test_bad_requests_are_value_errors(model):
    async with running(model) as engine:
        with pytest.raises(ValueError, match="empty"):
            await engine.generate("  ")
        with pytest.raises(ValueError, match="unknown decoding option"):
            await engine.generate("你好", temperature=0.7)
        with pytest.raises(ValueError, match="sampling_topp"):
            async for _ in engine.stream("你好", sampling_topp=3):
                pass
        assert engine.stats.active == 0 and engine.stats.queue_size == 0


async def test_a_bad_message_to_a_chosen_reply_is_its_own_value_error(model):
    # Retrieval and the proposals both read the message: one ValueError, not the group
    # of the two that the task group gathers.
    from serve.runtime.replies import ReplySources

    sources = ReplySources.load(model, intra_op_num_threads=1)
    async with running(model, sources=sources) as engine:
        for options in ({"reply_mode": "hybrid"}, {"reply_mode": "generate",
                                                    "generated_candidates": 2,
                                                    "sampling_topk": 0}):
            with pytest.raises(ValueError, match="empty after normalization"):
                await engine.generate("  ", **options)
            with pytest.raises(ValueError, match="empty after normalization"):
                async for _ in engine.stream("  ", **options):
                    pass
        assert (await engine.generate("你好", reply_mode="hybrid", max_length=5)).text


async def test_not_started_and_stopped_engines_refuse(model):
    engine = Engine(model, max_batch_size=1)
    with pytest.raises(EngineStopped, match="start"):
        await engine.generate("你好")
    await engine.start()
    started = asyncio.Event()
    hog = asyncio.create_task(_hog(engine, started))
    await asyncio.wait_for(started.wait(), 10)
    waiting = asyncio.create_task(engine.generate("晚安"))
    await _until(lambda: engine.stats.queue_size == 1)
    await engine.stop()
    for task in (hog, waiting):
        with pytest.raises(EngineStopped):
            await task


async def test_a_new_request_joins_the_running_batch(model):
    async with running(model, max_batch_size=4) as engine:
        started = asyncio.Event()
        hog = asyncio.create_task(_hog(engine, started))
        await asyncio.wait_for(started.wait(), 10)
        steps_before, tokens_before = engine.stats.steps_total, engine.stats.tokens_total
        result = await asyncio.wait_for(engine.generate("晚安", min_length=3, max_length=3), 10)
        assert len(result.token_ids) == 3 and result.finish_reason == "length"
        # Its 3 tokens rode on the hog's steps: 3 of the steps meanwhile had two rows (the
        # hog steps on while the newcomer is prepared, so the count of steps says nothing).
        steps = engine.stats.steps_total - steps_before
        assert engine.stats.tokens_total - tokens_before == steps + 3
        assert not hog.done() and engine.stats.active == 1
        hog.cancel()


async def test_cancelling_a_beam_frees_the_beam_slot(model):
    async with running(model) as engine:
        endless_beam = asyncio.create_task(engine.generate("你好", beam_size=3, **ENDLESS))
        await _until(lambda: engine.stats.beams_running == 1)
        waiting = asyncio.create_task(engine.generate("晚安", beam_size=2, max_length=4))
        await _until(lambda: engine.stats.queue_size == 1)
        endless_beam.cancel()
        result = await asyncio.wait_for(waiting, 10)
        assert len(result.hypotheses) == 1 and len(result.token_ids) <= 4
        assert engine.stats.requests_cancelled == 1 and engine.stats.beams_running == 0
        with pytest.raises(asyncio.CancelledError):
            await endless_beam


def test_engine_limits_must_be_positive(model):
    with pytest.raises(ValueError, match="max_queue must be >= 1"):
        Engine(model, max_queue=0)


async def test_steps_run_back_to_back_while_the_event_loop_is_busy(model):
    # The scheduler's thread steps on its own: a blocked event loop delays the pieces,
    # not the decoding (before, each step waited for the loop to start the next).
    import time

    async with running(model, max_batch_size=2) as engine:
        started = asyncio.Event()
        hog = asyncio.create_task(_hog(engine, started))
        await asyncio.wait_for(started.wait(), 10)
        row = engine._scheduler.active[0]
        before = len(row.decoder.token_ids)
        time.sleep(0.2)  # the event loop blocked: no callback runs meanwhile
        assert len(row.decoder.token_ids) - before >= 10
        hog.cancel()
        await _until(lambda: engine.stats.active == 0)


async def test_generate_gets_its_reply_in_one_event(model):
    async with running(model) as engine:
        request = engine._submit("你好", DecodingOptions(min_length=6, max_length=6),
                                 None, False)
        kind, result = await asyncio.wait_for(request.events.get(), 10)
        assert kind == "done" and len(result.token_ids) == 6 and request.events.empty()


async def test_a_failing_step_fails_its_rows_not_the_scheduler(model):
    async with running(model) as engine:
        step = engine._batch.step

        def broken(newcomers, rows):  # one step fails (an onnxruntime error, say)
            engine._batch.step = step
            raise RuntimeError("the step broke")

        engine._batch.step = broken
        with pytest.raises(RuntimeError, match="the step broke"):
            await asyncio.wait_for(engine.generate("你好", max_length=3), 10)
        assert engine.stats.requests_failed == 1 and engine.stats.active == 0
        assert (await asyncio.wait_for(engine.generate("你好", max_length=3), 10)).token_ids


async def test_a_hung_step_shows_as_stalled_and_a_stop_still_ends(model, monkeypatch):
    from serve.runtime import scheduler

    monkeypatch.setattr(scheduler, "STOP_SECONDS", 1.0)
    release = threading.Event()
    engine = Engine(model)
    await engine.start()
    assert engine.stalled_seconds() == 0  # waiting for requests is not a stall
    await engine.generate("你好", max_length=3)
    step = engine._batch.step

    def hung(newcomers, rows):  # a step that never ends (a stuck kernel, say)
        release.wait(30)
        return step(newcomers, rows)

    engine._batch.step = hung
    request = asyncio.create_task(engine.generate("你好", max_length=3))
    await _until(lambda: engine.stalled_seconds() > 0.5)
    await asyncio.wait_for(engine.stop(), 5)  # ends, leaving the hung thread behind
    with pytest.raises(EngineStopped):
        await request
    release.set()


async def test_requests_still_being_prepared_end_cleanly(model):
    # The preparer hands nothing back but the request's events: a request cancelled
    # while its lane's thread is busy frees its place in the queue at once, and one
    # still waiting for that thread when the engine stops ends with EngineStopped.
    import threading

    lanes = {"api": Lane(rows=2, queue=2)}
    engine = Engine(model, max_batch_size=2, lanes=lanes)
    await engine.start()
    gate = threading.Event()
    engine._preparers["api"].submit(gate.wait)  # the lane's one thread held
    try:
        cancelled = asyncio.create_task(engine.generate("你好", max_length=3))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert engine.stats.queue_size == 0 and engine.stats.requests_cancelled == 1
        waiting = [asyncio.create_task(engine.generate(t, max_length=3)) for t in "嗯哈"]
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded):  # the two places: the cancelled one's is free
            await engine.generate("晚安", max_length=3)
        gate.set()
        for task in waiting:
            assert (await asyncio.wait_for(task, 10)).token_ids
        assert engine.stats.requests_total == 2 and engine.stats.queue_size == 0
        gate.clear()
        engine._preparers["api"].submit(gate.wait)
        stopped = asyncio.create_task(engine.generate("你好", max_length=3))
        await asyncio.sleep(0.01)
        stopping = asyncio.create_task(engine.stop())
        await asyncio.sleep(0.01)
        gate.set()
        await stopping
        with pytest.raises(EngineStopped):
            await asyncio.wait_for(stopped, 10)
    finally:
        gate.set()
        await engine.stop()


async def test_relay_hands_on_what_stream_yields_and_cancels(model):
    options = DecodingOptions(sampling_topk=0, sampling_temperature=1.3, seed=5, max_length=20)
    async with running(model) as engine:
        stream = engine.stream("你喜欢吃什么水果", options)
        pieces = [p async for p in stream.pieces()]
        events: list[tuple] = []
        done = asyncio.Event()

        def sink(kind, value):
            events.append((kind, value))
            if kind != "piece":
                done.set()

        engine.relay("你喜欢吃什么水果", options, sink)
        await asyncio.wait_for(done.wait(), 10)
        assert events == [*(("piece", p) for p in pieces), ("done", stream.result)]

        events.clear()
        cancel = engine.relay("你好", DecodingOptions(**ENDLESS), sink)
        await _until(lambda: events)
        cancel()
        await _until(lambda: engine.stats.active == 0)
        assert events and all(kind == "piece" for kind, _ in events)  # never ended there
        assert engine.stats.requests_cancelled == 1
        with pytest.raises(ValueError, match="relay"):
            engine.relay("你好", DecodingOptions(beam_size=2), sink)
