"""serve.runtime.scoring: one onnxruntime call per graph scores a batch of candidates,
as the decoder step loop would have scored each."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytestmark = pytest.mark.tensorflow

from serve.runtime.manifest import Manifest, ModelError  # noqa: E402
from serve.runtime.model import OnnxSeq2Seq  # noqa: E402
from serve.runtime.scoring import CandidateScorer, PairScore  # noqa: E402

TEXTS = [
    ("你好", "你好呀"),
    ("今天天气怎么样", "今天天气很好，出去走走吧。"),
    ("嗯", ""),
    ("", "我在呢"),
    ("周末一起去看电影吧，听说新上映的那部很好看", "好啊"),
]


@pytest.fixture(scope="module")
def paired(tiny_checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    """(fp32 folder with score.onnx and backward_score.onnx, the backward model exported alone
    with its own decoder: the step loop to check the backward scores against)."""
    from export import export_model
    from tests.export._helpers import with_backward

    root = tmp_path_factory.mktemp("scoring")
    ckpt = with_backward(tiny_checkpoint, root / "ckpt")
    export_model(ckpt, root / "paired", quantize="none", check_samples=5, index=False)
    export_model(ckpt / "backward", root / "backward", quantize="none", check_samples=5,
                 index=False)  # fmt: skip
    return root / "paired", root / "backward"


def step_loop(model: OnnxSeq2Seq, source: list[int], target: list[int]) -> float:
    """Teacher forcing through decoder.onnx, one step a token: what decoding scores."""
    state = model.encode([source])
    prev, h, c, total = model.bos_id, state.h, state.c, 0.0
    for token in [*target, model.eos_id]:
        out = model.step(np.array([prev]), h, c, state.memory, state.memory_keys, state.src_mask)
        total += float(out.log_probs[0, token])
        prev, h, c = token, out.h, out.c
    return total


class Counting:
    """An onnxruntime session that counts its runs."""

    def __init__(self, session):
        self.session, self.runs = session, 0

    def run(self, *args, **kwargs):
        self.runs += 1
        return self.session.run(*args, **kwargs)


def id_pairs(model: OnnxSeq2Seq) -> list[tuple[list[int], list[int]]]:
    return [(model.tokenizer.encode(m), model.tokenizer.encode(r)) for m, r in TEXTS]


def test_forward_scores_equal_the_decoder_step_loop(tiny_model_dir):
    model = OnnxSeq2Seq.load(tiny_model_dir, intra_op_num_threads=1)
    scorer = CandidateScorer.load(tiny_model_dir, intra_op_num_threads=1)
    assert scorer is not None and not scorer.has_backward
    scorer.forward = Counting(scorer.forward)
    pairs = id_pairs(model)
    scores = scorer.score(pairs)
    assert scorer.forward.runs == 1  # the whole batch in one call
    for (message, reply), score in zip(pairs, scores, strict=True):
        assert isinstance(score, PairScore) and score.backward is None
        assert score.reply_length == len(reply) + 1
        assert score.message_length == len(message) + 1
        assert score.forward == pytest.approx(step_loop(model, message, reply), abs=1e-4)


def test_backward_scores_equal_the_backward_models_step_loop(paired):
    folder, backward_alone = paired
    scorer = CandidateScorer.load(folder, intra_op_num_threads=1)
    assert scorer is not None and scorer.has_backward
    scorer.forward, scorer.backward = Counting(scorer.forward), Counting(scorer.backward)
    forward_model = OnnxSeq2Seq.load(folder, intra_op_num_threads=1)
    backward_model = OnnxSeq2Seq.load(backward_alone, intra_op_num_threads=1)
    pairs = id_pairs(forward_model)
    scores = scorer.score(pairs)
    assert scorer.forward.runs == scorer.backward.runs == 1
    for (message, reply), score in zip(pairs, scores, strict=True):
        assert score.forward == pytest.approx(step_loop(forward_model, message, reply), abs=1e-4)
        # log p(message | reply): the backward model reads the reply
        expected = step_loop(backward_model, reply, message)
        assert score.backward == pytest.approx(expected, abs=1e-4)
        assert score.message_length == len(message) + 1


def test_a_row_scores_the_same_alone_and_in_a_batch(tiny_model_dir):
    model = OnnxSeq2Seq.load(tiny_model_dir, intra_op_num_threads=1)
    scorer = CandidateScorer.load(tiny_model_dir, intra_op_num_threads=1)
    pairs = id_pairs(model)
    together = scorer.score(pairs)
    for pair, score in zip(pairs, together, strict=True):
        assert scorer.score([pair])[0].forward == pytest.approx(score.forward, abs=1e-5)
    assert scorer.score([]) == []


class Shapes(Counting):
    """A session that records each run's padded (rows, source, target) shape."""

    def __init__(self, session):
        super().__init__(session)
        self.shapes: list[tuple[int, int, int]] = []

    def run(self, outputs, feeds):
        self.shapes.append((*feeds["src_ids"].shape, feeds["tgt_ids"].shape[1]))
        return super().run(outputs, feeds)


def test_rows_of_several_runs_run_by_length_and_come_back_in_order(tiny_model_dir):
    # More rows than one run takes are sorted by their lengths before they are cut into
    # runs (less padding), and each score comes back to its own pair.
    from serve.runtime.scoring import RUN_ROWS

    scorer = CandidateScorer.load(tiny_model_dir, intra_op_num_threads=1)
    rng = np.random.default_rng(3)
    pairs = [(rng.integers(4, 200, rng.integers(1, 12)).tolist(),
              rng.integers(4, 200, rng.integers(0, 25)).tolist())
             for _ in range(2 * RUN_ROWS + 5)]
    alone = [scorer.score([pair])[0] for pair in pairs]
    scorer.forward = Shapes(scorer.forward)
    together = scorer.score(pairs)
    assert [s.reply_length for s in together] == [len(r) + 1 for _, r in pairs]
    for one, score in zip(alone, together, strict=True):
        assert score.forward == pytest.approx(one.forward, abs=1e-4)
    shapes = scorer.forward.shapes
    assert [rows for rows, _, _ in shapes] == [RUN_ROWS, RUN_ROWS, 5]
    arrival = [max(len(r) for _, r in pairs[i:i + RUN_ROWS]) + 1
               for i in range(0, len(pairs), RUN_ROWS)]
    assert sum(t * rows for rows, _, t in shapes) < sum(
        t * len(pairs[i * RUN_ROWS:(i + 1) * RUN_ROWS]) for i, t in enumerate(arrival))


def drop(folder: Path, name: str, out: Path) -> Path:
    copy = Path(shutil.copytree(folder, out))
    (copy / name).unlink()
    Manifest.read(copy).write(copy)
    return copy


def test_older_folders_load_none_or_forward_only(paired, tmp_path):
    folder, _ = paired
    assert CandidateScorer.load(drop(folder, "score.onnx", tmp_path / "a")) is None
    forward_only = CandidateScorer.load(drop(folder, "backward_score.onnx", tmp_path / "b"))
    assert forward_only is not None and not forward_only.has_backward
    assert forward_only.score([([5, 6], [7])])[0].backward is None


def test_a_graph_the_manifest_does_not_list_is_refused(tiny_model_dir, tmp_path):
    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "copy"))
    shutil.copyfile(copy / "score.onnx", copy / "backward_score.onnx")  # not in the manifest
    with pytest.raises(ModelError, match="not listed"):
        CandidateScorer.load(copy)
