"""Scoring whole candidate replies: log p(reply | message) and log p(message | reply).

``score.onnx`` is the forward model's teacher-forced pass, ``backward_score.onnx`` the
backward model's (trained answer -> question); export writes both (the second only when
training made a backward model) and checks them against the decoder steps. One
onnxruntime call per graph scores a whole batch of (message, reply) pairs::

    scorer = CandidateScorer.load(model_dir)    # None when the folder has no score.onnx
    scorer.score([(message_ids, reply_ids), ...])  # [PairScore, ...], in order

Lengths count the ``</s>`` each side is scored with, as ``serve.runtime.selection``
normalises by them. Sessions are onnxruntime's, safe to call from several threads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serve.runtime.batching import pad_id_rows
from serve.runtime.manifest import (
    BACKWARD_SCORE_FILE,
    SCORE_FILE,
    SCORE_INPUTS,
    SCORE_OUTPUTS,
    Manifest,
    ModelError,
)
from serve.runtime.sessions import ort_session, run_named
from serve.runtime.tokenizer import EOS_ID, PAD_ID, UNK_ID

IdPair = tuple[Sequence[int], Sequence[int]]  # (message ids, reply ids), no </s>


@dataclass(frozen=True)
class PairScore:
    forward: float  # sum of log p(reply tokens and </s> | message)
    reply_length: int  # the reply's tokens plus its </s>
    backward: float | None  # sum of log p(message tokens and </s> | reply); None: no graph
    message_length: int  # the message's tokens plus its </s>


def _session(model_dir: Path, manifest: Manifest, name: str, intra: int, inter: int):
    path = model_dir / name
    if not path.is_file():
        return None
    if name not in manifest.files:  # a graph the manifest does not vouch for is not served
        raise ModelError(f"{model_dir}: {name} is not listed in the manifest")
    # A batch's [B,T,V] log-probs are tens of MB: freed after each call, not kept.
    session = ort_session(path, intra, inter, memory_arena=False)
    have_in = {i.name for i in session.get_inputs()}
    have_out = {o.name for o in session.get_outputs()}
    if have_in != set(SCORE_INPUTS) or not set(SCORE_OUTPUTS) <= have_out:
        raise ModelError(
            f"{path}: inputs {sorted(have_in)} / outputs {sorted(have_out)} do not match the "
            f"scoring contract (inputs {list(SCORE_INPUTS)}, outputs {list(SCORE_OUTPUTS)})"
        )
    return session


def _run(
    session: ort.InferenceSession,
    sources: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
) -> tuple[np.ndarray, np.ndarray]:
    """Per row: (summed log-prob of target + </s>, its length), ``RUN_ROWS`` rows a run.

    A run pads every row to its longest source and target: rows of more than one run
    are sorted by their lengths first, so that a short reply is not run at the length of
    a long one (12% less time for the 36 rows of four benchmark requests). Rows that
    fit one run are run as they come."""
    if len(sources) <= RUN_ROWS:
        return _run_rows(session, sources, targets)
    order = sorted(range(len(sources)), key=lambda i: (len(targets[i]), len(sources[i])))
    sums, lengths = np.empty(len(sources)), np.empty(len(sources), np.int64)
    for start in range(0, len(order), RUN_ROWS):
        rows = order[start : start + RUN_ROWS]
        sums[rows], lengths[rows] = _run_rows(session, [sources[i] for i in rows],
                                              [targets[i] for i in rows])
    return sums, lengths


def _run_rows(
    session: ort.InferenceSession,
    sources: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
) -> tuple[np.ndarray, np.ndarray]:
    """One onnxruntime run of these rows."""
    src_ids, src_len = pad_id_rows(sources, pad_id=PAD_ID, empty_id=UNK_ID)
    tgt_ids, tgt_len = pad_id_rows([[*t, EOS_ID] for t in targets], pad_id=PAD_ID)
    feeds = {"src_ids": src_ids, "src_len": src_len, "tgt_ids": tgt_ids, "tgt_len": tgt_len}
    token_log_probs = run_named(session, SCORE_OUTPUTS, feeds)[SCORE_OUTPUTS[0]]
    # the graph writes 0 at padding; sum in float64 so long batches round the same way
    return token_log_probs.astype(np.float64).sum(axis=1), tgt_len


# Rows per onnxruntime run: a run holds rows x longest target x vocabulary floats, a few
# such tensors at once (12 x 30 x 12k: 17 MB each). A batch of many requests' pairs is
# run in slices of this size (per-row cost is flat from here on), which bounds the peak
# memory of a scoring call whatever the batch (measured with the shipped folder at 32
# concurrent hybrid requests: peak RSS about 100 MB lower than one run per batch).
RUN_ROWS = 12


class CandidateScorer:
    """The scoring graphs of a model folder (forward always, backward when exported)."""

    def __init__(self, forward: ort.InferenceSession, backward: ort.InferenceSession | None):
        self.forward = forward
        self.backward = backward

    @property
    def has_backward(self) -> bool:
        return self.backward is not None

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        *,
        intra_op_num_threads: int = 0,
        inter_op_num_threads: int = 1,
    ) -> CandidateScorer | None:
        """The folder's scorer, or None when it has no score.onnx (an older export).

        Hashes are not re-checked here: ``OnnxSeq2Seq.load`` verifies every file the
        manifest lists, these graphs included; a graph it does not list is refused.
        """
        model_dir = Path(model_dir)
        manifest = Manifest.read(model_dir)
        threads = (intra_op_num_threads, inter_op_num_threads)
        forward = _session(model_dir, manifest, SCORE_FILE, *threads)
        if forward is None:
            return None
        return cls(forward, _session(model_dir, manifest, BACKWARD_SCORE_FILE, *threads))

    def score(self, pairs: Sequence[IdPair], *, forward: bool = True) -> list[PairScore]:
        """Score (message ids, reply ids) pairs, one onnxruntime call per graph for all;
        ``forward=False`` skips the forward graph (its scores are then 0: for weights that
        give it no say).

        Ids exclude ``</s>`` (it is appended and scored); an empty message or reply is read
        as ``<unk>`` where it is the source, as encoding reads it. Memory grows with
        pairs x longest reply x vocabulary: score tens of candidates at a time, not
        thousands.
        """
        if not pairs:
            return []
        messages = [list(m) for m, _ in pairs]
        replies = [list(r) for _, r in pairs]
        if forward:
            forward_sums, reply_len = _run(self.forward, messages, replies)
        else:
            forward_sums, reply_len = np.zeros(len(pairs)), np.array([len(r) + 1 for r in replies])
        if self.backward is not None:
            backward, message_len = _run(self.backward, replies, messages)
        else:
            backward, message_len = None, np.array([len(m) + 1 for m in messages])
        backward = [None] * len(pairs) if backward is None else backward.tolist()
        return [PairScore(*row) for row in zip(forward_sums.tolist(), reply_len.tolist(),
                                               backward, message_len.tolist(), strict=True)]
