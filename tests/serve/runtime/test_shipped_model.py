"""The shipped model folder: what a newcomer chats with (loads without TensorFlow)."""

import json

from serve.runtime.manifest import load_manifest
from serve.runtime.model import OnnxSeq2Seq
from serve.runtime.options import DecodingOptions
from serve.runtime.search import generate
from tests.conftest import SHIPPED_MODEL

MAX_FOLDER_BYTES = 30 * 1024 * 1024


def test_folder_is_complete_verified_int8_and_small():
    manifest = load_manifest(SHIPPED_MODEL)  # checks every file's sha256
    assert manifest.name == "xiaox"
    assert manifest.quantization == "int8"
    assert {"encoder.onnx", "decoder.onnx", "vocab.txt", "blocklist.txt"} <= set(manifest.files)
    assert sum(p.stat().st_size for p in SHIPPED_MODEL.iterdir()) <= MAX_FOLDER_BYTES


def test_manifest_records_how_it_was_made_without_machine_paths():
    manifest = load_manifest(SHIPPED_MODEL, verify=False)
    training = manifest.training
    assert training["command"].startswith("python -m training")
    assert training["export_command"].startswith("python -m export")
    assert {c["file"] for c in training["corpora"]} == {
        "XHJ_5w.txt", "LCCC-base_valid.json", "CDial-toy_train.txt"}
    assert all(c["pairs"] > 0 for c in training["corpora"])
    assert training["training_seconds"] > 0
    assert training["metrics"]["valid_ppl"] > 1
    parity = manifest.checks["fp32_vs_tensorflow"]
    assert parity["samples"] >= 200 and parity["max_abs_log_prob_diff"] <= 1e-4
    text = json.dumps(manifest.training, ensure_ascii=False)
    assert "/root" not in text and "/home/" not in text and "/work/" not in text


def test_it_answers_in_every_decoding_mode():
    model = OnnxSeq2Seq.load(SHIPPED_MODEL)
    for options in (DecodingOptions(), DecodingOptions(beam_size=5, num_hypotheses=3),
                    DecodingOptions(sampling_topk=0, sampling_topp=0.9, seed=1)):
        result = generate(model, "你好", options)
        assert result.text.strip()
        assert not any(word in result.text for word in model.blocklist_words)
