"""Decoding speed, as ratios measured in one run on the same weights and inputs.

    python -m benchmarks.decoding --checkpoint CHECKPOINT_DIR

1. Per-reply latency, greedy and beam 5: onnxruntime int8 vs onnxruntime fp32 vs a
   TensorFlow step loop (the model's ``decode_step`` under ``tf.function``). All three
   go through the same numpy search code (``serve/decoding.py``); only the step differs.
2. Replies per second with continuous batching (``Engine(max_batch_size=32)``) vs one
   request at a time (``Engine(max_batch_size=1)``), at 1, 8 and 32 concurrent requests.

The checkpoint is exported to fp32 and int8 in a temporary folder first. Prints a
markdown table with the machine and the command.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from serve.decoding import (  # noqa: E402
    DecodingOptions,
    GenerationResult,
    beam_search,
    decode_alone,
    source_ids,
)
from serve.engine import Engine  # noqa: E402
from serve.model import EncoderState, OnnxSeq2Seq, StepOutput  # noqa: E402


class TensorFlowSteps:
    """The checkpoint's TensorFlow model behind OnnxSeq2Seq's interface (encode, step),
    through the very ``tf.function``s export converts, so the search code is shared."""

    def __init__(self, onnx_model: OnnxSeq2Seq, checkpoint: Path):
        from export.graphs import decoder_function, encoder_function
        from training.checkpoint import load_checkpoint

        tf_model, _, _ = load_checkpoint(checkpoint)
        self._encode = encoder_function(tf_model)
        self._step = decoder_function(tf_model)
        for name in ("tokenizer", "pad_id", "unk_id", "bos_id", "eos_id", "vocab_size"):
            setattr(self, name, getattr(onnx_model, name))
        self.hidden_dim = onnx_model.hidden_dim
        self.ids_containing = onnx_model.ids_containing

    def encode(self, src_ids: list[list[int]]) -> EncoderState:
        longest = max(len(r) for r in src_ids)
        ids = np.full((len(src_ids), longest), self.pad_id, np.int64)
        for i, row in enumerate(src_ids):
            ids[i, : len(row)] = row
        lengths = np.array([len(r) for r in src_ids], np.int64)
        out = {k: v.numpy() for k, v in self._encode(ids, lengths).items()}
        mask = (np.arange(longest)[None, :] < lengths[:, None]).astype(np.float32)
        return EncoderState(out["memory"], out["memory_keys"], mask, out["h0"], out["c0"])

    def step(self, prev_ids, h, c, memory, memory_keys, src_mask) -> StepOutput:
        out = self._step(np.asarray(prev_ids, np.int64), h, c, memory, memory_keys, src_mask)
        out = {k: v.numpy() for k, v in out.items()}
        return StepOutput(out["log_probs"], out["h_out"], out["c_out"], out["attention"])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, {platform.system()} {platform.release()}"


def questions_of(checkpoint: Path, limit: int) -> list[str]:
    lines = (checkpoint / "valid.tsv").read_text(encoding="utf-8").splitlines()
    questions = [line.split("\t", 1)[0] for line in lines if line.strip()]
    return questions[:limit]


def time_replies(
    decode: Callable[[list[int]], GenerationResult], sources: list[list[int]]
) -> tuple[list[float], list[int]]:
    for src in sources[:2]:  # warm-up: graph optimisation, tf.function tracing
        decode(src)
    seconds, tokens = [], []
    for src in sources:
        started = time.perf_counter()
        result = decode(src)
        seconds.append(time.perf_counter() - started)
        tokens.append(len(result.token_ids))
    return seconds, tokens


async def replies_per_second(
    model: OnnxSeq2Seq, questions: list[str], options: DecodingOptions, *,
    concurrent: int, batch: int, replies: int,
) -> float:  # fmt: skip
    engine = Engine(model, max_batch_size=batch, max_queue=max(256, concurrent))
    await engine.start()
    pending = iter(range(replies))

    async def client() -> None:
        for i in pending:
            await engine.generate(questions[i % len(questions)], options)

    try:
        await engine.generate(questions[0], options)  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrent)))
        return replies / (time.perf_counter() - started)
    finally:
        await engine.stop()


async def identical_to_alone(
    model: OnnxSeq2Seq, questions: list[str], options: DecodingOptions
) -> tuple[int, int]:
    """How many of len(questions) concurrent replies equal the same request decoded alone
    (fp32: all of them; int8 quantizes activations over the whole batch)."""
    engine = Engine(model, max_batch_size=32)
    await engine.start()
    try:
        batched = await asyncio.gather(*(engine.generate(q, options) for q in questions))
    finally:
        await engine.stop()
    alone = [decode_alone(model, source_ids(model, q), options) for q in questions]
    same = sum(a.token_ids == b.token_ids for a, b in zip(batched, alone, strict=True))
    return same, len(questions)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.decoding",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="a training checkpoint folder")
    p.add_argument("--questions", type=int, default=30, help="held-out questions to answer")
    p.add_argument("--max-length", type=int, default=30, help="reply tokens at most")
    p.add_argument("--min-length", type=int, default=1, help="reply tokens at least")
    p.add_argument("--replies", type=int, default=96, help="replies per throughput point")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads, ORT and TF alike")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args.command = "python -m benchmarks.decoding " + shlex.join(argv)

    import tensorflow as tf

    from export import export_model

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    questions = questions_of(args.checkpoint, args.questions)
    lengths = {"min_length": args.min_length, "max_length": args.max_length}
    greedy = DecodingOptions(**lengths)
    beam = DecodingOptions(beam_size=5, **lengths)

    with tempfile.TemporaryDirectory() as tmp:
        models: dict[str, OnnxSeq2Seq] = {}
        for quantize in ("int8", "none"):
            out = Path(tmp, quantize)
            print(f"exporting {quantize} ...", file=sys.stderr)
            export_model(args.checkpoint, out, quantize=quantize, check_samples=20)
            models[quantize] = OnnxSeq2Seq.load(out, intra_op_num_threads=args.threads)
        int8 = models["int8"]
        backends = {
            "onnxruntime int8": int8,
            "onnxruntime fp32": models["none"],
            "TensorFlow step loop": TensorFlowSteps(int8, args.checkpoint),
        }
        sources = [source_ids(int8, q) for q in questions]
        latency = {}
        for name, model in backends.items():
            print(f"timing {name} ...", file=sys.stderr)
            latency[name] = (
                time_replies(lambda s, m=model: decode_alone(m, s, greedy), sources),  # type: ignore[arg-type]
                time_replies(lambda s, m=model: beam_search(m, s, beam), sources),  # type: ignore[arg-type]
            )
        throughput = {}
        for concurrent in (1, 8, 32):
            print(f"throughput at {concurrent} concurrent ...", file=sys.stderr)
            throughput[concurrent] = [
                asyncio.run(
                    replies_per_second(
                        int8,
                        questions,
                        greedy,
                        concurrent=concurrent,
                        batch=batch,
                        replies=args.replies,
                    )
                )
                for batch in (1, 32)
            ]
        identical = {
            name: asyncio.run(identical_to_alone(models[q], questions, greedy))
            for name, q in (("int8", "int8"), ("fp32", "none"))
        }
        print(report(args, int8, questions, latency, throughput, identical))
    return 0


def _ms(seconds: list[float]) -> str:
    return f"{1000 * statistics.median(seconds):.1f}"


def report(args, model: OnnxSeq2Seq, questions, latency, throughput, identical) -> str:
    import onnxruntime
    import tensorflow as tf

    dims = model.manifest.dims
    tf_greedy = statistics.median(latency["TensorFlow step loop"][0][0])
    tf_beam = statistics.median(latency["TensorFlow step loop"][1][0])
    lines = [
        "### Decoding speed",
        "",
        f"- machine: {machine()}",
        f"- onnxruntime {onnxruntime.__version__}, TensorFlow {tf.__version__}, "
        f"{args.threads} intra-op thread(s) for both",
        f"- model: vocab {dims['vocab_size']}, embed {dims['embed_dim']}, "
        f"hidden {dims['hidden_dim']}; {len(questions)} held-out questions; "
        f"min_length {args.min_length}, max_length {args.max_length}",
        f"- command: `{args.command}`",
        "",
        "Per reply, p50 ms (same search code, only the decoder step differs):",
        "",
        "| backend | greedy | beam 5 | tokens/reply (greedy) | vs TF greedy | vs TF beam 5 |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, ((g_sec, g_tok), (b_sec, _)) in latency.items():
        lines.append(
            f"| {name} | {_ms(g_sec)} | {_ms(b_sec)} | {statistics.mean(g_tok):.1f} | "
            f"{tf_greedy / statistics.median(g_sec):.1f}x | "
            f"{tf_beam / statistics.median(b_sec):.1f}x |"
        )
    lines += [
        "",
        f"Replies/s, greedy, onnxruntime int8, {args.replies} replies per point:",
        "",
        "| concurrent requests | one at a time | continuous batching | speedup |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for concurrent, (serial, batched) in throughput.items():
        lines.append(f"| {concurrent} | {serial:.1f} | {batched:.1f} | {batched / serial:.1f}x |")
    lines += [
        "",
        f"{len(questions)} concurrent greedy replies identical to the same request alone: "
        + ", ".join(f"{name} {same}/{total}" for name, (same, total) in identical.items()),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
