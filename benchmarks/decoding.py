"""Decoding speed, as ratios measured in one run on the same weights and inputs.

    python -m benchmarks decoding [--profile quick|full] [--checkpoint DIR]

1. Per decoder step (batch 1 and 32) and per reply (greedy and beam 5, replies forced to
   one length): onnxruntime int8 vs onnxruntime fp32 vs a TensorFlow step loop (the
   model's ``decode_step`` under ``tf.function``). The three share the numpy search code
   (``serve/runtime/search.py``); only the step differs.
2. The bound for one step, measured in the same run: bytes of decoder weights read per
   step / memory bandwidth (numpy sum of a large array), and FLOPs per step (the
   decoder's MatMul/Gemm shapes) / GEMM throughput (onnxruntime MatMul fp32 and
   MatMulInteger int8 at the same thread count; numpy's fp32 matmul for reference).
3. Replies per second with continuous batching (``Engine(max_batch_size=32)``) vs one
   request at a time (``Engine(max_batch_size=1)``), at 1, 8 and 32 concurrent requests.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from training.environment import configure_tensorflow_environment  # noqa: E402

configure_tensorflow_environment()

from benchmarks.common import (  # noqa: E402
    event_loop_name,
    fmt,
    log,
    questions_of,
    run_loop,
)
from serve.runtime.engine import Engine  # noqa: E402
from serve.runtime.model import EncoderState, OnnxSeq2Seq, StepOutput  # noqa: E402
from serve.runtime.options import DecodingOptions  # noqa: E402
from serve.runtime.search import (  # noqa: E402
    GenerationResult,
    beam_search,
    decode_alone,
    source_ids,
)

BACKENDS = ("onnxruntime int8", "onnxruntime fp32", "TensorFlow step loop")
STEP_BATCHES = (1, 32)


class TensorFlowSteps:
    """The checkpoint's TensorFlow model behind OnnxSeq2Seq's interface (encode, step),
    through the very ``tf.function``s export converts, so the search code is shared."""

    def __init__(self, onnx_model: OnnxSeq2Seq, checkpoint: Path):
        from export.graphs import decoder_function, encoder_function
        from training.checkpoint import load_checkpoint

        tf_model, _, _ = load_checkpoint(checkpoint, weights="best")  # what export exports
        self._encode = encoder_function(tf_model)
        self._step = decoder_function(tf_model)
        self._onnx = onnx_model

    def __getattr__(self, name: str):
        # Vocabulary, tokenizer and blocklist (what the search code reads): the ONNX model's.
        if name == "_onnx":
            raise AttributeError(name)
        return getattr(self._onnx, name)

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


# --- what the machine can do -------------------------------------------------------------

def _best_seconds(run: Callable[[], object], repeats: int) -> float:
    run()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def read_bandwidth(megabytes: float, repeats: int) -> float:
    """GB/s of one thread reading an array of this size again and again (a max over its
    64-bit words: every byte is read, the arithmetic is trivial). Arrays that fit in the
    caches read faster: measure at the size of what a step reads."""
    words = np.ones(max(1024, int(megabytes * 2**20) // 8), np.uint64)
    return words.nbytes / _best_seconds(lambda: words.max(), repeats) / 1e9


def _matmul_session(threads: int, int8: bool, m: int, k: int, n: int):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    if int8:
        weight = rng.integers(-127, 128, (k, n), dtype=np.int8)
        node = helper.make_node("MatMulInteger", ["a", "w"], ["y"])
        a_type, y_type = TensorProto.UINT8, TensorProto.INT32
    else:
        weight = rng.standard_normal((k, n)).astype(np.float32)
        node = helper.make_node("MatMul", ["a", "w"], ["y"])
        a_type, y_type = TensorProto.FLOAT, TensorProto.FLOAT
    graph = helper.make_graph(
        [node], "gemm", [helper.make_tensor_value_info("a", a_type, [m, k])],
        [helper.make_tensor_value_info("y", y_type, [m, n])],
        [onnx.numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    a = (rng.integers(0, 256, (m, k), dtype=np.uint8) if int8
         else rng.standard_normal((m, k)).astype(np.float32))
    return session, a


def gemm_throughput(threads: int, size: int, repeats: int) -> dict[str, float | None]:
    """GFLOP/s (GOP/s for int8) of a size x size x size matrix product."""
    flops = 2 * size**3
    result: dict[str, float | None] = {"size": size}
    a = np.random.default_rng(0).standard_normal((size, size)).astype(np.float32)
    result["numpy_fp32_gflops"] = flops / _best_seconds(lambda: a @ a, repeats) / 1e9
    for name, int8 in (("ort_fp32_gflops", False), ("ort_int8_gops", True)):
        try:
            session, x = _matmul_session(threads, int8, size, size, size)
            result[name] = flops / _best_seconds(
                lambda s=session, x=x: s.run(None, {"a": x}), repeats) / 1e9
        except Exception as e:  # an onnxruntime build without the kernel
            log(f"{name}: not measured ({e})")
            result[name] = None
    return result


# --- what one decoder step costs ---------------------------------------------------------

def initializer_bytes(model_path: Path) -> int:
    import onnx

    graph = onnx.load(str(model_path)).graph
    return sum(onnx.numpy_helper.to_array(t).nbytes for t in graph.initializer)


def matmul_flops(model_path: Path, feeds: dict[str, np.ndarray]) -> int:
    """2 x multiply-adds of every MatMul/Gemm/MatMulInteger/Einsum of the graph, with the
    shapes of one real run on ``feeds`` (every operand is fetched as an extra output)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(model_path))
    graph = model.graph
    initializers = {t.name: list(t.dims) for t in graph.initializer}
    nodes = [n for n in graph.node if n.op_type in ("MatMul", "MatMulInteger", "Gemm", "Einsum")]
    wanted = sorted({name for n in nodes for name in n.input[:2] if name not in initializers})
    graph.output.extend(onnx.ValueInfoProto(name=name) for name in wanted)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    values = session.run(wanted, {k: v for k, v in feeds.items() if k in names})
    shapes = {**initializers, **{name: list(v.shape) for name, v in zip(wanted, values,
                                                                         strict=True)}}
    total = 0
    for node in nodes:
        a, b = shapes[node.input[0]], shapes[node.input[1]]
        if node.op_type == "Einsum":
            equation = next(x.s.decode() for x in node.attribute if x.name == "equation")
            left = equation.split("->")[0].replace(" ", "").split(",")
            sizes = {}
            for letters, shape in zip(left, (a, b), strict=True):
                sizes.update(zip(letters, shape, strict=False))
            total += 2 * int(np.prod(list(sizes.values())))
        elif node.op_type == "Gemm":
            trans_a = any(x.name == "transA" and x.i for x in node.attribute)
            trans_b = any(x.name == "transB" and x.i for x in node.attribute)
            m, k = (a[1], a[0]) if trans_a else (a[0], a[1])
            n = b[0] if trans_b else b[1]
            total += 2 * m * k * n
        else:
            a2, b2 = ([1, *a] if len(a) == 1 else a), ([*b, 1] if len(b) == 1 else b)
            outer = np.broadcast_shapes(tuple(a2[:-2]), tuple(b2[:-2]))
            total += 2 * int(np.prod(outer or (1,))) * a2[-2] * a2[-1] * b2[-1]
    return total


def step_inputs(state: EncoderState, batch: int, bos_id: int) -> dict[str, np.ndarray]:
    """The decoder's inputs for ``batch`` rows (the first encoded question repeated)."""
    def rows(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.repeat(x[:1], batch, axis=0))

    return {"prev_ids": np.full(batch, bos_id, np.int64), "h": rows(state.h),
            "c": rows(state.c), "memory": rows(state.memory),
            "memory_keys": rows(state.memory_keys), "src_mask": rows(state.src_mask)}


def step_seconds(model, state: EncoderState, batch: int, steps: int) -> list[float]:
    """Latency of one decoder step at this batch size (the encoded question repeated)."""
    x = step_inputs(state, batch, model.bos_id)
    prev, h, c = x["prev_ids"], x["h"], x["c"]
    memory, keys, mask = x["memory"], x["memory_keys"], x["src_mask"]
    for _ in range(3):  # warm-up: graph optimisation, tf.function tracing
        model.step(prev, h, c, memory, keys, mask)
    seconds = []
    for _ in range(steps):
        started = time.perf_counter()
        out = model.step(prev, h, c, memory, keys, mask)
        seconds.append(time.perf_counter() - started)
        h, c = out.h, out.c
        prev = out.log_probs.argmax(axis=1).astype(np.int64)
    return seconds


def time_replies(decoders: dict[str, Callable[[list[int]], GenerationResult]],
                 sources: list[list[int]], rounds: int = 3) -> dict[str, tuple[list, list]]:
    """(seconds, tokens) per reply of each decoder: in ``rounds`` rounds, each decoder
    in turn replies to every source, so that all of them see the machine over the same
    stretch of time (its speed drifts by a third within seconds; a ratio of two figures
    measured a minute apart carries that drift). Turns of a whole pass, not of one reply:
    TensorFlow's pool threads spin for a while after each reply and would slow whatever
    came next."""
    for decode in decoders.values():
        for src in sources[:2]:  # warm-up
            decode(src)
    timed: dict[str, tuple[list, list]] = {name: ([], []) for name in decoders}
    for _ in range(rounds):
        for name, decode in decoders.items():
            for src in sources:
                started = time.perf_counter()
                result = decode(src)
                timed[name][0].append(time.perf_counter() - started)
                timed[name][1].append(len(result.token_ids))
    return timed


async def replies_per_second(model: OnnxSeq2Seq, questions: list[str],
                             options: DecodingOptions, *, concurrent: int, batch: int,
                             replies: int) -> float:
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


async def identical_to_alone(model: OnnxSeq2Seq, questions: list[str],
                             options: DecodingOptions) -> tuple[int, int]:
    """How many concurrent replies equal the same request decoded alone (fp32: all of
    them; int8 quantizes activations over the whole batch)."""
    engine = Engine(model, max_batch_size=32)
    await engine.start()
    try:
        batched = await asyncio.gather(*(engine.generate(q, options) for q in questions))
    finally:
        await engine.stop()
    alone = [decode_alone(model, source_ids(model, q), options) for q in questions]
    same = sum(a.token_ids == b.token_ids for a, b in zip(batched, alone, strict=True))
    return same, len(questions)


# --- the run -------------------------------------------------------------------------------

def _tensorflow_threads(threads: int) -> None:
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # TensorFlow already ran in this process (tests): keep its threads
        log("TensorFlow is already initialised: its thread settings are kept")


def typical_source(sources: list[list[int]]) -> list[int]:
    """The source whose length is closest to the mean length."""
    src_len = max(1, round(statistics.mean(len(s) for s in sources)))
    return min(sources, key=lambda s: abs(len(s) - src_len))


def step_costs(weights, fp32: OnnxSeq2Seq, typical: list[int]) -> tuple[dict, dict]:
    """FLOPs per step by batch size (from the fp32 graph: int8 does the same products)
    and decoder weight bytes per backend."""
    state = fp32.encode([typical])
    flops = {b: matmul_flops(weights.fp32_dir / "decoder.onnx",
                             step_inputs(state, b, fp32.bos_id)) for b in STEP_BATCHES}
    weight_bytes = {BACKENDS[0]: initializer_bytes(weights.int8_dir / "decoder.onnx"),
                    BACKENDS[1]: initializer_bytes(weights.fp32_dir / "decoder.onnx")}
    weight_bytes[BACKENDS[2]] = weight_bytes[BACKENDS[1]]
    return flops, weight_bytes


def measure_bandwidth(weight_bytes: dict[str, int], quick: bool, repeats: int) -> dict:
    log("measuring memory bandwidth ...")
    dram_mb = 256 if quick else 1024
    return {"dram_array_mb": dram_mb,
            "dram_gb_s": read_bandwidth(dram_mb, repeats),
            # The step reads the same weights every time: they stay in the caches when
            # they fit, so the bound uses the bandwidth at their size.
            "at_weights_gb_s": {name: read_bandwidth(size / 2**20, 5 * repeats)
                                for name, size in weight_bytes.items()}}


def time_backends(backends: dict, typical: list[int], sources: list[list[int]], steps: int,
                  greedy: DecodingOptions, beam: DecodingOptions) -> tuple[dict, dict]:
    """Per backend: step latencies by batch size, and (seconds, tokens) per reply kind
    (the backends' replies timed in turns: ``time_replies``)."""
    step_times: dict = {}
    for name, model in backends.items():
        log(f"timing {name}'s steps ...")
        state = model.encode([typical])
        step_times[name] = {b: step_seconds(model, state, b, steps) for b in STEP_BATCHES}
    replies: dict = {name: {} for name in backends}
    for kind, decode in (("greedy", lambda m, s: decode_alone(m, s, greedy)),
                         ("beam 5", lambda m, s: beam_search(m, s, beam))):
        log(f"timing {kind} replies, the backends in turns ...")
        timed = time_replies({name: (lambda s, m=model, d=decode: d(m, s))
                              for name, model in backends.items()}, sources)
        for name, figures in timed.items():
            replies[name][kind] = figures
    return step_times, replies


ENGINE_ROUNDS = 3  # the 32-concurrent batched point, each round between two step timings


def engine_throughput(model: OnnxSeq2Seq, questions: list[str], options: DecodingOptions,
                      replies: int, step_p50: Callable[[], float]) -> tuple[dict, dict]:
    """Replies/s at 1, 8 and 32 concurrent requests, one at a time and batched; and the
    batch-32 step's p50 (``step_p50``) timed just before and just after the 32-concurrent
    batched point, the baseline of the engine's share of the step rate: this machine's
    speed drifts by a third within seconds, so the two are measured together, in
    ``ENGINE_ROUNDS`` rounds, and the round of the median share is the one reported
    (every round is kept under ``rounds``)."""
    throughput: dict = {}
    around: dict = {"event_loop": event_loop_name()}
    for concurrent in (1, 8, 32):
        log(f"engine replies/s at {concurrent} concurrent ({around['event_loop']}) ...")
        throughput[concurrent] = {}
        for batch in (1, 32):
            if concurrent == 32 and batch == 32:
                rounds = [_engine_round(model, questions, options, replies, step_p50)
                          for _ in range(ENGINE_ROUNDS)]
                median = sorted(rounds, key=_share_of_steps)[len(rounds) // 2]
                throughput[concurrent][batch] = median["replies_per_s"]
                around.update(step_before_ms=median["step_before_ms"],
                              step_after_ms=median["step_after_ms"], rounds=rounds)
                continue
            throughput[concurrent][batch] = run_loop(replies_per_second(
                model, questions, options, concurrent=concurrent, batch=batch,
                replies=replies))
    return throughput, around


def _engine_round(model: OnnxSeq2Seq, questions: list[str], options: DecodingOptions,
                  replies: int, step_p50: Callable[[], float]) -> dict:
    """One 32-concurrent batched point between two timings of the batch-32 step."""
    before = 1e3 * step_p50()
    rate = run_loop(replies_per_second(model, questions, options, concurrent=32, batch=32,
                                       replies=replies))
    return {"replies_per_s": rate, "step_before_ms": before, "step_after_ms": 1e3 * step_p50()}


def _share_of_steps(round_: dict) -> float:
    """A round's replies/s over the step rate around it (the same reply length in all
    rounds, so the order is that of the tokens' share of the step's token rate)."""
    return round_["replies_per_s"] * (round_["step_before_ms"] + round_["step_after_ms"])


def step_figures(steps: dict, flops: dict, weight_bytes: dict, bandwidth: dict,
                 rates: dict) -> dict:
    """Per backend and batch size: the measured step and its bounds."""
    figures = {}
    for name in BACKENDS:
        per = {}
        for b in STEP_BATCHES:
            p50 = statistics.median(steps[name][b])
            size = weight_bytes[name]
            bytes_bound = size / (bandwidth["at_weights_gb_s"][name] * 1e9)
            flops_bound = flops[b] / (rates[name] * 1e9) if rates[name] else 0.0
            bound = max(bytes_bound, flops_bound)
            per[str(b)] = {"p50_ms": 1e3 * p50, "weight_bytes": size, "flops": flops[b],
                           "read_gb_s": bandwidth["at_weights_gb_s"][name],
                           "dram_bytes_bound_ms": 1e3 * size / (bandwidth["dram_gb_s"] * 1e9),
                           "bytes_bound_ms": 1e3 * bytes_bound,
                           "flops_bound_ms": 1e3 * flops_bound, "bound_ms": 1e3 * bound,
                           "percent_of_bound": 100 * bound / p50}
        figures[name] = per
    return figures


def reply_figures(replies: dict) -> dict:
    return {name: {kind: {"p50_ms": 1e3 * statistics.median(sec),
                          "p90_ms": 1e3 * float(np.percentile(sec, 90)),
                          "tokens_mean": statistics.mean(tok)}
                   for kind, (sec, tok) in per.items()}
            for name, per in replies.items()}


def run(args, weights, command: str) -> tuple[str, dict]:
    """Measure everything; (markdown, data)."""
    _tensorflow_threads(args.threads)
    quick = args.profile == "quick"
    questions = questions_of(weights.checkpoint, args.questions)
    forced = {"min_length": args.reply_tokens, "max_length": args.reply_tokens}
    greedy, beam = DecodingOptions(**forced), DecodingOptions(beam_size=5, **forced)

    repeats = 5 if quick else 10
    log("measuring GEMM throughput ...")
    gemm = gemm_throughput(args.threads, 512 if quick else 1024, repeats)

    int8 = OnnxSeq2Seq.load(weights.int8_dir, intra_op_num_threads=args.threads)
    fp32 = OnnxSeq2Seq.load(weights.fp32_dir, intra_op_num_threads=args.threads)
    backends = {BACKENDS[0]: int8, BACKENDS[1]: fp32,
                BACKENDS[2]: TensorFlowSteps(int8, weights.checkpoint)}
    sources = [source_ids(int8, q) for q in questions]
    typical = typical_source(sources)
    flops, weight_bytes = step_costs(weights, fp32, typical)
    bandwidth = measure_bandwidth(weight_bytes, quick, repeats)
    rates = {BACKENDS[0]: gemm["ort_int8_gops"] or gemm["ort_fp32_gflops"],
             BACKENDS[1]: gemm["ort_fp32_gflops"], BACKENDS[2]: gemm["ort_fp32_gflops"]}

    steps, replies = time_backends(backends, typical, sources, args.steps, greedy, beam)
    state = int8.encode([typical])
    throughput, around = engine_throughput(
        int8, questions, greedy, args.replies,
        lambda: statistics.median(step_seconds(int8, state, 32, args.steps)))
    identical = {name: run_loop(identical_to_alone(model, questions[:32], greedy))
                 for name, model in (("int8", int8), ("fp32", fp32))}

    data = {"command": command, "weights": weights.origin, "dims": weights.dims,
            "threads": args.threads, "reply_tokens": args.reply_tokens,
            "questions": len(questions), "source_tokens": len(typical),
            "memory_bandwidth": bandwidth, "gemm": gemm,
            "steps": step_figures(steps, flops, weight_bytes, bandwidth, rates),
            "replies": reply_figures(replies),
            "engine_replies_per_s": {str(c): {f"batch_{b}": v for b, v in t.items()}
                                     for c, t in throughput.items()},
            "engine_step_around": around,
            "identical_to_alone": {k: list(v) for k, v in identical.items()}}
    return report(data), data


# --- the report ----------------------------------------------------------------------------

def _header_lines(data: dict) -> list[str]:
    dims = data["dims"]
    return [
        "## Decoding",
        "",
        f"- weights: {data['weights']}; vocab {dims['vocab_size']}, embed "
        f"{dims['embed_dim']}, hidden {dims['hidden_dim']}",
        f"- {data['threads']} intra-op thread(s) for onnxruntime and TensorFlow alike; "
        f"{data['questions']} held-out questions; every reply forced to "
        f"{data['reply_tokens']} tokens (min_length = max_length); steps over a "
        f"{data['source_tokens']}-token question",
    ]


def _step_lines(data: dict, cmd: str) -> list[str]:
    lines = [
        "",
        "### One decoder step, and the bound for it",
        "",
        "Bound = max(weight bytes / read bandwidth at the weights' size, FLOPs / GEMM "
        "throughput), both measured in this run (below); % of bound = bound / measured "
        "p50 (100% = as fast as the machine allows). The weights are read every step and "
        "fit in the caches, so the bound uses the bandwidth measured over an array of "
        "their size; the DRAM column is the bound if they had to come from memory.",
        "",
        "| backend | batch | p50 ms | weight MB | MFLOP | bytes bound ms | DRAM bytes bound "
        "ms | FLOPs bound ms | % of bound | command |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, per in data["steps"].items():
        for b, s in per.items():
            lines.append(
                f"| {name} | {b} | {s['p50_ms']:.3f} | {s['weight_bytes'] / 1e6:.2f} | "
                f"{s['flops'] / 1e6:.1f} | {s['bytes_bound_ms']:.3f} | "
                f"{s['dram_bytes_bound_ms']:.3f} | {s['flops_bound_ms']:.3f} | "
                f"{s['percent_of_bound']:.0f}% | {cmd} |")
    return lines


def _machine_lines(data: dict, cmd: str) -> list[str]:
    bw, gemm = data["memory_bandwidth"], data["gemm"]
    lines = [
        "",
        "| machine figure (this run) | value | command |",
        "| --- | ---: | --- |",
        f"| read bandwidth, 1 thread, {bw['dram_array_mb']} MB array (DRAM) | "
        f"{bw['dram_gb_s']:.2f} GB/s | {cmd} |",
    ]
    for name, gbs in bw["at_weights_gb_s"].items():
        size = data["steps"][name]["1"]["weight_bytes"] / 1e6
        lines.append(f"| read bandwidth, 1 thread, array of {name}'s decoder weights "
                     f"({size:.1f} MB) | {gbs:.2f} GB/s | {cmd} |")
    return lines + [
        f"| GEMM fp32, onnxruntime MatMul {gemm['size']}^3, {data['threads']} thread(s) | "
        f"{fmt(gemm['ort_fp32_gflops'])} GFLOP/s | {cmd} |",
        f"| GEMM int8, onnxruntime MatMulInteger {gemm['size']}^3, {data['threads']} "
        f"thread(s) | {fmt(gemm['ort_int8_gops'])} GOP/s | {cmd} |",
        f"| GEMM fp32, numpy matmul {gemm['size']}^3, BLAS's own threads | "
        f"{fmt(gemm['numpy_fp32_gflops'])} GFLOP/s | {cmd} |",
    ]


def _reply_lines(data: dict, cmd: str) -> list[str]:
    tf_reply = data["replies"][BACKENDS[2]]
    lines = [
        "",
        "### Per reply (batch 1, one request alone)",
        "",
        "p50 over three rounds, in each of which every backend in turn replies to every "
        "question (all see the machine over the same stretch). Decoder steps' share = batch-1 step "
        "p50 x tokens / greedy reply p50; the rest is the encoder and the numpy search "
        "code (token rules, choice, detokenizing).",
        "",
        "| backend | greedy p50 ms | beam 5 p50 ms | ms/token greedy | tokens/reply | "
        "decoder steps' share | greedy vs TF | beam 5 vs TF | command |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, r in data["replies"].items():
        g, b = r["greedy"], r["beam 5"]
        share = data["steps"][name]["1"]["p50_ms"] * g["tokens_mean"] / g["p50_ms"]
        lines.append(
            f"| {name} | {g['p50_ms']:.1f} | {b['p50_ms']:.1f} | "
            f"{g['p50_ms'] / max(1, g['tokens_mean']):.2f} | {g['tokens_mean']:.1f} | "
            f"{100 * share:.0f}% | "
            f"{tf_reply['greedy']['p50_ms'] / g['p50_ms']:.1f}x | "
            f"{tf_reply['beam 5']['p50_ms'] / b['p50_ms']:.1f}x | {cmd} |")
    return lines


def _engine_lines(data: dict, cmd: str) -> list[str]:
    lines = [
        "",
        "### Engine replies/s (onnxruntime int8, greedy, in-process, no HTTP)",
        "",
        "| concurrent requests | one at a time | continuous batching | speedup | command |",
        "| ---: | ---: | ---: | ---: | --- |",
    ]
    for c, t in data["engine_replies_per_s"].items():
        lines.append(f"| {c} | {t['batch_1']:.1f} | {t['batch_32']:.1f} | "
                     f"{t['batch_32'] / t['batch_1']:.1f}x | {cmd} |")
    same = ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in data["identical_to_alone"].items())
    lines += ["", f"Concurrent greedy replies identical to the same request alone: {same}."]
    around = data.get("engine_step_around")
    if around:
        lines += ["", f"Event loop: {around['event_loop']} (the server's). The batch-32 "
                  f"int8 step around the 32-concurrent batched point (the baseline of its "
                  f"share of the step rate): p50 {around['step_before_ms']:.3f} ms just "
                  f"before, {around['step_after_ms']:.3f} ms just after."]
        if around.get("rounds"):
            shown_rounds = "; ".join(
                f"{r['replies_per_s']:.1f} replies/s between {r['step_before_ms']:.3f} and "
                f"{r['step_after_ms']:.3f} ms" for r in around["rounds"])
            lines += ["", f"That point ran {len(around['rounds'])} times, each between two "
                      f"timings of the step; the table shows the round of the median share "
                      f"of the step rate. Every round: {shown_rounds}."]
    return lines


def report(data: dict) -> str:
    cmd = f"`{data['command']}`"
    return "\n".join([*_header_lines(data), *_step_lines(data, cmd), *_machine_lines(data, cmd),
                      *_reply_lines(data, cmd), *_engine_lines(data, cmd)])
