"""The runtime's hot paths, one at a time, in one thread (no engine, no HTTP).

    python -m benchmarks.hot_paths [--model DIR] [--out DIR] [--before OLD/hot_paths.json]

What each decoder step and each request costs in Python around onnxruntime, measured as
the minimum of repeated runs (the least disturbed by the machine's other work):

- ``choose_tokens`` at batch 32 with the model folder's sampling settings (the chat
  room's), on rows taken mid-reply: the processed log-probs of 32 everyday messages at
  their first five reply steps;
- ``process_rows`` at batch 1 and 32, greedy with ``min_length`` (the benchmarks'
  forced-length replies) and with the folder's rules (repetition penalty, n-gram ban);
- a whole greedy reply alone (``decode_alone``, 20 forced tokens): the per-reply figure
  the TensorFlow ratio is made of;
- the hybrid mode's retrieval for one message (``ReplySources.retrieved``: BM25, the
  retrieved replies' tokens, their rules).

It uses only what earlier versions of the runtime have too, so the same file measures an
older tree: ``PYTHONPATH=OLD_TREE python benchmarks/hot_paths.py --out DIR --tree COMMIT``,
then ``python -m benchmarks.hot_paths --before DIR/hot_paths.json`` puts both side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a file against another tree: that tree first
    sys.path.append(str(ROOT))

from benchmarks.common import (  # noqa: E402
    DEFAULT_OUT,
    SHIPPED_MODEL,
    machine,
    machine_lines,
    shown,
)
from serve.runtime.model import OnnxSeq2Seq  # noqa: E402
from serve.runtime.options import DEFAULT_GENERATION, DecodingOptions  # noqa: E402
from serve.runtime.replies import ReplySources  # noqa: E402
from serve.runtime.rules import TokenRules, process_rows  # noqa: E402
from serve.runtime.sampling import choose_tokens  # noqa: E402
from serve.runtime.search import decode_alone, source_ids  # noqa: E402

MESSAGES = ROOT / "data" / "everyday_messages.txt"


def best_us(run: Callable[[], object], number: int, repeats: int = 5) -> float:
    """Microseconds per call: the best of ``repeats`` runs of ``number`` calls."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(number):
            run()
        best = min(best, (time.perf_counter() - started) / number)
    return 1e6 * best


def mid_reply_rows(model: OnnxSeq2Seq, messages: list[str], options: DecodingOptions,
                   steps: int = 5) -> list[np.ndarray]:
    """Processed log-probs of each message's first ``steps`` reply steps (greedy path,
    the folder's rules applied), each step's rows stacked: [messages, vocab] per step."""
    rules = TokenRules.for_model(model, options)
    states = [model.encode([source_ids(model, m)]) for m in messages]
    prev = [model.bos_id] * len(messages)
    hidden = [(s.h, s.c) for s in states]
    history: list[list[int]] = [[] for _ in messages]
    stacked = []
    for _ in range(steps):
        rows = []
        for i, s in enumerate(states):
            out = model.step(np.array([prev[i]]), *hidden[i], s.memory, s.memory_keys,
                             s.src_mask)
            row = process_rows(out.log_probs, [rules], [history[i]])[0]
            prev[i] = int(row.argmax())
            history[i].append(prev[i])
            hidden[i] = (out.h, out.c)
            rows.append(row)
        stacked.append(np.stack(rows))
    return stacked


def _process_rows_us(model: OnnxSeq2Seq, options: DecodingOptions, rows: np.ndarray
                     ) -> float:
    """``process_rows`` in place on a fresh copy of ``rows`` (as the engine calls it on
    each step's own output), less the copy's own time."""
    rules = [TokenRules.for_model(model, options)] * len(rows)
    history = [[7, 8, 9, 7]] * len(rows)  # a repeat: the penalties have work to do
    scratch = rows.copy()

    def fresh() -> np.ndarray:
        np.copyto(scratch, rows)
        return scratch

    return (best_us(lambda: process_rows(fresh(), rules, history, in_place=True), 200)
            - best_us(fresh, 200))


def measure(model_dir: Path) -> dict:
    model = OnnxSeq2Seq.load(model_dir, intra_op_num_threads=1)
    room = DecodingOptions(**(model.manifest.generation or DEFAULT_GENERATION))
    messages = [m for m in MESSAGES.read_text(encoding="utf-8").splitlines() if m.strip()]
    figures: dict[str, float] = {}
    steps = mid_reply_rows(model, messages[:32], replace(room, min_length=1))
    rngs = [np.random.default_rng(i) for i in range(32)]
    figures["choose_tokens, batch 32, room sampling (mean of 5 reply steps)"] = float(
        np.mean([best_us(lambda rows=rows: choose_tokens(rows, [room] * 32, rngs), 20)
                 for rows in steps]))
    forced = DecodingOptions(min_length=20, max_length=20)
    for name, options in (("greedy, min_length", forced), ("room rules", room)):
        for batch in (1, 32):
            figures[f"process_rows, batch {batch}, {name}"] = _process_rows_us(
                model, options, steps[2][:batch])
    sources = [source_ids(model, m) for m in messages[:12]]
    figures["decode_alone, greedy 20 tokens (per reply, median of 12 messages)"] = float(
        np.median([best_us(lambda s=s: decode_alone(model, s, forced), 10)
                   for s in sources]))
    index = ReplySources.load(model, intra_op_num_threads=1)
    hybrid = replace(room, reply_mode="hybrid")
    figures["retrieval, 8 replies for one message (mean of 20)"] = sum(
        best_us(lambda m=m: index.retrieved(model, m, hybrid), 5, 3)
        for m in messages[:20]) / 20
    return figures


def report(data: dict, before: dict | None = None) -> str:
    """The figures; beside those of ``before`` (an older tree's hot_paths.json, run just
    before on the same machine) when given."""
    lines = ["# xiaoX benchmarks", "", *machine_lines(data["machine"]), "",
             "## The runtime's hot paths (one thread, best of repeated runs)", ""]
    run = f"`{data['command']}`; model `{data['model']}`"
    if before is None:
        lines += [run, "", "| what | us per call |", "| --- | ---: |"]
        lines += [f"| {name} | {us:,.1f} |" for name, us in data["figures"].items()]
        return "\n".join(lines) + "\n"
    lines += [f"{run}; before: the same file run against "
              f"{before.get('tree') or 'an older tree'} just before", "",
              "| what | before us | now us | now / before |", "| --- | ---: | ---: | ---: |"]
    for name, us in data["figures"].items():
        old = before["figures"].get(name)
        lines.append(f"| {name} | {'-' if old is None else f'{old:,.1f}'} | {us:,.1f} | "
                     f"{'-' if not old else f'{us / old:.2f}'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.hot_paths", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=SHIPPED_MODEL, help="model folder")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--before", type=Path, help="an older tree's hot_paths.json to compare")
    p.add_argument("--tree", default="", help="what tree this is (recorded in the JSON)")
    args = p.parse_args(argv)
    before = json.loads(args.before.read_text(encoding="utf-8")) if args.before else None
    command = ["python -m benchmarks.hot_paths"]  # names, never this machine's paths
    if args.model != SHIPPED_MODEL:
        command.append(f"--model {shown(args.model)}")
    if before is not None:
        command.append(f"--before {before.get('tree') or 'OLD'}/hot_paths.json")
    data = {"machine": machine(), "model": args.model.name, "command": " ".join(command),
            "tree": args.tree, "figures": measure(args.model)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hot_paths.md").write_text(report(data, before), encoding="utf-8")
    (args.out / "hot_paths.json").write_text(json.dumps(data, indent=2) + "\n",
                                             encoding="utf-8")
    print(report(data, before))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
