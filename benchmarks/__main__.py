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

from benchmarks.common import (
    DEFAULT_OUT,
    SHIPPED_MODEL,
    log,
    machine,
    machine_lines,
    write_results,
)

PROFILES = {
    # Short enough for a busy shared machine (a few minutes in all).
    "quick": dict(questions=12, reply_tokens=20, steps=50, replies=320, seconds=12.0,
                  concurrency="1,8,32,128", poisson_rate=20.0, requests_per_client=4,
                  min_requests=32, wrk_seconds=6.0, profile_seconds=5.0,
                  hybrid_requests=128),
    "full": dict(questions=50, reply_tokens=30, steps=300, replies=192, seconds=60.0,
                 concurrency="1,8,32,128", poisson_rate=20.0, requests_per_client=4,
                 min_requests=64, wrk_seconds=20.0, profile_seconds=15.0,
                 hybrid_requests=256),
}

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
    p.add_argument("kind", choices=("decoding", "server", "baseline", "http", "profile",
                                    "all"))
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
    p.add_argument("--model", type=Path, default=SHIPPED_MODEL, help="the model folder of "
                   "the http, profile and hybrid figures (default: the shipped one, with its "
                   "reply index)")
    p.add_argument("--wrk-seconds", type=float, help="seconds of one wrk point")
    p.add_argument("--wrk-connections", type=int, default=32)
    p.add_argument("--http-reply-tokens", type=int, default=5, help="the forced reply "
                   "length of the generation-only point (the floor streams five pieces)")
    p.add_argument("--profile-seconds", type=float, help="seconds of load per profile")
    p.add_argument("--hybrid-requests", type=int, help="replies per mode, in-process hybrid")
    p.add_argument("--readme", action="store_true", help="print the README's speed table "
                   "from the results in --out and exit")
    p.add_argument("--update-readme", action="store_true", help="with --readme: also write "
                   "it into README.md, between its speed-table markers")
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


def _without_places(argv: list[str]) -> list[str]:
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--workdir", "--out"):
            skip = True
        elif not arg.startswith(("--workdir=", "--out=")):
            kept.append(arg)
    return kept


WEIGHTS_KINDS = ("decoding", "server", "baseline", "all")  # the kinds that train weights


def _dims(args: argparse.Namespace) -> dict | None:
    if not args.dims:
        return None
    try:
        embed, hidden, vocab = (int(x) for x in args.dims.split(","))
    except ValueError:
        raise SystemExit("python -m benchmarks: --dims is EMBED,HIDDEN,VOCAB") from None
    return {"embed_dim": embed, "hidden_dim": hidden, "vocab_size": vocab}


def _measure(args: argparse.Namespace, info: dict, command: str, workdir: Path) -> dict:
    """Every figure of ``args.kind``, each written to --out as it is made."""
    header = ["# xiaoX benchmarks", "", *machine_lines(info),
              f"- run: `{command}` ({args.profile} profile)"]
    found: dict = {}

    def write(name: str, md: str, data: dict) -> None:
        data["machine"] = info
        found[name] = data
        write_results(args.out, name, "\n".join([*header, "", md]), data)

    weights = None
    if args.kind in WEIGHTS_KINDS:
        from benchmarks.common import prepare_weights

        weights = prepare_weights(workdir, args.checkpoint, _dims(args), args.train_steps)
    if args.kind in ("decoding", "all"):
        from benchmarks import decoding

        write("decoding", *decoding.run(args, weights, decoding_command(args)))
    if args.kind in ("http", "all"):
        from benchmarks import wrk_load

        write("http", *wrk_load.run(args, workdir / "http"))
    if args.kind == "all":
        from benchmarks import hybrid

        write("hybrid", *hybrid.run(args))
    if args.kind in ("profile", "all"):
        from benchmarks import profile

        write("profile", *profile.run(args, workdir / "profile"))
    if args.kind in ("server", "baseline", "all"):
        from benchmarks import server_load

        write("baseline" if args.kind == "baseline" else "server",
              *server_load.run(args, weights, command))
    return found


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.readme:
        from benchmarks.common import ROOT
        from benchmarks.targets import readme_table, update_readme

        print(readme_table(args.out))
        if args.update_readme:
            update_readme(args.out, ROOT / "README.md")
        return 0
    # --workdir and --out are where, not what: left out of the command the results show
    command = "python -m benchmarks " + shlex.join(_without_places(argv))
    info = machine()  # the load average before we add to it
    started = time.perf_counter()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="xiaox-bench-"))
    try:
        found = _measure(args, info, command, workdir)
        if args.kind == "all":
            from benchmarks.targets import write_summary

            write_summary(args, info, found, command, time.perf_counter() - started)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    log(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
