"""``python -m serve ask``, and serving with TensorFlow made unimportable."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from serve.runtime.ask import DEFAULT_MODEL, main
from tests.conftest import ROOT

SHIPPED = ROOT / "artifacts" / "xiaox"


@pytest.fixture(scope="module")
def model_dir(request) -> Path:
    """The serving tests' model (runs without TensorFlow); a tiny exported one until the
    shipped one exists."""
    if (SHIPPED / "manifest.json").is_file():
        return request.getfixturevalue("model_dir")
    return request.getfixturevalue("tiny_model_dir")


def test_ask_shows_every_candidate_of_a_hybrid_reply(model_dir, capsys):
    argv = ["今天好冷", "--model", str(model_dir), "--reply-mode", "hybrid", "--candidates",
            "--sampling-topk", "0", "--generated-candidates", "2", "--seed", "1"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("score = ") and "retrieval" in lines[0]
    rows = [line for line in lines[1:-1] if line.startswith("  [")]
    assert any(" retrieved " in r for r in rows) and any(" generated " in r for r in rows)
    assert rows[0].rsplit("  ", 1)[-1] == lines[-1]  # the best candidate is the reply


def test_ask_in_generate_mode_retrieves_nothing(model_dir, capsys):
    argv = ["今天好冷", "--model", str(model_dir), "--reply-mode", "generate", "--candidates",
            "--sampling-topk", "0", "--generated-candidates", "3", "--seed", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert " retrieved " not in out and " generated " in out


def test_the_default_model_is_the_shipped_folder():
    assert DEFAULT_MODEL == SHIPPED


def test_ask_prints_the_reply(model_dir, capsys):
    assert main(["你好", "--model", str(model_dir), "--min-length", "2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and len(out[0]) >= 2


def test_ask_prints_the_n_best_with_scores(model_dir, capsys):
    argv = ["你好", "--model", str(model_dir), "--beam-size", "4", "--num-hypotheses", "3"]
    assert main(argv + ["--length-penalty", "0.6", "--no-repeat-ngram-size", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(".")[0] for line in lines] == ["1", "2", "3"]
    scores = [float(line.split("[")[1].split("]")[0]) for line in lines]
    assert scores == sorted(scores, reverse=True)


def test_ask_passes_the_antilm_options(model_dir, capsys):
    argv = ["你好", "--model", str(model_dir), "--beam-size", "5"]
    assert main(argv + ["--antilm-weight", "0.5", "--antilm-steps", "2"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["你好", "--model", str(model_dir), "--antilm-weight", "0.5"]) == 2
    assert "antilm_weight needs beam search" in capsys.readouterr().err


def test_ask_samples_reproducibly(model_dir, capsys):
    argv = ["你好", "--model", str(model_dir), "--top-k", "0", "--top-p", "0.9"]
    argv += ["--temperature", "1.2", "--seed", "7", "--repetition-penalty", "1.2"]
    assert main(argv) == 0 and main(argv) == 0
    first, second = capsys.readouterr().out.strip().splitlines()
    assert first == second


def test_a_broken_model_folder_is_one_clear_line(tmp_path, capsys):
    assert main(["你好", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "manifest.json" in err[0]


def test_bad_options_and_messages_are_one_clear_line(model_dir, capsys):
    assert main(["你好", "--model", str(model_dir), "--top-p", "2"]) == 2
    assert "sampling_topp must be in (0, 1]" in capsys.readouterr().err
    assert main(["  ", "--model", str(model_dir)]) == 2
    assert "empty" in capsys.readouterr().err


BLOCKED = ("tensorflow", "keras", "tf2onnx", "training", "export")
NO_TENSORFLOW = textwrap.dedent(
    """
    import asyncio, importlib, pkgutil, sys

    BLOCKED = {blocked!r}

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is blocked: serving must not need it")

    sys.meta_path.insert(0, Blocker())
    import serve
    for info in pkgutil.iter_modules(serve.__path__):
        if info.name != "__main__":
            importlib.import_module("serve." + info.name)

    from serve.__main__ import main
    assert main(["ask", "你好", "--model", {model!r}]) == 0

    from serve.runtime.engine import Engine
    from serve.runtime.model import OnnxSeq2Seq

    async def chat():
        engine = Engine(OnnxSeq2Seq.load({model!r}))
        await engine.start()
        try:
            return [d async for d in engine.stream("今天天气怎么样", min_length=2)]
        finally:
            await engine.stop()

    assert len(asyncio.run(chat())) >= 2
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not leaked, leaked
    print("answered without", ", ".join(BLOCKED))
    """
)


def test_serve_imports_and_answers_without_tensorflow(model_dir):
    code = NO_TENSORFLOW.format(blocked=BLOCKED, model=str(model_dir))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0] and lines[1].startswith("answered without tensorflow")
