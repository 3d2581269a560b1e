"""score.onnx: the teacher-forced pass scores whole replies as the decoder steps would."""

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytestmark = pytest.mark.tensorflow

import onnx  # noqa: E402

from export.checks import onnx_functions, onnx_score_function, score_batch, step_sums  # noqa: E402
from serve.runtime.manifest import SCORE_INPUTS, SCORE_OUTPUTS, load_manifest  # noqa: E402
from serve.runtime.tokenizer import EOS_ID, Tokenizer  # noqa: E402

PAIRS = [
    ("你好", "你好呀"),
    ("今天天气怎么样", "今天天气很好，出去走走吧。"),
    ("嗯", ""),  # an empty reply is still scored: its </s>
    ("", "我在呢"),  # an empty message is read as <unk>
    ("周末一起去看电影吧，听说新上映的那部很好看", "好啊"),
]


@pytest.fixture(scope="module")
def batch(tiny_model_dir):
    manifest = load_manifest(tiny_model_dir)
    tokenizer = Tokenizer.from_dir(tiny_model_dir, manifest.tokenizer)
    return score_batch(tokenizer, PAIRS, max_src_len=30, max_tgt_len=30)


def test_the_scoring_graph_follows_its_contract(tiny_model_dir):
    graph = onnx.load(tiny_model_dir / "score.onnx")
    assert [i.name for i in graph.graph.input] == list(SCORE_INPUTS)
    assert [o.name for o in graph.graph.output] == list(SCORE_OUTPUTS)


def test_scoring_graph_equals_summed_step_log_probs(tiny_model_dir, batch):
    _, _, tgt_ids, tgt_len = batch
    assert (tgt_ids[np.arange(len(tgt_len)), tgt_len - 1] == EOS_ID).all()
    token_log_probs = onnx_score_function(tiny_model_dir / "score.onnx")(*batch)
    assert token_log_probs.shape == tgt_ids.shape
    padding = np.arange(tgt_ids.shape[1])[None, :] >= tgt_len[:, None]
    assert (token_log_probs[padding] == 0).all()
    assert (token_log_probs[~padding] < 0).all()
    steps = step_sums(*onnx_functions(tiny_model_dir), batch)
    np.testing.assert_allclose(token_log_probs.sum(axis=1), steps, atol=1e-4, rtol=0)


def test_a_row_scores_the_same_alone_and_in_a_padded_batch(tiny_model_dir, batch):
    score = onnx_score_function(tiny_model_dir / "score.onnx")
    together = score(*batch).sum(axis=1)
    for i in range(len(PAIRS)):
        src_ids, src_len, tgt_ids, tgt_len = (a[i : i + 1] for a in batch)
        alone = score(src_ids[:, : src_len[0]], src_len, tgt_ids[:, : tgt_len[0]], tgt_len)
        np.testing.assert_allclose(alone.sum(), together[i], atol=1e-5)


def test_the_manifest_records_the_scoring_parity(tiny_model_dir):
    score = load_manifest(tiny_model_dir).checks["score"]
    assert score["samples"] >= 1
    assert score["max_abs_token_diff_vs_tensorflow"] <= 1e-4
    assert score["max_abs_sum_diff_vs_steps"] <= 1e-3
    assert score["mean_reply_log_prob"] < 0


def test_int8_scoring_graph_is_quantized_and_recorded(paired_model_dir):
    ops = {node.op_type for node in onnx.load(paired_model_dir / "score.onnx").graph.node}
    assert ops & {"DynamicQuantizeLSTM", "MatMulInteger", "DynamicQuantizeMatMul"}
    int8 = load_manifest(paired_model_dir).checks["score"]["int8"]
    assert int8["samples"] >= 1 and int8["max_abs_sum_diff_vs_fp32"] >= 0
