"""``python -m serve``: subcommands, the server as the default, and the decoding flags."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tomllib
import types
from dataclasses import fields

import pytest

import serve.__main__ as entry
from serve.runtime import ask, evaluate
from serve.runtime.flags import decoding_kwargs
from serve.runtime.options import DecodingOptions, option_help
from tests.conftest import ROOT


@pytest.fixture
def calls(monkeypatch) -> list[tuple[str, list[str]]]:
    """Every command's main replaced by one that records its module and argv."""
    seen: list[tuple[str, list[str]]] = []

    def fake_import(name: str):
        return types.SimpleNamespace(main=lambda argv: seen.append((name, argv)) or 0)

    monkeypatch.setattr(entry.importlib, "import_module", fake_import)
    return seen


def test_help_lists_the_commands(capsys):
    assert entry.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("run", "ask", "evaluate"):
        assert f"    {command} " in out


def test_the_server_is_the_default_command(calls):
    assert entry.main(["--port", "8080"]) == 0
    assert entry.main([]) == 0
    assert entry.main(["run", "--port", "8080"]) == 0
    assert entry.main(["ask", "你好", "--beam-size", "2"]) == 0
    assert calls == [("serve.web.server", ["--port", "8080"]), ("serve.web.server", []),
                     ("serve.web.server", ["--port", "8080"]),
                     ("serve.runtime.ask", ["你好", "--beam-size", "2"])]


def test_an_unknown_command_is_a_usage_error(calls, capsys):
    with pytest.raises(SystemExit) as e:
        entry.main(["asks", "你好"])
    assert e.value.code == 2 and "unknown command 'asks'" in capsys.readouterr().err
    assert calls == []


def test_the_console_script_is_this_main():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"xiaox": "serve.__main__:main"}


ASK_HELP = """
import contextlib, sys
from serve.__main__ import main
with contextlib.suppress(SystemExit):
    main(["ask", "--help"])
assert not [m for m in sys.modules if m.startswith("serve.web")]
"""


def test_ask_does_not_import_the_web_server():
    done = subprocess.run([sys.executable, "-c", ASK_HELP], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--beam-size" in done.stdout


def _decoding_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest in {f.name for f in fields(
        DecodingOptions)}}


@pytest.mark.parametrize("module", [ask, evaluate], ids=["ask", "evaluate"])
def test_decoding_flags_come_from_the_options(module):
    actions = _decoding_actions(module.build_parser())
    # Every option but return_scores and return_candidates (ask always scores and has
    # --candidates; evaluate reports neither).
    assert set(actions) == {f.name for f in fields(DecodingOptions)} - {"return_scores",
                                                                      "return_candidates"}
    for name, action in actions.items():
        assert f"--{name.replace('_', '-')}" in action.option_strings
        assert action.help == option_help(name)


def test_ask_flags_parse_into_options():
    args = ask.build_parser().parse_args(
        ["你好", "--beam-size", "3", "--top-p", "0.5", "--no-disable-unk",
         "--suppress-words", "笨", "--suppress-words", "傻", "--seed", "4"])
    options = DecodingOptions(**decoding_kwargs(args))
    assert (options.beam_size, options.sampling_topp, options.disable_unk, options.seed) == (
        3, 0.5, False, 4)
    assert options.suppress_words == ("傻", "笨")
    defaults = DecodingOptions(**decoding_kwargs(ask.build_parser().parse_args(["你好"])))
    assert defaults == DecodingOptions()


def test_evaluate_has_its_own_defaults():
    args = evaluate.build_parser().parse_args(["--data", "x.tsv"])
    kwargs = decoding_kwargs(args)
    assert kwargs["max_length"] == evaluate.MAX_REPLY_TOKENS and kwargs["seed"] == 0


def test_evaluate_refuses_options_a_mode_cannot_take(tmp_path, capsys):
    data = tmp_path / "pairs.tsv"
    data.write_text("你好\t你好呀\n", encoding="utf-8")
    assert evaluate.main(["--data", str(data), "--sampling-topk", "0"]) == 2
    assert "the beam5 mode" in capsys.readouterr().err
