"""``python -m serve`` (or ``xiaox``): the chat server, and one-off commands beside it.

    python -m serve [run] [--port 8080 ...]   the chat server (run is the default)
    python -m serve ask "你好" [options]       one question, one reply
    python -m serve evaluate --data FILE       reply quality on held-out pairs

Each command parses its own flags (``python -m serve ask --help``); a command's module is
imported only when it runs, so ``ask`` never loads the web server.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name: (module with main(argv), summary)
COMMANDS = {
    "run": ("serve.web.server", "run the chat server (the default command)"),
    "ask": ("serve.runtime.ask", "ask xiaoX one question and print its reply"),
    "evaluate": ("serve.runtime.evaluate", "reply quality on held-out question/answer pairs"),
}
DEFAULT_COMMAND = "run"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m serve",
        description="xiaoX: the chat server and its one-off commands.",
        epilog="With no command, run: `python -m serve --port 8080` is "
               "`python -m serve run --port 8080`. `python -m serve COMMAND --help` lists "
               "a command's flags.",
    )
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    for name, (_, summary) in COMMANDS.items():
        commands.add_parser(name, help=summary)  # its flags: its module's own parser
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        build_parser().print_help()
        return 0
    if argv[:1] and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        build_parser().error(f"unknown command {argv[0]!r} (choose from {', '.join(COMMANDS)})")
    if not argv or argv[0] not in COMMANDS:
        argv = [DEFAULT_COMMAND, *argv]
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
