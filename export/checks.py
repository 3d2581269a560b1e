"""Export checks itself: fp32 ONNX against TensorFlow, int8 against fp32, scores vs steps.

Both sides decode greedily in one batch over held-out questions. For fp32 vs TF the
ONNX step is fed TensorFlow's chosen tokens, so the log-probabilities are compared
position by position on the same path; the greedy replies are then compared whole.

The scoring graph is checked on held-out (question, answer) pairs twice: token by token
against TensorFlow's teacher-forced pass, and row sums against the decoder step graph
fed the same reply (what decoding would have scored), so the two graphs cannot drift.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serve.runtime.batching import pad_id_rows
from serve.runtime.manifest import (
    DECODER_FILE,
    DECODER_OUTPUTS,
    ENCODER_FILE,
    ENCODER_OUTPUTS,
    SCORE_OUTPUTS,
)
from serve.runtime.sessions import ort_session, run_named
from serve.runtime.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

# encode(src_ids, src_len) -> dict of ENCODER_OUTPUTS; step(prev, h, c, mem, keys, mask) -> dict
EncodeFn = Callable[[np.ndarray, np.ndarray], dict]
StepFn = Callable[..., dict]
# score(src_ids, src_len, tgt_ids, tgt_len) -> token_log_probs [B,T]
ScoreFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]
ScoreBatch = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@dataclass
class Trace:
    tokens: np.ndarray  # [N, T] greedy token ids (EOS then PAD once a row is done)
    log_probs: list[np.ndarray]  # per step [N, V]
    alive: list[np.ndarray]  # per step [N] bool: the row had not finished before this step


def batch_sources(
    tokenizer: Tokenizer, questions: Sequence[str], max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Source rows padded as serving pads them (an empty row becomes ``<unk>``)."""
    return pad_id_rows([tokenizer.encode(q)[:max_len] for q in questions])


def score_batch(
    tokenizer: Tokenizer,
    pairs: Sequence[tuple[str, str]],
    max_src_len: int,
    max_tgt_len: int,
) -> ScoreBatch:
    """(src_ids, src_len, tgt_ids, tgt_len) of (source, target) text pairs; targets end in </s>."""
    src_ids, src_len = batch_sources(tokenizer, [s for s, _ in pairs], max_src_len)
    targets = [tokenizer.encode(t)[:max_tgt_len] + [EOS_ID] for _, t in pairs]
    tgt_ids, tgt_len = pad_id_rows(targets)
    return src_ids, src_len, tgt_ids, tgt_len


def greedy_trace(
    encode: EncodeFn,
    step: StepFn,
    src_ids: np.ndarray,
    src_len: np.ndarray,
    max_len: int,
    forced: np.ndarray | None = None,
) -> Trace:
    """Batched greedy decoding; with ``forced`` the given tokens are fed instead of argmax."""
    enc = encode(src_ids, src_len)
    memory, keys, h, c = (np.asarray(enc[name]) for name in ENCODER_OUTPUTS)
    mask = (np.arange(src_ids.shape[1])[None, :] < src_len[:, None]).astype(np.float32)
    n = src_ids.shape[0]
    prev = np.full(n, BOS_ID, dtype=np.int64)
    done = np.zeros(n, dtype=bool)
    tokens, log_probs, alive = [], [], []
    for t in range(max_len):
        out = step(prev, h, c, memory, keys, mask)
        logp, h, c = (np.asarray(out[name]) for name in DECODER_OUTPUTS[:3])
        choice = logp.argmax(-1) if forced is None else forced[:, t]
        choice = np.where(done, PAD_ID, choice)
        log_probs.append(logp)
        alive.append(~done)
        tokens.append(choice)
        done |= choice == EOS_ID
        prev = choice.astype(np.int64)
        if done.all():
            break
    return Trace(np.stack(tokens, axis=1), log_probs, alive)


def onnx_functions(model_dir: Path, threads: int = 2) -> tuple[EncodeFn, StepFn]:
    enc = ort_session(model_dir / ENCODER_FILE, intra=threads)
    dec = ort_session(model_dir / DECODER_FILE, intra=threads)

    def encode(src_ids, src_len):
        return run_named(enc, ENCODER_OUTPUTS, {"src_ids": src_ids, "src_len": src_len})

    def step(prev, h, c, memory, keys, mask):
        feeds = {
            "prev_ids": prev,
            "h": h,
            "c": c,
            "memory": memory,
            "memory_keys": keys,
            "src_mask": mask,
        }
        return run_named(dec, DECODER_OUTPUTS, feeds)

    return encode, step


def onnx_score_function(path: Path, threads: int = 2) -> ScoreFn:
    session = ort_session(path, intra=threads)

    def score(src_ids, src_len, tgt_ids, tgt_len):
        feeds = {"src_ids": src_ids, "src_len": src_len, "tgt_ids": tgt_ids, "tgt_len": tgt_len}
        return run_named(session, SCORE_OUTPUTS, feeds)[SCORE_OUTPUTS[0]]

    return score


def tensorflow_score_function(function: Callable[..., dict]) -> ScoreFn:
    """graphs.score_function's tf.function as a numpy ScoreFn."""
    return lambda *batch: function(*batch)[SCORE_OUTPUTS[0]].numpy()


def replies_equal(a: Trace, b: Trace) -> np.ndarray:
    """Per row: identical greedy token sequences (up to EOS)."""
    width = max(a.tokens.shape[1], b.tokens.shape[1])
    pad = lambda x: np.pad(x, ((0, 0), (0, width - x.shape[1])))  # noqa: E731
    return (pad(a.tokens) == pad(b.tokens)).all(axis=1)


def max_log_prob_diff(a: Trace, b: Trace) -> float:
    worst = 0.0
    for la, lb, alive in zip(a.log_probs, b.log_probs, a.alive, strict=False):
        if alive.any():
            worst = max(worst, float(np.abs(la[alive] - lb[alive]).max()))
    return worst


def compare(
    reference: tuple[EncodeFn, StepFn],
    candidate: tuple[EncodeFn, StepFn],
    src_ids: np.ndarray,
    src_len: np.ndarray,
    max_len: int,
) -> dict:
    """Greedy agreement and the worst log-prob difference on the reference's own path."""
    ref = greedy_trace(*reference, src_ids, src_len, max_len)
    forced = greedy_trace(*candidate, src_ids, src_len, ref.tokens.shape[1], forced=ref.tokens)
    free = greedy_trace(*candidate, src_ids, src_len, max_len)
    agree = replies_equal(ref, free)
    return {
        "samples": int(len(src_ids)),
        "max_abs_log_prob_diff": max_log_prob_diff(ref, forced),
        "greedy_agreement": float(agree.mean()),
        "greedy_identical": bool(agree.all()),
    }


def step_sums(encode: EncodeFn, step: StepFn, batch: ScoreBatch) -> np.ndarray:
    """Per row: the sum of the decoder step's log-probs along the target (teacher forcing)."""
    src_ids, src_len, tgt_ids, _ = batch
    trace = greedy_trace(encode, step, src_ids, src_len, tgt_ids.shape[1], forced=tgt_ids)
    total = np.zeros(len(src_ids), np.float64)
    for t, (logp, alive) in enumerate(zip(trace.log_probs, trace.alive, strict=True)):
        picked = np.take_along_axis(logp, tgt_ids[:, t : t + 1], axis=1)[:, 0]
        total += np.where(alive, picked, 0.0)
    return total


def compare_scores(
    graph: ScoreFn,
    batch: ScoreBatch,
    *,
    tensorflow: ScoreFn | None = None,
    steps: tuple[EncodeFn, StepFn] | None = None,
    fp32: ScoreFn | None = None,
) -> dict:
    """The scoring graph against TensorFlow (per token), the step graph (per row sum) and/or
    the fp32 scoring graph (per row sum, for int8)."""
    scores = np.asarray(graph(*batch), np.float64)
    sums = scores.sum(axis=1)
    result: dict = {"samples": int(len(sums)), "mean_reply_log_prob": float(sums.mean())}
    if tensorflow is not None:
        diff = np.abs(scores - tensorflow(*batch))
        result["max_abs_token_diff_vs_tensorflow"] = float(diff.max())
    if steps is not None:
        diff = np.abs(sums - step_sums(*steps, batch))
        result["max_abs_sum_diff_vs_steps"] = float(diff.max())
    if fp32 is not None:
        diff = np.abs(sums - np.asarray(fp32(*batch), np.float64).sum(axis=1))
        result["max_abs_sum_diff_vs_fp32"] = float(diff.max())
        result["mean_abs_sum_diff_vs_fp32"] = float(diff.mean())
    return result
