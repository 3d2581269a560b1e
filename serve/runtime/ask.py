"""``python -m serve ask "你好"``: one question, one reply (or the n-best with scores).

No server and no engine: the model folder is loaded, the message decoded, the reply
printed. Every decoding option of the engine is a flag.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from serve.runtime.decoding import DecodingOptions, generate
from serve.runtime.manifest import ModelError
from serve.runtime.model import OnnxSeq2Seq
from serve.runtime.paths import DEFAULT_MODEL


def build_parser() -> argparse.ArgumentParser:
    d = DecodingOptions()
    p = argparse.ArgumentParser(
        prog="python -m serve ask",
        description="Ask xiaoX one question and print its reply.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("message", help="what you say to xiaoX, e.g. 你好")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model folder")
    p.add_argument("--beam-size", type=int, default=d.beam_size, help="1 = greedy or sampling")
    p.add_argument(
        "--num-hypotheses",
        type=int,
        default=d.num_hypotheses,
        help="print this many beam hypotheses with their scores",
    )
    p.add_argument("--length-penalty", type=float, default=d.length_penalty)
    p.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty)
    p.add_argument("--no-repeat-ngram-size", type=int, default=d.no_repeat_ngram_size)
    p.add_argument("--min-length", type=int, default=d.min_length)
    p.add_argument("--max-length", type=int, default=d.max_length)
    p.add_argument("--temperature", type=float, default=d.sampling_temperature)
    p.add_argument(
        "--top-k", type=int, default=d.sampling_topk, help="1 = greedy, 0 = whole vocabulary"
    )
    p.add_argument("--top-p", type=float, default=d.sampling_topp)
    p.add_argument("--seed", type=int, default=d.seed, help="sampling seed")
    p.add_argument("--antilm-weight", type=float, default=d.antilm_weight,
                   help="MMI anti-LM weight in [0, 1) against stock replies (beam search only)")
    p.add_argument("--antilm-steps", type=int, default=d.antilm_steps,
                   help="reply tokens the anti-LM applies to")
    p.add_argument("--scores", action="store_true", help="print the score with the reply")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0 = auto)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        options = DecodingOptions(
            beam_size=args.beam_size,
            num_hypotheses=args.num_hypotheses,
            length_penalty=args.length_penalty,
            repetition_penalty=args.repetition_penalty,
            no_repeat_ngram_size=args.no_repeat_ngram_size,
            min_length=args.min_length,
            max_length=args.max_length,
            sampling_temperature=args.temperature,
            sampling_topk=args.top_k,
            sampling_topp=args.top_p,
            seed=args.seed,
            antilm_weight=args.antilm_weight,
            antilm_steps=args.antilm_steps,
            return_scores=True,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        model = OnnxSeq2Seq.load(args.model, intra_op_num_threads=args.threads)
    except ModelError as e:
        hint = " (pass --model DIR: a folder written by python -m export)"
        print(f"error: {e}{hint if args.model == DEFAULT_MODEL else ''}", file=sys.stderr)
        return 2
    try:
        result = generate(model, args.message, options)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if options.num_hypotheses > 1:
        for i, (text, score) in enumerate(result.hypotheses, 1):
            print(f"{i}. [{score:.4f}] {text}")
    elif args.scores:
        print(f"[{result.score:.4f}] {result.text}")
    else:
        print(result.text)
    return 0
