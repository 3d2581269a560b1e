import json
import subprocess
import sys

import pytest

pytest.importorskip("tensorflow")
pytestmark = pytest.mark.tensorflow

import onnx  # noqa: E402

from export import ExportError, export_model  # noqa: E402
from export.graphs import convert, forbidden_ops  # noqa: E402
from serve.runtime.manifest import FORMAT_VERSION, load_manifest, sha256_of  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

MANIFEST_KEYS = {
    "format_version",
    "name",
    "dims",
    "special_ids",
    "opset",
    "quantization",
    "tokenizer",
    "files",
    "training",
    "checks",
}


def test_fp32_export_matches_tensorflow(tiny_model_dir):
    manifest = load_manifest(tiny_model_dir)
    parity = manifest.checks["fp32_vs_tensorflow"]
    assert parity["samples"] >= 1
    assert parity["max_abs_log_prob_diff"] <= 1e-4
    assert parity["greedy_identical"] is True


def test_manifest_schema_hashes_and_no_absolute_paths(tiny_model_dir, tiny_checkpoint):
    data = json.loads((tiny_model_dir / "manifest.json").read_text(encoding="utf-8"))
    assert MANIFEST_KEYS <= set(data)
    assert data["format_version"] == FORMAT_VERSION
    assert data["opset"] >= 17
    assert data["special_ids"] == {"pad": 0, "unk": 1, "bos": 2, "eos": 3}
    graphs = {"encoder.onnx", "decoder.onnx", "score.onnx", "vocab.txt", "blocklist.txt"}
    assert graphs <= set(data["files"])
    assert set(data["files"]) - graphs <= {
        f"index/{p.name}" for p in (tiny_model_dir / "index").iterdir()
    }
    for name, digest in data["files"].items():
        assert sha256_of(tiny_model_dir / name) == digest
    assert data["dims"]["vocab_size"] == len(
        (tiny_model_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
    )
    assert data["training"]["corpora"], "corpus provenance is recorded"
    assert "valid_loss" in data["training"]["metrics"]
    text = json.dumps(data, ensure_ascii=False)
    for path in (str(ROOT), str(tiny_checkpoint), "/tmp/", "/root", "/home/"):
        assert path not in text


def test_exported_graphs_have_no_loop(tiny_model_dir):
    for graph in ("encoder.onnx", "decoder.onnx", "score.onnx"):
        assert forbidden_ops(onnx.load(tiny_model_dir / graph)) == []


def test_loop_detection_catches_a_gru(tmp_path):
    """A Keras GRU exports to an ONNX Loop: the export refuses such a graph."""
    import keras
    import tensorflow as tf

    gru = keras.layers.GRU(4)
    gru(tf.zeros([1, 3, 2]))

    @tf.function(input_signature=[tf.TensorSpec([None, None, 2], tf.float32, name="x")])
    def encoder(x):
        return {"y": gru(x)}

    with pytest.raises(RuntimeError, match="Loop"):
        convert(encoder, tmp_path / "gru.onnx")


def test_int8_export_records_agreement_and_is_smaller(tiny_checkpoint, tiny_model_dir, tmp_path):
    manifest = export_model(tiny_checkpoint, tmp_path / "int8", quantize="int8", check_samples=20)
    assert manifest.quantization == "int8"
    agreement = manifest.checks["int8_vs_fp32"]["greedy_agreement"]
    assert 0.0 <= agreement <= 1.0
    fp32_size = (tiny_model_dir / "decoder.onnx").stat().st_size
    assert (tmp_path / "int8" / "decoder.onnx").stat().st_size < fp32_size
    assert (tmp_path / "int8" / "score.onnx").stat().st_size < (
        tiny_model_dir / "score.onnx"
    ).stat().st_size
    load_manifest(tmp_path / "int8")  # verifies every sha256


def test_check_batches_pad_as_serving_does():
    """One padding rule (serve.runtime.batching): an empty source row becomes a lone <unk>."""
    from export.checks import batch_sources
    from serve.runtime.tokenizer import UNK_ID, Tokenizer, Vocab

    tokenizer = Tokenizer(Vocab(["<pad>", "<unk>", "<s>", "</s>", "你", "好"]))
    src_ids, src_len = batch_sources(tokenizer, ["", "你好"], max_len=30)
    assert src_ids.tolist() == [[UNK_ID, 0], [4, 5]]
    assert src_len.tolist() == [1, 2]


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ExportError, match="no such checkpoint folder"):
        export_model(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="no config.json"):
        export_model(tmp_path / "empty", tmp_path / "out")


def test_incompatible_checkpoint_version_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ExportError, match="format 99"):
        export_model(tmp_path, tmp_path / "out")


def test_cli_prints_one_line_and_exits_2_on_a_bad_checkpoint(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "export",
            "--checkpoint",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error:")
    assert "Traceback" not in result.stderr


def test_manifest_metrics_are_those_of_the_exported_weights(tmp_path):
    from export.export import _training_record

    records = [
        {"kind": "start", "valid_loss": 9.0, "time": 0.0},
        {"kind": "checkpoint", "valid_loss": None, "time": 1.0},
        {"kind": "epoch", "valid_loss": 5.0, "time": 2.0},
        {"kind": "epoch", "valid_loss": 6.0, "time": 3.0},
        {"kind": "checkpoint", "valid_loss": None, "time": 4.0},
    ]
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records), encoding="utf-8"
    )
    assert _training_record(tmp_path, {}, "best")["metrics"]["valid_loss"] == 5.0
    assert _training_record(tmp_path, {}, "latest")["metrics"]["valid_loss"] == 6.0
    assert _training_record(tmp_path, {}, "best")["training_seconds"] == 4.0
