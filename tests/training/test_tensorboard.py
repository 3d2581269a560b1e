"""TensorBoard: a run's event files in OUT/tensorboard/ hold its metrics and sample replies."""

from __future__ import annotations

import pytest

pytest.importorskip("tensorflow")

from training.checkpoint import read_metrics  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.summaries import SAMPLE_REPLIES, SAMPLES_TAG, SCALARS, TENSORBOARD_DIR  # noqa: E402
from training.train import train  # noqa: E402

pytestmark = pytest.mark.tensorflow


def tiny_config(**overrides) -> TrainConfig:
    settings = dict(embed_dim=16, hidden_dim=32, batch_size=16, min_freq=1, vocab_size=2000,
                    seed=7, progress=False, checkpoint_every=5, epochs=2, eval_replies=8)
    return TrainConfig(**{**settings, **overrides})


def read_events(folder) -> tuple[dict[str, dict[int, float]], dict[int, str]]:
    """({tag: {step: value}}, {step: the sample replies' text}), every event file read."""
    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    scalars: dict[str, dict[int, float]] = {}
    texts: dict[int, str] = {}
    for path in sorted((folder / TENSORBOARD_DIR).glob("events.out.tfevents.*")):
        for raw in tf.data.TFRecordDataset(str(path)):  # as summary_iterator reads them
            event = event_pb2.Event.FromString(raw.numpy())
            for value in event.summary.value:
                array = tf.make_ndarray(value.tensor)
                if value.metadata.plugin_data.plugin_name == "text":
                    assert value.tag == SAMPLES_TAG
                    texts[event.step] = array.item().decode("utf-8")
                else:
                    scalars.setdefault(value.tag, {})[event.step] = float(array)
    return scalars, texts


def test_a_resumed_run_writes_every_metrics_record_and_sample_replies(synthetic_corpus,
                                                                       tmp_path):
    # 10 batches an epoch: stop mid-epoch 2 (step 13), resume to the end (step 20).
    out = train(tiny_config(max_steps=13), [synthetic_corpus], tmp_path / "run")
    train(tiny_config(), [synthetic_corpus], out, resume=True)
    assert len(list((out / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 2

    scalars, texts = read_events(out)
    records = read_metrics(out)
    assert {r["kind"] for r in records} == {"start", "checkpoint", "end", "epoch"}
    for record in records:
        for key, tag in SCALARS.items():
            if record.get(key) is not None:
                assert scalars[tag][record["step"]] == pytest.approx(record[key], rel=1e-6)
    assert set(scalars["loss/train"]) >= {5, 10, 13, 15, 20}  # 13: the first run's end
    assert scalars["loss/valid"].keys() >= {0, 10, 20}
    assert scalars["replies/bleu2"].keys() == {10, 20}  # epoch ends only

    assert set(texts) == {10, 20}
    questions = [line.split("\t")[0] for line in
                 (out / "valid.tsv").read_text("utf-8").splitlines()[:SAMPLE_REPLIES]]
    table = texts[20].splitlines()
    assert table[0] == "| question | reply | reference |"
    assert [row.split(" | ")[0].removeprefix("| ") for row in table[2:]] == questions
