"""TensorBoard event files of a run, in ``OUT/tensorboard/``: ``tensorboard --logdir OUT``.

Each record ``metrics.jsonl`` gets (start, checkpoint, epoch and end of a partial epoch) is
also written as scalars at its step, and each epoch end adds a few validation questions
with their greedy reply as text. The writer only writes files: it draws no random number
and creates no variable, so an exact resume stays exact. A resumed run appends a new event
file to the same folder; TensorBoard reads the folder's files as one run (a step written
again after a resume replaces the discarded records' later steps).

The summaries are written with ``tf.summary.write`` and the metadata of TensorBoard's
scalars and text plugins: ``tf.summary.scalar`` and ``tf.summary.text`` would need the
tensorboard package, which training does not depend on (only viewing the logs does).
"""

from __future__ import annotations

from pathlib import Path

TENSORBOARD_DIR = "tensorboard"
SAMPLE_REPLIES = 5  # validation questions shown with their greedy reply at each epoch end
SAMPLES_TAG = "replies/samples"

# metrics.jsonl key -> TensorBoard tag (train and valid loss share a chart)
SCALARS = {
    "train_loss": "loss/train",
    "valid_loss": "loss/valid",
    "valid_ppl": "valid/perplexity",
    "learning_rate": "train/learning_rate",
    "tokens_per_s": "train/tokens_per_s",
    "valid_distinct2": "replies/distinct2",
    "valid_top10_share": "replies/top10_share",
    "valid_bleu2": "replies/bleu2",
}


def _cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ") or " "


def samples_markdown(samples: list[tuple[str, str, str]]) -> str:
    """(question, greedy reply, reference answer) rows as a Markdown table."""
    rows = ["| question | reply | reference |", "| --- | --- | --- |"]
    rows += [f"| {_cell(q)} | {_cell(r)} | {_cell(a)} |" for q, r, a in samples]
    return "\n".join(rows)


class Summaries:
    """One model's TensorBoard writer (``out / TENSORBOARD_DIR``); flushed at each record."""

    def __init__(self, out: Path):
        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2

        self._tf = tf
        self.writer = tf.summary.create_file_writer(str(Path(out) / TENSORBOARD_DIR))
        # What tf.summary.scalar / tf.summary.text write (their plugin data, version 0).
        self._scalar = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
            data_class=summary_pb2.DATA_CLASS_SCALAR)
        self._text = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"),
            data_class=summary_pb2.DATA_CLASS_TENSOR)

    def record(self, record: dict) -> None:
        """The scalars of one metrics.jsonl record (its ``None`` values skipped)."""
        tf = self._tf
        with self.writer.as_default(step=int(record["step"])):
            for key, tag in SCALARS.items():
                value = record.get(key)
                if value is not None:
                    tf.summary.write(tag, tf.constant(float(value), tf.float32),
                                     metadata=self._scalar)
        self.writer.flush()

    def samples(self, step: int, samples: list[tuple[str, str, str]]) -> None:
        if not samples:
            return
        with self.writer.as_default(step=int(step)):
            self._tf.summary.write(SAMPLES_TAG, self._tf.constant(samples_markdown(samples)),
                                   metadata=self._text)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
