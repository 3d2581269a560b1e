"""Export checks itself: fp32 ONNX against TensorFlow, int8 against fp32.

Both sides decode greedily in one batch over held-out questions. For fp32 vs TF the
ONNX step is fed TensorFlow's chosen tokens, so the log-probabilities are compared
position by position on the same path; the greedy replies are then compared whole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serve.runtime.manifest import DECODER_OUTPUTS, ENCODER_OUTPUTS
from serve.runtime.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

# encode(src_ids, src_len) -> dict of ENCODER_OUTPUTS; step(prev, h, c, mem, keys, mask) -> dict
EncodeFn = Callable[[np.ndarray, np.ndarray], dict]
StepFn = Callable[..., dict]


@dataclass
class Trace:
    tokens: np.ndarray  # [N, T] greedy token ids (EOS then PAD once a row is done)
    log_probs: list[np.ndarray]  # per step [N, V]
    alive: list[np.ndarray]  # per step [N] bool: the row had not finished before this step


def batch_sources(tokenizer: Tokenizer, questions: list[str], max_len: int) -> tuple:
    rows = [tokenizer.encode(q)[:max_len] or [EOS_ID] for q in questions]
    width = max(len(r) for r in rows)
    src_ids = np.full((len(rows), width), PAD_ID, dtype=np.int64)
    for i, row in enumerate(rows):
        src_ids[i, : len(row)] = row
    return src_ids, np.array([len(r) for r in rows], dtype=np.int64)


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
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    enc = ort.InferenceSession(str(model_dir / "encoder.onnx"), options)
    dec = ort.InferenceSession(str(model_dir / "decoder.onnx"), options)

    def encode(src_ids, src_len):
        return dict(
            zip(
                ENCODER_OUTPUTS,
                enc.run(list(ENCODER_OUTPUTS), {"src_ids": src_ids, "src_len": src_len}),
                strict=True,
            )
        )

    def step(prev, h, c, memory, keys, mask):
        feeds = {
            "prev_ids": prev,
            "h": h,
            "c": c,
            "memory": memory,
            "memory_keys": keys,
            "src_mask": mask,
        }
        return dict(zip(DECODER_OUTPUTS, dec.run(list(DECODER_OUTPUTS), feeds), strict=True))

    return encode, step


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
