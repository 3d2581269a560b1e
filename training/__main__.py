"""``python -m training --corpus FILE --out DIR``: train xiaoX's seq2seq from chat corpora.

Settings come from, lowest first: the defaults, the saved run (with ``--resume``),
``--config`` (a TOML file, or an earlier run's ``config.json`` or folder), then the flags.

``--config RUN/config.json --corpus SAME.tsv --out NEW`` reproduces a run: every
TrainConfig setting is taken from it, but the corpora are not settings and must still be
given with --corpus (a warning names them when they differ from the recorded ones).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from training.config import ConfigError, TrainConfig, read_config_file
from training.corpus import FORMATS

EXIT_ERROR, EXIT_INTERRUPTED = 2, 130

log = logging.getLogger("training")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Train the xiaoX attention seq2seq on question/answer corpora "
                    "(xiaohuangji .conv, LCCC JSON, CDial TSV, plain question<TAB>answer TSV).",
        epilog="Ctrl-C saves a checkpoint; run the same command with --resume to continue "
               "exactly where it stopped.",
    )
    parser.add_argument("--corpus", action="append", type=Path, required=True, metavar="PATH",
                        help="a corpus file (repeat for several)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="the checkpoint folder to write (export reads it)")
    parser.add_argument("--config", type=Path, metavar="PATH",
                        help="the settings below from a TOML file (top level or a [train] "
                             "table), or from an earlier run's config.json or folder (its "
                             "train section, to reproduce it: --corpus must still be given)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run saved in --out (step, optimizer, data order)")
    parser.add_argument("--format", action="append", choices=FORMATS, dest="formats",
                        help="force the corpus format (once for all, or once per --corpus; "
                             "default: detected)")
    group = parser.add_argument_group("settings (training.config.TrainConfig)")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        text = f"{f.metadata.get('help', '')} (default: {default})"
        if f.type == "bool":
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=None, help=text)
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            metavar = {"int": "N", "float": "X"}.get(f.type, "VALUE")
            group.add_argument(flag, dest=f.name, type=kind, default=None, metavar=metavar,
                               help=text)
    return parser


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    from training.checkpoint import CONFIG_FILE, read_config

    settings: dict = {}
    if args.resume and (args.out / CONFIG_FILE).is_file():
        settings.update(read_config(args.out)["train"])
    if args.config is not None:
        config_file = read_config_file(args.config)
        settings.update(config_file.settings)
        given = [Path(c).name for c in args.corpus]
        if config_file.corpora is not None and config_file.corpora != given:
            log.warning("warning: %s recorded the corpora %s, this run reads %s", args.config,
                        ", ".join(map(str, config_file.corpora)) or "(none)", ", ".join(given))
    settings.update({f.name: getattr(args, f.name) for f in fields(TrainConfig)
                     if getattr(args, f.name) is not None})
    return TrainConfig.from_dict(settings, source=str(args.config or "settings"))


def _log_to_stderr() -> None:
    # Our logger only: the root logger at INFO would also print TensorFlow's chatter.
    logger = logging.getLogger("training")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    # Before TensorFlow loads: oneDNN's reordered float sums would break exact resume.
    from training.environment import configure_tensorflow_environment

    configure_tensorflow_environment()
    _log_to_stderr()

    from serve.runtime.manifest import portable_command
    from training.checkpoint import CheckpointError
    from training.corpus import CorpusError
    from training.train import TrainingInterrupted, train

    try:
        config = resolve_config(args)
        out = train(config, args.corpus, args.out, resume=args.resume, formats=args.formats,
                    command=portable_command("python -m training", argv))
    except (ConfigError, CorpusError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except TrainingInterrupted as e:
        print(str(e), file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("interrupted (no checkpoint saved)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:
        print(f"error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_ERROR
    print(f"checkpoint: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
