"""CHECKPOINT/backward/: its scoring graph ships as backward_score.onnx, parity-checked."""

import json
import shutil

import pytest

pytest.importorskip("tensorflow")
pytestmark = pytest.mark.tensorflow

from export import ExportError, export_model  # noqa: E402
from export import export as export_module  # noqa: E402
from serve.runtime.manifest import load_manifest  # noqa: E402
from tests.export._helpers import edit_config  # noqa: E402


def test_the_backward_scoring_graph_ships_checked(paired_model_dir):
    manifest = load_manifest(paired_model_dir)  # verifies every sha256
    assert "backward_score.onnx" in manifest.files
    # only the scoring graph: serving never decodes with the backward model
    assert not any(
        name.startswith("backward") and name != "backward_score.onnx" for name in manifest.files
    )
    parity = manifest.checks["backward_score"]
    assert parity["max_abs_token_diff_vs_tensorflow"] <= 1e-4
    assert parity["max_abs_sum_diff_vs_steps"] <= 1e-3
    assert "int8" in parity
    backward = manifest.training["backward"]
    assert backward["metrics"] and backward["corpora"]
    assert manifest.checks["folder_bytes"] <= 30 * 2**20


def test_a_backward_model_of_another_vocabulary_is_refused(paired_checkpoint, tmp_path):
    ckpt = shutil.copytree(paired_checkpoint, tmp_path / "ckpt")
    vocab = ckpt / "backward" / "vocab.txt"
    tokens = vocab.read_text(encoding="utf-8").splitlines()
    tokens[4], tokens[5] = tokens[5], tokens[4]  # same size, other ids
    vocab.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    with pytest.raises(ExportError, match="vocab.txt differs"):
        export_model(ckpt, tmp_path / "out", check_samples=5)


def test_a_backward_folder_that_is_not_a_backward_model_is_refused(paired_checkpoint, tmp_path):
    ckpt = shutil.copytree(paired_checkpoint, tmp_path / "ckpt")
    edit_config(ckpt / "backward", direction="forward")
    with pytest.raises(ExportError, match="not 'backward'"):
        export_model(ckpt, tmp_path / "out", check_samples=5)


def test_re_exporting_without_backward_or_index_leaves_nothing_stale(
    paired_model_dir, tiny_checkpoint, tmp_path
):
    out = shutil.copytree(paired_model_dir, tmp_path / "model")
    manifest = export_model(tiny_checkpoint, out, quantize="int8", check_samples=5, index=False)
    assert not (out / "backward_score.onnx").exists() and not (out / "index").exists()
    assert manifest.retrieval == {"skipped": "--no-index"}
    assert "backward_score" not in manifest.checks
    load_manifest(out)


def test_an_int8_folder_over_the_size_limit_is_refused(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "MAX_FOLDER_BYTES", 1000)
    with pytest.raises(ExportError, match="MB"):
        export_model(tiny_checkpoint, tmp_path / "out", check_samples=5, index=False)


def test_the_manifest_names_the_backward_run_without_paths(paired_model_dir, paired_checkpoint):
    text = (paired_model_dir / "manifest.json").read_text(encoding="utf-8")
    assert str(paired_checkpoint) not in text and "/tmp/" not in text
    assert json.loads(text)["training"]["backward"]["command"].startswith("python -m training")
