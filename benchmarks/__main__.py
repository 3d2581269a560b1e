"""python -m benchmarks {decoding,server,baseline,all} [options]

    decoding  per-step and per-reply latency (ORT int8, ORT fp32, TensorFlow), the
              memory-bandwidth and GEMM bounds of one step, engine replies/s
    server    HTTP/SSE load against servers started on 127.0.0.1 (setups on, off, two,
              baseline), cold start and peak RSS
    baseline  the server benchmark with only our batching server and the TensorFlow
              baseline (--setups on,baseline)
    all       decoding, then server, then a summary against the targets

Results go to --out (default benchmarks/results/) as NAME.md and NAME.json, with the
machine described and the exact command beside every figure. Every contender runs on
the same weights: --checkpoint DIR, or a checkpoint trained for a few steps (shipped
dimensions) in --workdir (a temporary folder unless given; reused when given again).
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import DEFAULT_OUT, log, machine, machine_lines, write_results

PROFILES = {
    # Short enough for a busy shared machine (a few minutes in all).
    "quick": dict(questions=12, reply_tokens=20, steps=50, replies=64, seconds=20.0,
                  concurrency="1,8,32,128", poisson_rate=20.0, requests_per_client=4,
                  min_requests=32),
    "full": dict(questions=50, reply_tokens=30, steps=300, replies=192, seconds=60.0,
                 concurrency="1,8,32,128", poisson_rate=20.0, requests_per_client=4,
                 min_requests=64),
}

TARGETS = [
    ("int8 greedy per-reply latency vs the TensorFlow step loop", ">= 10x faster"),
    ("continuous batching vs one at a time, replies/s at 32 clients (HTTP)", ">= 5x"),
    ("the same, in-process engine without HTTP (32 concurrent requests)", ">= 5x"),
    ("p99 time to first token at 32 clients (batching on)", "< 100 ms"),
    ("lean server peak RSS (one process, batching on)", "< 250 MB"),
    ("ours (batching on) vs the TensorFlow baseline, replies/s at 32 clients", "(ratio)"),
    ("baseline vs ours, TTFT p50 at 32 clients", "(ratio)"),
]


def _int_list(raw: str) -> list[int]:
    if raw.strip().lower() in ("", "none"):
        return []
    try:
        values = [int(x) for x in raw.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,8,32, not {raw!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("concurrency must be at least 1")
    return values


def _setups(raw: str) -> list[str]:
    from benchmarks.server_load import SETUPS

    names = [x.strip() for x in raw.split(",") if x.strip()]
    unknown = [n for n in names if n not in SETUPS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"setups are {', '.join(SETUPS)}; got {raw!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=("decoding", "server", "baseline", "all"))
    p.add_argument("--profile", choices=tuple(PROFILES), default="quick",
                   help="defaults for everything below (default quick: a few minutes)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    p.add_argument("--workdir", type=Path, help="keeps the checkpoint and its exports")
    p.add_argument("--checkpoint", type=Path, help="a training checkpoint (default: train "
                   "a small one with the shipped model's dimensions)")
    p.add_argument("--dims", help="EMBED,HIDDEN,VOCAB of the trained checkpoint (default: "
                   "the shipped model's)")
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    p.add_argument("--questions", type=int, help="held-out questions used as inputs")
    p.add_argument("--reply-tokens", type=int, help="every reply is forced to this length")
    p.add_argument("--steps", type=int, help="decoder steps timed per backend and batch")
    p.add_argument("--replies", type=int, help="replies per engine throughput point")
    p.add_argument("--setups", type=_setups, default="on,off,two,baseline")
    p.add_argument("--concurrency", type=_int_list, help="closed-loop client counts")
    p.add_argument("--poisson-rate", type=float, help="open-loop arrivals/s (0: none)")
    p.add_argument("--requests", type=int, default=0, help="requests per point (default: "
                   "requests-per-client x clients, at least min-requests)")
    p.add_argument("--requests-per-client", type=int)
    p.add_argument("--min-requests", type=int)
    p.add_argument("--seconds", type=float, help="time bound of one load point")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for name, value in PROFILES[args.profile].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if isinstance(args.concurrency, str):
        args.concurrency = _int_list(args.concurrency)
    if isinstance(args.setups, str):
        args.setups = _setups(args.setups)
    if args.kind == "baseline":
        args.setups = ["on", "baseline"]
    for name in ("questions", "reply_tokens", "steps", "replies", "threads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"python -m benchmarks: --{name.replace('_', '-')} must be >= 1")
    if not args.concurrency and not args.poisson_rate:
        raise SystemExit("python -m benchmarks: give --concurrency or --poisson-rate")
    return args


def decoding_command(args: argparse.Namespace) -> str:
    parts = ["python -m benchmarks decoding", f"--profile {args.profile}",
             f"--threads {args.threads}",
             f"--questions {args.questions}", f"--reply-tokens {args.reply_tokens}",
             f"--steps {args.steps}", f"--replies {args.replies}"]
    if args.checkpoint:
        parts.append(f"--checkpoint {args.checkpoint}")
    return " ".join(parts)


def summary(info: dict, decoding: dict | None, server: dict | None, command: str) -> str:
    from benchmarks.server_load import _point

    measured: list[str] = ["-"] * len(TARGETS)
    commands: list[str] = [command] * len(TARGETS)
    if decoding:
        r = decoding["replies"]
        ratio = r["TensorFlow step loop"]["greedy"]["p50_ms"] / \
            r["onnxruntime int8"]["greedy"]["p50_ms"]
        measured[0] = f"{ratio:.1f}x"
        engine = decoding["engine_replies_per_s"]["32"]
        measured[2] = f"{engine['batch_32'] / engine['batch_1']:.1f}x"
        commands[0] = commands[2] = decoding["command"]
    if server:
        on, off = _point(server, "on", 32), _point(server, "off", 32)
        if on and off and off["replies_per_s"]:
            measured[1] = f"{on['replies_per_s'] / off['replies_per_s']:.1f}x"
            commands[1] = f"{on['command']}; {off['command']}"
        if on and on["ttft_p99_ms"] is not None:
            measured[3] = f"{on['ttft_p99_ms']:.0f} ms"
            commands[3] = on["command"]
        rss = server["setups"].get("on", {}).get("peak_rss_mb") or []
        if rss and rss[0]:
            measured[4] = f"{rss[0]:.0f} MB"
            commands[4] = server["setups"]["on"]["points"][0]["command"]
        base = _point(server, "baseline", 32)
        if on and base and base["replies_per_s"]:
            measured[5] = f"{on['replies_per_s'] / base['replies_per_s']:.1f}x"
            commands[5] = f"{on['command']}; {base['command']}"
        if on and base and on["ttft_p50_ms"] and base["ttft_p50_ms"]:
            measured[6] = f"{base['ttft_p50_ms'] / on['ttft_p50_ms']:.1f}x"
            commands[6] = commands[5]
    lines = ["## Targets (measured, not asserted) and ratios to the baseline", "",
             "| target | wanted | measured | command |", "| --- | --- | ---: | --- |"]
    for (name, wanted), got, cmd in zip(TARGETS, measured, commands, strict=True):
        lines.append(f"| {name} | {wanted} | {got} | `{cmd}` |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    command = "python -m benchmarks " + shlex.join(argv)
    info = machine()  # the load average before we add to it
    started = time.perf_counter()
    from benchmarks.common import prepare_weights

    dims = None
    if args.dims:
        try:
            embed, hidden, vocab = (int(x) for x in args.dims.split(","))
        except ValueError:
            raise SystemExit("python -m benchmarks: --dims is EMBED,HIDDEN,VOCAB") from None
        dims = {"embed_dim": embed, "hidden_dim": hidden, "vocab_size": vocab}
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="xiaox-bench-"))
    try:
        weights = prepare_weights(workdir, args.checkpoint, dims, args.train_steps)
        header = ["# xiaoX benchmarks", "", *machine_lines(info),
                  f"- run: `{command}` ({args.profile} profile)"]
        decoding_data = server_data = None
        if args.kind in ("decoding", "all"):
            from benchmarks import decoding

            md, decoding_data = decoding.run(args, weights, decoding_command(args))
            decoding_data["machine"] = info
            write_results(args.out, "decoding", "\n".join([*header, "", md]), decoding_data)
        if args.kind in ("server", "baseline", "all"):
            from benchmarks import server_load

            md, server_data = server_load.run(args, weights, command)
            server_data["machine"] = info
            name = "baseline" if args.kind == "baseline" else "server"
            write_results(args.out, name, "\n".join([*header, "", md]), server_data)
        if args.kind == "all":
            text = summary(info, decoding_data, server_data, command)
            write_results(args.out, "summary", "\n".join([*header, "", text, "",
                                                          "Details: decoding.md, server.md."]),
                          {"machine": info, "command": command, "summary": text})
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    log(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
