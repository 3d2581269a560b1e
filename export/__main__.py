"""python -m export --checkpoint DIR --out artifacts/NAME [--quantize none|int8] [--no-index]"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Export a training checkpoint to ONNX graphs (encoder, one decoder step, "
        "the scoring pass; the backward model's scoring pass when CHECKPOINT/backward/ "
        "exists), check them against TensorFlow, build the reply index from the "
        "checkpoint's train.tsv, and write a model folder with its manifest.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint", required=True, help="checkpoint folder from python -m training"
    )
    parser.add_argument(
        "--out", required=True, help="model folder to write, e.g. artifacts/mymodel"
    )
    parser.add_argument(
        "--quantize",
        choices=["none", "int8"],
        default="int8",
        help="onnxruntime dynamic quantization of the graphs' weights",
    )
    parser.add_argument(
        "--name", default=None, help="model id served at /v1/models (default: the folder's name)"
    )
    parser.add_argument(
        "--check-samples",
        type=int,
        default=200,
        help="held-out questions on which the export checks itself",
    )
    parser.add_argument(
        "--weights",
        choices=["best", "latest"],
        default="best",
        help="the checkpoint's weights of the best validation loss, or its latest",
    )
    parser.add_argument(
        "--blocklist",
        default=None,
        help="words the served model must never say, copied into the folder "
        "('none' = no blocklist; default: the project's data/blocklist.txt)",
    )
    parser.add_argument(
        "--no-index",
        dest="index",
        action="store_false",
        help="do not build the reply index (serve.runtime.retrieval) from train.tsv",
    )
    parser.add_argument(
        "--tune-samples",
        type=int,
        default=300,
        help="validation pairs the reply selection weights are tuned on (0 = untuned)",
    )
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (17 or newer)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.opset < 17:
        print("error: --opset must be 17 or newer", file=sys.stderr)
        return 2
    if args.check_samples < 1:
        print("error: --check-samples must be at least 1", file=sys.stderr)
        return 2
    from training.environment import configure_tensorflow_environment

    configure_tensorflow_environment()
    from export.export import DEFAULT_BLOCKLIST, ExportError, export_model
    from serve.runtime.manifest import portable_command

    command = portable_command("python -m export", sys.argv[1:] if argv is None else argv)
    try:
        manifest = export_model(
            args.checkpoint,
            args.out,
            quantize=args.quantize,
            name=args.name,
            check_samples=args.check_samples,
            opset=args.opset,
            command=command,
            weights=args.weights,
            blocklist=None if args.blocklist == "none" else (args.blocklist or DEFAULT_BLOCKLIST),
            index=args.index,
            tune_samples=args.tune_samples,
        )
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({manifest.quantization})")
    for check, result in manifest.checks.items():
        print(f"  {check}: {result}")
    if "skipped" in manifest.retrieval:
        print(f"  reply index: skipped ({manifest.retrieval['skipped']})")
    else:
        print(
            f"  reply index: {manifest.retrieval.get('indexed', 0)} replies, "
            f"dropped {manifest.retrieval.get('dropped', {})}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
