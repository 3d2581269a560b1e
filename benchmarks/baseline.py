"""The baseline in the original's architecture, behind the same HTTP routes as ours.

The original rebuilt a TensorFlow model and decoded one request at a time. Here the
real server (``python -m serve run``) runs with its ``engine`` setting naming
``TensorFlowEngine``: the checkpoint's TensorFlow model stepped by a ``tf.function`` (the
same ``decode_step`` export converts), one request at a time under an ``asyncio.Lock``.
Routes, SSE framing, broker and tokenizer are the app's own, so a load client sees only
the engine differ. (This package never imports the web server: it starts it.)

    python -m benchmarks.baseline --checkpoint DIR --model MODEL_DIR --port 8001

``--model`` is the checkpoint's export (the app reads its tokenizer and manifest from
it); ``python -m benchmarks server --setups baseline`` starts this for you.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np

from training.environment import configure_tensorflow_environment  # noqa: E402

configure_tensorflow_environment()

from serve.runtime.engine import EngineStats, EngineStopped, Overloaded  # noqa: E402
from serve.runtime.options import DecodingOptions  # noqa: E402
from serve.runtime.rules import TokenRules  # noqa: E402
from serve.runtime.search import (  # noqa: E402
    GenerationResult,
    SequenceDecoder,
    make_rng,
    source_ids,
    text_delta,
)

CHECKPOINT_ENV = "XIAOX_BENCH_CHECKPOINT"
THREADS_ENV = "XIAOX_BENCH_TF_THREADS"


class _TensorFlowStream:
    """``async for delta in stream``; ``result`` after the loop (what the app reads)."""

    def __init__(self, engine: TensorFlowEngine, text: str, options: DecodingOptions):
        self._engine, self._text, self._options = engine, text, options
        self.result: GenerationResult | None = None

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[str]:
        engine = self._engine
        if not engine.running:
            raise EngineStopped("the engine is not running")
        if engine.waiting >= engine.max_queue:
            engine.stats.overloaded_total += 1
            raise Overloaded(f"the request queue is full ({engine.max_queue} waiting)")
        model, steps = engine.model, engine.steps
        src = source_ids(model, self._text)
        engine.stats.requests_total += 1
        engine.waiting += 1
        engine.stats.queue_size = engine.waiting
        try:
            await engine.lock.acquire()  # one request at a time, like the original
        finally:
            engine.waiting -= 1
            engine.stats.queue_size = engine.waiting
        try:
            engine.stats.active = 1
            decoder = SequenceDecoder(TokenRules.for_model(model, self._options),
                                      make_rng(self._options.seed))
            state = await asyncio.to_thread(steps.encode, [src])
            prev, h, c = np.array([model.bos_id], np.int64), state.h, state.c
            last_piece = ""
            while not decoder.done:
                out = await asyncio.to_thread(steps.step, prev, h, c, state.memory,
                                              state.memory_keys, state.src_mask)
                token = decoder.advance(out.log_probs[0])
                engine.stats.tokens_total += 1
                engine.stats.steps_total += 1
                prev, h, c = np.array([token], np.int64), out.h, out.c
                if token != model.eos_id:
                    piece = model.tokenizer.id_to_piece(token)
                    delta = text_delta(last_piece, piece)
                    last_piece = piece
                    if delta:
                        yield delta
            self.result = decoder.result(model)
            engine.stats.requests_finished += 1
        finally:
            engine.stats.active = 0
            if self.result is None:
                engine.stats.requests_cancelled += 1
            engine.lock.release()


class TensorFlowEngine:
    """``serve.runtime.engine.Engine``'s interface as the app uses it (start, stop, running,
    stream, generate, stats, model), decoding through TensorFlow one request at a time.

    The app constructs it as ``Engine(model, max_batch_size=..., max_queue=...,
    on_metric=...)``; ``model`` (the ONNX export of the same checkpoint) provides the
    tokenizer and vocabulary, the checkpoint (``XIAOX_BENCH_CHECKPOINT``) the weights.
    """

    def __init__(self, model, *, max_batch_size: int = 1, max_queue: int = 256,
                 on_metric=None, **_ignored):
        import tensorflow as tf

        from benchmarks.decoding import TensorFlowSteps

        threads = int(os.environ.get(THREADS_ENV, "1"))
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        self.model = model
        self.max_batch_size = 1
        self.max_queue = max_queue
        self.steps = TensorFlowSteps(model, Path(os.environ[CHECKPOINT_ENV]))
        self.stats = EngineStats()
        self.lock = asyncio.Lock()
        self.waiting = 0
        self._running = False

    @property
    def running(self) -> bool:
        return self._running

    async def start(self) -> None:
        # Trace the tf.functions and load jieba before the first request, as ours does.
        await asyncio.to_thread(self.model.tokenizer.encode, "你好")
        warm = DecodingOptions(min_length=2, max_length=2)
        self._running = True
        await self.generate("你好", warm)

    async def stop(self) -> None:
        self._running = False

    def stream(self, text: str, options: DecodingOptions | None = None,
               **kwargs) -> _TensorFlowStream:
        options = options if options is not None else DecodingOptions.from_kwargs(**kwargs)
        if options.beam_size > 1:
            raise ValueError("the baseline decodes greedily (or sampling), not beam search")
        return _TensorFlowStream(self, text, options)

    async def generate(self, text: str, options: DecodingOptions | None = None,
                       **kwargs) -> GenerationResult:
        stream = self.stream(text, options, **kwargs)
        async for _ in stream:
            pass
        assert stream.result is not None
        return stream.result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.baseline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="training checkpoint folder")
    p.add_argument("--model", type=Path, required=True, help="that checkpoint's export")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--redis-url", help="the broker (default: in-process)")
    p.add_argument("--threads", type=int, default=1, help="TensorFlow intra-op threads")
    args = p.parse_args(argv)
    if not (args.checkpoint / "config.json").is_file():
        print(f"python -m benchmarks.baseline: {args.checkpoint} is not a checkpoint folder",
              file=sys.stderr)
        return 2
    env = {**os.environ, CHECKPOINT_ENV: str(args.checkpoint.resolve()),
           THREADS_ENV: str(args.threads),
           "XIAOX_ENGINE": "benchmarks.baseline:TensorFlowEngine"}  # not __main__'s
    command = [sys.executable, "-m", "serve", "run", "--model", str(args.model), "--host",
               "127.0.0.1", "--port", str(args.port), "--threads", str(args.threads),
               "--max-batch-size", "1"]
    command += ["--redis-url", args.redis_url] if args.redis_url else []
    os.execve(sys.executable, command, env)


if __name__ == "__main__":
    sys.exit(main())
