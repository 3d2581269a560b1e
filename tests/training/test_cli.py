"""``python -m training`` in a subprocess: one clear error line per bad input, Ctrl-C, resume."""

from __future__ import annotations

import json
import re
import signal
import time

import numpy as np
import pytest

from tests.training._helpers import TINY, run_cli, start_cli
from training.checkpoint import read_metrics


def assert_one_clear_error(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


def test_missing_corpus_file(tmp_path):
    result = run_cli("--corpus", tmp_path / "nope.tsv", "--out", tmp_path / "out")
    assert_one_clear_error(result, "corpus file not found", "nope.tsv")
    assert not (tmp_path / "out").exists()


def test_corpus_empty_after_cleaning(tmp_path):
    corpus = tmp_path / "rude.tsv"
    corpus.write_text("你是傻逼\t你才是\n\x07\t好\n滚蛋\t不滚\n", encoding="utf-8")
    result = run_cli("--corpus", corpus, "--out", tmp_path / "out")
    assert_one_clear_error(result, "empty after cleaning", "blocklist 2", "empty 1")


def test_malformed_line_names_file_and_line(tmp_path):
    corpus = tmp_path / "broken.tsv"
    corpus.write_text("你好\t你好呀\n今天天气不错\t是啊\n这行没有制表符\n", encoding="utf-8")
    result = run_cli("--corpus", corpus, "--out", tmp_path / "out", "--format", "tsv")
    assert_one_clear_error(result, "broken.tsv:3:", "TAB")


def test_config_value_out_of_range_from_a_flag_and_from_toml(tmp_path, synthetic_corpus):
    result = run_cli("--corpus", synthetic_corpus, "--out", tmp_path / "out", "--dropout", "1.5")
    assert_one_clear_error(result, "dropout must be in [0, 1)", "1.5")
    toml = tmp_path / "bad.toml"
    toml.write_text("[train]\nbatch_size = 0\n", encoding="utf-8")
    result = run_cli("--corpus", synthetic_corpus, "--out", tmp_path / "out", "--config", toml)
    assert_one_clear_error(result, "batch_size must be >= 1")


def test_missing_blocklist_and_missing_checkpoint_to_resume(tmp_path, synthetic_corpus):
    result = run_cli("--corpus", synthetic_corpus, "--out", tmp_path / "out",
                     "--blocklist", tmp_path / "nope.txt")
    assert_one_clear_error(result, "blocklist file not found")
    result = run_cli("--corpus", synthetic_corpus, "--out", tmp_path / "out", "--resume")
    assert_one_clear_error(result, "not a checkpoint folder")


def final_weights(out) -> list[np.ndarray]:
    from training.checkpoint import load_checkpoint

    return load_checkpoint(out)[0].get_weights()


@pytest.mark.slow
@pytest.mark.tensorflow
def test_ctrl_c_saves_and_resume_ends_where_an_uninterrupted_run_does(tmp_path,
                                                                      synthetic_corpus):
    pytest.importorskip("tensorflow")
    args = ["--corpus", synthetic_corpus, *TINY, "--epochs", "100", "--max-steps", "150",
            "--checkpoint-every", "25"]
    whole = run_cli(*args, "--out", tmp_path / "whole", timeout=300)
    assert whole.returncode == 0, whole.stderr

    part = tmp_path / "part"
    proc = start_cli(*args, "--out", part)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            metrics = part / "metrics.jsonl"
            if metrics.is_file() and '"kind": "checkpoint"' in metrics.read_text("utf-8"):
                break  # training runs: interrupt it now
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "interrupted at step" in stderr and "--resume" in stderr
    assert "Traceback" not in stderr
    stopped_at = int(re.search(r"interrupted at step (\d+)", stderr).group(1))
    assert 25 <= stopped_at < 150

    resumed = run_cli(*args, "--out", part, "--resume", timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed at step {stopped_at}" in resumed.stderr
    for a, b in zip(final_weights(tmp_path / "whole"), final_weights(part), strict=True):
        np.testing.assert_array_equal(a, b)
    config = json.loads((part / "config.json").read_text(encoding="utf-8"))
    assert str(tmp_path) not in config["command"]
    # The recipe: the command that started the run, then the one that resumed it.
    assert "--resume" not in config["command"] and len(config["resumed_with"]) == 1
    assert "--resume" in config["resumed_with"][0]


@pytest.mark.tensorflow
def test_a_run_is_reproduced_from_its_config_json(tmp_path, synthetic_corpus):
    pytest.importorskip("tensorflow")
    first, second = tmp_path / "first", tmp_path / "second"
    result = run_cli("--corpus", synthetic_corpus, *TINY, "--epochs", "2", "--max-steps", "12",
                     "--checkpoint-every", "5", "--eval-replies", "4", "--dropout", "0.1",
                     "--out", first, timeout=300)
    assert result.returncode == 0, result.stderr
    result = run_cli("--config", first / "config.json", "--corpus", synthetic_corpus,
                     "--out", second, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr  # the same corpus, every setting known

    def config(folder):
        return json.loads((folder / "config.json").read_text("utf-8"))

    assert config(second)["train"] == config(first)["train"]
    assert config(second)["corpora"] == config(first)["corpora"]
    assert [m["step"] for m in read_metrics(second)] == [m["step"] for m in read_metrics(first)]
    for a, b in zip(final_weights(first), final_weights(second), strict=True):
        np.testing.assert_array_equal(a, b)
