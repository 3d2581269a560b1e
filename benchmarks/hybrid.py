"""The cost of choosing a reply: hybrid vs generation-only, in one process, one run.

    python -m benchmarks.hybrid [--model DIR] [--concurrency 32] [--requests 256]

On a model folder with a reply index and scoring graphs (the shipped one), the engine
answers the same messages with the chat room's default generation settings twice: once
generation only (``reply_mode="generate"``, one sampled reply, streamed as it is decoded),
once hybrid (retrieved and generated candidates, scored in batches, the best streamed).
Each figure is measured at ``--concurrency`` concurrent requests, the two modes taking
turns for ``--rounds`` rounds; the median of the rounds' ratios is the cost of the hybrid
mode. Also measured: the cold start of the model folder (model,
index and scoring graphs loaded) and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.common import (
    DEFAULT_OUT,
    SHIPPED_MODEL,
    fmt,
    log,
    machine,
    machine_lines,
    percentile,
    run_loop,
    shown,
    write_results,
)
from serve.runtime.engine import Engine
from serve.runtime.model import OnnxSeq2Seq
from serve.runtime.options import DEFAULT_GENERATION, DecodingOptions
from serve.runtime.replies import ReplySources

MESSAGES = Path(__file__).resolve().parent.parent / "data" / "everyday_messages.txt"


async def _load(engine: Engine, options: DecodingOptions, messages: list[str],
                concurrency: int, requests: int) -> dict:
    """``requests`` replies, ``concurrency`` at a time: replies/s and full-reply latency."""
    latencies: list[float] = []
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with gate:
            started = time.perf_counter()
            async for _ in engine.stream(messages[i % len(messages)],
                                         replace(options, seed=i)):
                pass
            latencies.append(time.perf_counter() - started)

    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one(i) for i in range(requests)))
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {"replies_per_s": requests / seconds, "seconds": seconds, "latencies": latencies,
            "cpu_ms_per_reply": 1000 * cpu / requests}


def _pooled(points: list[dict]) -> dict:
    """Several rounds' points of one mode as one: replies over seconds, every latency."""
    latencies = [x for p in points for x in p.pop("latencies")]
    seconds, replies = sum(p["seconds"] for p in points), len(latencies)
    return {"replies_per_s": replies / seconds, "seconds": seconds,
            "p50_ms": 1000 * percentile(latencies, 50), "p99_ms": 1000 * percentile(latencies, 99),
            "cpu_ms_per_reply": sum(p["cpu_ms_per_reply"] for p in points) / len(points),
            "rounds": [round(p["replies_per_s"], 1) for p in points]}


async def measure(model_dir: Path, concurrency: int, requests: int, threads: int,
                  rounds: int = 3) -> dict:
    """The two modes take turns, ``rounds`` times (the one that goes first alternates): the
    machine's speed drifts within seconds, and a ratio of two points measured minutes apart
    would carry the drift. The ratio is the median of the rounds' ratios."""
    started = time.perf_counter()
    model = OnnxSeq2Seq.load(model_dir, intra_op_num_threads=threads)
    sources = ReplySources.load(model, intra_op_num_threads=threads)
    if sources.index is None or sources.scorer is None:
        raise SystemExit(f"{model_dir}: no reply index or scoring graph to measure")
    engine = Engine(model, max_batch_size=32, max_queue=4 * requests, sources=sources)
    await engine.start()  # jieba's dictionary and the first session runs
    cold_start = time.perf_counter() - started
    messages = [m for m in MESSAGES.read_text(encoding="utf-8").splitlines() if m.strip()]
    base = DecodingOptions(**(model.manifest.generation or DEFAULT_GENERATION))
    modes = {"generate": replace(base, reply_mode="generate", generated_candidates=1),
             "hybrid": replace(base, reply_mode="hybrid")}
    points: dict[str, list[dict]] = {mode: [] for mode in modes}
    try:
        await _load(engine, modes["generate"], messages, 4, 16)  # warm
        calls = engine._scoring.calls
        for turn in range(rounds):
            for mode in (modes if turn % 2 == 0 else list(modes)[::-1]):
                log(f"round {turn + 1}, {mode}: {requests} replies, {concurrency} at a time")
                points[mode].append(await _load(engine, modes[mode], messages, concurrency,
                                                requests))
        calls = engine._scoring.calls - calls
    finally:
        await engine.stop()
    ratios = sorted(h["replies_per_s"] / g["replies_per_s"]
                    for g, h in zip(points["generate"], points["hybrid"], strict=True))
    figures = {mode: _pooled(p) for mode, p in points.items()}
    figures["scoring_calls"] = calls / rounds  # per round's hybrid replies
    figures["cold_start_s"] = cold_start
    figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    figures["ratio"] = ratios[len(ratios) // 2]
    figures["round_ratios"] = [round(r, 3) for r in ratios]
    return figures


def report(data: dict, command: str) -> str:
    g, h = data["figures"]["generate"], data["figures"]["hybrid"]
    f = data["figures"]
    return "\n".join([
        "## The hybrid mode's cost (in-process engine)", "",
        f"`{command}`", "",
        f"model `{data['model']}`, {data['concurrency']} concurrent requests, "
        f"{data['requests']} replies per mode and round, the modes taking turns for "
        f"{len(f['round_ratios'])} rounds; the folder's default generation settings", "",
        "| mode | replies/s (all rounds) | each round | p50 full reply (ms) | "
        "p99 full reply (ms) | process CPU ms/reply |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
        *(f"| {name} | {fmt(m['replies_per_s'])} | {', '.join(map(str, m['rounds']))} | "
          f"{fmt(m['p50_ms'])} | {fmt(m['p99_ms'])} | {m['cpu_ms_per_reply']:.2f} |"
          for name, m in (("generation only", g), ("hybrid", h))),
        "",
        f"- hybrid / generation-only replies/s: {f['ratio']:.2f}, the median of the rounds' "
        f"{', '.join(f'{r:.2f}' for r in f['round_ratios'])} (target >= 0.40)",
        f"- scoring calls for {data['requests']} hybrid replies: {f['scoring_calls']:.0f}",
        f"- cold start (model, index, scoring graphs, first run): {f['cold_start_s']:.2f} s",
        f"- peak RSS of this process: {f['peak_rss_mb']:.0f} MB (the benchmark's own process:"
        " see the http figures for one server's)",
    ])


def run(args) -> tuple[str, dict]:
    """``python -m benchmarks all``'s hybrid figures (markdown, data)."""
    command = (f"python -m benchmarks.hybrid --model {shown(args.model)} --concurrency 32 "
               f"--requests {args.hybrid_requests} --threads {args.threads}")
    figures = run_loop(measure(args.model, 32, args.hybrid_requests, args.threads))
    data = {"model": Path(args.model).name, "concurrency": 32,
            "requests": args.hybrid_requests, "figures": figures, "command": command}
    return report(data, command), data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.hybrid", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=SHIPPED_MODEL, help="model folder")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    p.add_argument("--rounds", type=int, default=3, help="turns of the two modes")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    command = "python -m benchmarks.hybrid " + " ".join(argv if argv is not None
                                                       else sys.argv[1:])
    info = machine()
    figures = run_loop(measure(args.model, args.concurrency, args.requests, args.threads,
                               args.rounds))
    data = {"machine": info, "model": args.model.name, "concurrency": args.concurrency,
            "requests": args.requests, "figures": figures, "command": command.strip()}
    text = "\n".join(["# xiaoX benchmarks", "", *machine_lines(info), "",
                      report(data, command.strip())])
    write_results(args.out, "hybrid", text, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
