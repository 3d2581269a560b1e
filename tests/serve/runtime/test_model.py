"""Loading a model folder on onnxruntime: the contract, the checks, exact padding."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from serve.runtime.batching import pad_id_rows
from serve.runtime.manifest import ModelError
from serve.runtime.model import OnnxSeq2Seq


@pytest.fixture
def copy_of(model_dir, tmp_path) -> Path:
    return Path(shutil.copytree(model_dir, tmp_path / "model"))


def test_encode_and_step_follow_the_contract(model):
    ids = [model.tokenizer.encode("你好"), model.tokenizer.encode("今天天气怎么样")]
    state = model.encode(ids)
    batch, longest, hidden = 2, max(len(r) for r in ids), model.hidden_dim
    assert state.memory.shape == state.memory_keys.shape == (batch, longest, hidden)
    assert state.h.shape == state.c.shape == (batch, hidden)
    assert state.lengths.tolist() == [len(r) for r in ids]
    assert not state.memory[0, len(ids[0]) :].any()  # padding carries zeros
    inputs = (np.full(batch, model.bos_id), state.h, state.c,
              state.memory, state.memory_keys, state.src_mask)
    out = model.step(*inputs, attention=True)
    assert out.log_probs.shape == (batch, model.vocab_size)
    np.testing.assert_allclose(np.exp(out.log_probs).sum(axis=1), 1.0, rtol=1e-4)
    assert out.attention.shape == (batch, longest)
    assert not out.attention[0, len(ids[0]) :].any()  # masked positions get no weight
    plain = model.step(*inputs)  # what decoding runs: no attention fetched
    assert plain.attention is None
    for name in ("log_probs", "h", "c"):
        np.testing.assert_array_equal(getattr(plain, name), getattr(out, name))


def test_one_row_is_padded_and_masked_as_in_a_batch_of_equal_rows(model):
    for row in ([5, 6, 7], (9,), []):
        ids, lengths = pad_id_rows([row])
        twin_ids, twin_lengths = pad_id_rows([row, list(row) or [1]])  # the general path
        assert ids.dtype == lengths.dtype == np.int64
        np.testing.assert_array_equal(ids, twin_ids[:1])
        np.testing.assert_array_equal(lengths, twin_lengths[:1])
    one = model.encode([[5, 6, 7]])
    pair = model.encode([[5, 6, 7], [8, 9, 10]])
    assert one.src_mask.dtype == np.float32
    np.testing.assert_array_equal(one.src_mask, pair.src_mask[:1])


def test_an_empty_source_row_still_encodes(model):
    assert model.encode([[]]).memory.shape[1] == 1
    with pytest.raises(ValueError):
        model.encode([])


def _pad_memory(
    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stack (memory [S_i,H], memory_keys [S_i,H], src_mask [S_i]) rows of different
    source lengths into [B,S,H], [B,S,H], [B,S]: zeros and mask 0 at the padding,
    which the attention ignores exactly (its weight there is exp(-1e9) = 0)."""
    max_len = max(m.shape[0] for m, _, _ in rows)
    hidden = rows[0][0].shape[1]
    memory = np.zeros((len(rows), max_len, hidden), np.float32)
    keys = np.zeros((len(rows), max_len, hidden), np.float32)
    mask = np.zeros((len(rows), max_len), np.float32)
    for i, (m, k, s) in enumerate(rows):
        memory[i, : m.shape[0]] = m
        keys[i, : k.shape[0]] = k
        mask[i, : s.shape[0]] = s
    return memory, keys, mask


@pytest.mark.tensorflow
def test_padding_to_a_longer_source_changes_nothing(tiny_model_dir):
    # What makes batching exact: a row's step is the same alone and padded in a batch.
    model = OnnxSeq2Seq.load(tiny_model_dir, intra_op_num_threads=1)
    texts = ["嗯", "你好", "周末一起去看电影吧，听说新上映的那部很好看", "你叫什么名字"]
    rows = [model.encode([model.tokenizer.encode(t)]) for t in texts]
    memory, keys, mask = _pad_memory([(r.memory[0], r.memory_keys[0], r.src_mask[0]) for r in rows])
    prev = np.array([5, 6, 7, 8])
    h = np.concatenate([r.h for r in rows])
    c = np.concatenate([r.c for r in rows])
    batched = model.step(prev, h, c, memory, keys, mask, attention=True)
    for i, r in enumerate(rows):
        alone = model.step(prev[i : i + 1], r.h, r.c, r.memory, r.memory_keys, r.src_mask,
                           attention=True)
        length = r.memory.shape[1]
        np.testing.assert_array_equal(batched.log_probs[i], alone.log_probs[0])
        np.testing.assert_array_equal(batched.h[i], alone.h[0])
        np.testing.assert_array_equal(batched.c[i], alone.c[0])
        np.testing.assert_array_equal(batched.attention[i, :length], alone.attention[0])


def test_a_changed_file_is_refused(copy_of):
    with open(copy_of / "decoder.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelError, match="decoder.onnx has sha256 .* the manifest says"):
        OnnxSeq2Seq.load(copy_of)


def test_a_missing_file_is_refused(copy_of):
    (copy_of / "vocab.txt").unlink()
    with pytest.raises(ModelError, match="vocab.txt is missing"):
        OnnxSeq2Seq.load(copy_of)


def test_no_manifest_or_no_folder_is_refused(copy_of, tmp_path):
    (copy_of / "manifest.json").unlink()
    with pytest.raises(ModelError, match="no manifest.json"):
        OnnxSeq2Seq.load(copy_of)
    with pytest.raises(ModelError, match="no such model folder"):
        OnnxSeq2Seq.load(tmp_path / "nowhere")


def test_verify_false_skips_the_hashes(copy_of):
    manifest = json.loads((copy_of / "manifest.json").read_text(encoding="utf-8"))
    manifest["files"]["encoder.onnx"] = "0" * 64
    (copy_of / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(ModelError, match="encoder.onnx has sha256"):
        OnnxSeq2Seq.load(copy_of)
    assert OnnxSeq2Seq.load(copy_of, verify=False).vocab_size > 4


def test_graphs_that_break_the_contract_are_refused(copy_of):
    from serve.runtime.manifest import Manifest

    encoder, decoder = copy_of / "encoder.onnx", copy_of / "decoder.onnx"
    swapped = encoder.read_bytes()
    encoder.write_bytes(decoder.read_bytes())
    decoder.write_bytes(swapped)
    Manifest.read(copy_of).write(copy_of)  # honest hashes of the swapped files
    with pytest.raises(ModelError, match="do not match the contract"):
        OnnxSeq2Seq.load(copy_of)


def test_a_corrupt_graph_is_a_model_error(copy_of):
    from serve.runtime.manifest import Manifest

    (copy_of / "decoder.onnx").write_bytes(b"not a graph")
    Manifest.read(copy_of).write(copy_of)
    with pytest.raises(ModelError, match="onnxruntime cannot load it"):
        OnnxSeq2Seq.load(copy_of)
