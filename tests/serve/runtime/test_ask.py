"""``python -m serve ask``, and serving with TensorFlow made unimportable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from serve.runtime.ask import DEFAULT_MODEL, main, parse_options
from serve.runtime.options import DecodingOptions
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
    if not (model_dir / "index").is_dir():
        pytest.skip("the model folder has no reply index")
    argv = ["今天好冷", "--model", str(model_dir), "--reply-mode", "hybrid", "--candidates",
            "--sampling-topk", "0", "--generated-candidates", "2", "--seed", "1"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("score = ") and "retrieval" in lines[0]
    rows = [line for line in lines[1:-1] if line.startswith("  [")]
    assert any(" retrieved " in r for r in rows) and any(" generated " in r for r in rows)
    assert rows[0].rsplit("  ", 1)[-1] == lines[-1]  # the best candidate is the reply


def test_ask_in_generate_mode_retrieves_nothing(model_dir, capsys):
    if not (model_dir / "score.onnx").is_file():
        pytest.skip("the model folder has no scoring graph to rerank with")
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


def _with_generation(model_dir: Path, folder: Path, generation: dict) -> Path:
    """The model folder's files (linked) with a manifest whose default generation settings
    are ``generation`` (manifest.json is not among the hashed files)."""
    folder.mkdir()
    for path in model_dir.iterdir():
        if path.name != "manifest.json":
            (folder / path.name).symlink_to(path.resolve())
    manifest = json.loads((model_dir / "manifest.json").read_text())
    manifest["generation"] = generation
    (folder / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False))
    return folder


SAMPLED = {"reply_mode": "generate", "sampling_topk": 0, "sampling_temperature": 1.5,
           "seed": 7, "min_length": 6, "suppress_words": ["笨"]}


def test_help_shows_the_folders_default_generation_settings(model_dir, tmp_path, capsys):
    folder = _with_generation(model_dir, tmp_path / "m", {**SAMPLED, "sampling_topp": 0.77})
    with pytest.raises(SystemExit) as done:
        main(["--model", str(folder), "--help"])
    assert done.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.77)" in out and "(default: 1.5)" in out and "(default: 7)" in out
    assert "sampling_topp=0.77" in out  # the epilog lists them
    with pytest.raises(SystemExit):
        main(["--help"])  # the shipped folder's, or DecodingOptions' own
    assert "(default: 0.77)" not in capsys.readouterr().out


def test_ask_decodes_with_the_folders_defaults_and_flags_win(model_dir, tmp_path, capsys):
    folder = str(_with_generation(model_dir, tmp_path / "sampled", SAMPLED))
    plain = str(_with_generation(model_dir, tmp_path / "plain", {}))
    _, options = parse_options(["你好", "--model", folder])
    assert (options.sampling_topk, options.seed, options.min_length, options.suppress_words,
            options.reply_mode) == (0, 7, 6, ("笨",), "generate")
    _, flagged = parse_options(["你好", "--model", folder, "--suppress-words", "傻",
                                "--min-length", "2"])
    assert (flagged.suppress_words, flagged.min_length) == (("傻",), 2)  # replaced
    _, beam = parse_options(["你好", "--model", folder, "--beam-size", "3"])
    assert (beam.beam_size, beam.sampling_topk, beam.seed) == (3, 1, None)  # sampling dropped
    assert beam.min_length == 6
    _, none = parse_options(["你好", "--model", plain])
    assert none == DecodingOptions(return_scores=True)
    explicit = ["--reply-mode", "generate", "--top-k", "0", "--temperature", "1.5",
                "--seed", "7", "--min-length", "6", "--suppress-words", "笨"]
    for argv in (["--model", folder], ["--model", plain, *explicit],
                 ["--model", folder, "--top-k", "1"],
                 ["--model", plain, "--reply-mode", "generate", "--min-length", "6",
                  "--suppress-words", "笨"]):
        assert main(["今天天气怎么样", *argv]) == 0
    sampled, same, greedy, also_greedy = capsys.readouterr().out.strip().splitlines()
    assert sampled == same and greedy == also_greedy
    assert len(sampled) >= 2 and "笨" not in sampled


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
