"""``python -m serve ask "你好"``: one question, one reply (or the n-best with scores).

No server and no engine: the model folder is loaded, the message decoded (or, in the
hybrid mode, the reply chosen among retrieved and generated candidates), the reply
printed. Every decoding option of the engine is a flag; ``--candidates`` prints every
candidate with its scores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from serve.runtime.flags import add_decoding_flags, decoding_kwargs
from serve.runtime.manifest import ModelError
from serve.runtime.model import OnnxSeq2Seq
from serve.runtime.options import DecodingOptions
from serve.runtime.paths import DEFAULT_MODEL
from serve.runtime.replies import ReplySources, select_reply
from serve.runtime.search import GenerationResult


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serve ask",
        description="Ask xiaoX one question and print its reply.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("message", help="what you say to xiaoX, e.g. 你好")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model folder")
    p.add_argument("--scores", action="store_true", help="print the score with the reply")
    p.add_argument("--candidates", action="store_true",
                   help="print every candidate reply with its scores (forward and backward "
                        "log-prob per token, retrieval), best first")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0 = auto)")
    # Scores are always computed: --num-hypotheses prints each one's, --scores the best's.
    add_decoding_flags(p, exclude=("return_scores", "return_candidates"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        options = DecodingOptions(**decoding_kwargs(args), return_scores=True,
                                  return_candidates=args.candidates)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        model = OnnxSeq2Seq.load(args.model, intra_op_num_threads=args.threads)
        sources = ReplySources.load(model, intra_op_num_threads=args.threads)
    except ModelError as e:
        hint = " (pass --model DIR: a folder written by python -m export)"
        print(f"error: {e}{hint if args.model == DEFAULT_MODEL else ''}", file=sys.stderr)
        return 2
    try:
        result = select_reply(model, sources, args.message, options)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.candidates:
        print_candidates(result, sources)
    if options.num_hypotheses > 1:
        for i, (text, score) in enumerate(result.hypotheses, 1):
            print(f"{i}. [{score:.4f}] {text}")
    elif args.scores:
        print(f"[{result.score:.4f}] {result.text}")
    else:
        print(result.text)
    return 0


def print_candidates(result: GenerationResult, sources: ReplySources) -> None:
    """One line per candidate: the formula's score and its three terms."""
    if not result.candidates:
        print("(one reply, no candidates to choose among)")
        return
    w = sources.weights
    print(f"score = {w.forward:g} x forward + {w.backward:g} x backward + "
          f"{w.retrieval:g} x retrieval   (weights: {w.chosen_on})")
    top = max((c.retrieval_score for c in result.candidates if c.source == "retrieved"),
              default=0.0)
    for c in result.candidates:
        forward, backward, retrieval = c.features(top)
        print(f"  [{c.score:8.4f}] fwd {forward:7.3f}  bwd {backward:7.3f}  "
              f"ret {retrieval:5.3f}  {c.source:9}  {c.text}")
