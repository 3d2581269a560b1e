"""``python -m serve``: the chat server; ``python -m serve ask`` and ``evaluate`` for one-offs."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["ask"]:
        from serve.runtime.ask import main as ask

        return ask(argv[1:])
    if argv[:1] == ["evaluate"]:
        from serve.runtime.evaluate import main as evaluate

        return evaluate(argv[1:])
    from serve.web.server import main as server

    return server(argv)


if __name__ == "__main__":
    sys.exit(main())
