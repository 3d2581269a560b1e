"""``python -m serve ask "你好"``: one question, one reply (or the n-best with scores).

No server and no engine: the model folder is loaded, the message decoded (or, in the
hybrid mode, the reply chosen among retrieved and generated candidates), the reply
printed. Every decoding option of the engine is a flag; ``--candidates`` prints every
candidate with its scores.

The flags' defaults are the model folder's default generation settings (its manifest's
``generation``, the chat room's), else ``DecodingOptions``' own: ``--model`` is read
first, then its manifest (no session is loaded), so ``--help`` shows them. A flag given
wins; flags asking for greedy decoding (``--top-k 1``) or beam search (``--beam-size`` >
1) drop the folder's sampling defaults (``serve.runtime.flags.folder_defaults``, the
OpenAI API's rule too).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from serve.runtime.flags import add_decoding_flags, asked_kwargs, decoding_kwargs, folder_defaults
from serve.runtime.manifest import Manifest, ModelError
from serve.runtime.model import OnnxSeq2Seq
from serve.runtime.options import DecodingOptions
from serve.runtime.paths import DEFAULT_MODEL
from serve.runtime.replies import ReplySources, select_reply
from serve.runtime.search import GenerationResult

EXCLUDED = ("return_scores", "return_candidates")


def folder_generation(argv: list[str] | None) -> dict[str, object]:
    """The ``--model`` folder's default generation settings (its manifest's), read before
    the other flags are parsed; {} if the folder has none or is no model folder (``main``
    says why when it loads it)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    known, _ = pre.parse_known_args(argv)
    try:
        generation = Manifest.read(known.model).generation
    except ModelError:
        return {}
    return {k: v for k, v in generation.items() if k not in EXCLUDED}


def build_parser(generation: dict[str, object] | None = None) -> argparse.ArgumentParser:
    """The flags; ``generation`` (a model folder's default generation settings) replaces
    the decoding flags' defaults."""
    p = argparse.ArgumentParser(
        prog="python -m serve ask",
        description="Ask xiaoX one question and print its reply. The decoding options' "
                    "defaults are the model folder's default generation settings (its "
                    "manifest's generation), else DecodingOptions' own; the flags given "
                    "win.",
        epilog=("the model folder's default generation settings: " + ", ".join(
            f"{k}={v}" for k, v in sorted(generation.items()))) if generation else None,
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
    add_decoding_flags(p, defaults=generation, exclude=EXCLUDED)
    return p


def parse_options(argv: list[str] | None) -> tuple[argparse.Namespace, DecodingOptions]:
    """The flags, and the decoding options: the folder's defaults, then the flags given
    (ValueError if they are inconsistent)."""
    generation = folder_generation(argv)
    parser = build_parser(generation)
    args = parser.parse_args(argv)
    asked = asked_kwargs(parser, args)
    kept = {k: v for k, v in folder_defaults(generation, asked).items()
            if k in decoding_kwargs(args)}
    options = DecodingOptions(**{**kept, **asked}, return_scores=True,
                              return_candidates=args.candidates)
    return args, options


def main(argv: list[str] | None = None) -> int:
    try:
        args, options = parse_options(argv)
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
