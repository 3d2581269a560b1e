"""Training throughput: tokens/s of the real training step at a couple of model sizes.

    python -m benchmarks.train_throughput [--steps 20] [--batch-size 64] [--threads 0]

Runs ``training.loss.compile_steps`` (the step ``python -m training`` runs: forward,
masked loss, gradients, clipping, Adam) on random batches with the lengths of real chat
pairs, and prints the machine it ran on. Tokens count source plus target tokens, padding
excluded, as the progress bar does. Speed is reported together with its ratio to the
smallest size, measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

from benchmarks.common import cpu_model  # noqa: E402
from training.environment import configure_tensorflow_environment  # noqa: E402

configure_tensorflow_environment()  # the setting training runs with

# (name, embed_dim, hidden_dim, vocab_size): a tiny test model, a small one, the default.
SIZES = [
    ("tiny", 16, 32, 2000),
    ("small", 64, 128, 8000),
    ("default", 256, 512, 20000),
]
SRC_LEN, TGT_LEN = (4, 20), (4, 20)  # uniform word lengths, like the cleaned corpora


def machine_lines() -> list[str]:
    import keras
    import tensorflow as tf

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu_flags = next((ln for ln in f if ln.startswith("flags")), "").split()
        flags = " ".join(
            x for x in ("avx2", "avx512f", "avx512_vnni", "avx_vnni") if x in cpu_flags
        )
    except OSError:
        pass
    return [
        f"cpu: {cpu_model()} ({flags or 'flags unknown'})",
        f"cores: {os.cpu_count()} logical, {usable} usable by this process",
        f"python {platform.python_version()}, tensorflow {tf.__version__}, "
        f"keras {keras.__version__}, TF_ENABLE_ONEDNN_OPTS={os.environ['TF_ENABLE_ONEDNN_OPTS']}",
        f"command: python -m benchmarks.train_throughput {' '.join(sys.argv[1:])}".rstrip(),
    ]


def random_batch(rng, batch_size: int, vocab_size: int):
    import numpy as np

    from serve.runtime.tokenizer import BOS_ID, EOS_ID, PAD_ID

    src_len = rng.integers(*SRC_LEN, size=batch_size, endpoint=True).astype(np.int32)
    tgt_len = rng.integers(*TGT_LEN, size=batch_size, endpoint=True)
    src = np.full((batch_size, src_len.max()), PAD_ID, np.int32)
    tgt_in = np.full((batch_size, tgt_len.max() + 1), PAD_ID, np.int32)
    tgt_out = np.full_like(tgt_in, PAD_ID)
    for row in range(batch_size):
        words = rng.integers(4, vocab_size, size=src_len[row] + tgt_len[row])
        src[row, : src_len[row]] = words[: src_len[row]]
        answer = words[src_len[row] :]
        tgt_in[row, : len(answer) + 1] = [BOS_ID, *answer]
        tgt_out[row, : len(answer) + 1] = [*answer, EOS_ID]
    tokens = int(src_len.sum() + tgt_len.sum() + batch_size)  # + </s>
    return (src, src_len, tgt_in, tgt_out), tokens


def measure(
    embed_dim: int, hidden_dim: int, vocab_size: int, batch_size: int, steps: int, seed: int = 0
) -> dict:
    import keras
    import numpy as np

    from training.loss import compile_steps
    from training.model import ModelConfig, build_model

    keras.utils.set_random_seed(seed)
    model = build_model(
        ModelConfig(vocab_size=vocab_size, embed_dim=embed_dim, hidden_dim=hidden_dim)
    )
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)
    train_step, _ = compile_steps(model, optimizer, clip_norm=5.0)
    rng = np.random.default_rng(seed)
    batches = [random_batch(rng, batch_size, vocab_size) for _ in range(steps)]
    for batch, _ in batches[:2]:  # tracing and warm-up
        float(train_step(*batch))
    times = []
    for batch, _ in batches:
        t0 = time.perf_counter()
        float(train_step(*batch))  # float(): wait for the result
        times.append(time.perf_counter() - t0)
    tokens = sum(n for _, n in batches)
    return {
        "params": sum(int(np.prod(w.shape)) for w in model.trainable_weights),
        "tokens_per_s": tokens / sum(times),
        "step_ms_median": statistics.median(times) * 1000,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.train_throughput", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per size")
    parser.add_argument("--batch-size", type=int, default=64, help="pairs per step")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="TensorFlow intra/inter-op threads (0 = TensorFlow's choice)",
    )
    parser.add_argument(
        "--sizes",
        default=",".join(name for name, *_ in SIZES),
        help="comma-separated subset of: "
        + ", ".join(f"{n} (embed {e}, hidden {h}, vocab {v})" for n, e, h, v in SIZES),
    )
    args = parser.parse_args(argv)
    import tensorflow as tf

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    wanted = args.sizes.split(",")
    unknown = sorted(set(wanted) - {name for name, *_ in SIZES})
    if unknown:
        parser.error(f"unknown size(s): {', '.join(unknown)}")

    print("\n".join(machine_lines()))
    print(
        f"batch {args.batch_size}, {args.steps} timed steps, source and target "
        f"{SRC_LEN[0]}-{TGT_LEN[1]} words, Adam, clip 5, threads {args.threads or 'auto'}"
    )
    print(
        f"{'size':<8} {'embed':>5} {'hidden':>6} {'vocab':>6} {'params':>10} "
        f"{'tokens/s':>9} {'step ms':>8} {'ratio':>6}"
    )
    base = None
    for name, embed, hidden, vocab in SIZES:
        if name not in wanted:
            continue
        result = measure(embed, hidden, vocab, args.batch_size, args.steps)
        base = base or result["tokens_per_s"]
        print(
            f"{name:<8} {embed:>5} {hidden:>6} {vocab:>6} {result['params']:>10,} "
            f"{result['tokens_per_s']:>9.0f} {result['step_ms_median']:>8.1f} "
            f"{result['tokens_per_s'] / base:>6.2f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
