"""The exported model on onnxruntime: two sessions, ``encode()`` and one decoder ``step()``.

Nothing here knows about search or token rules; ``serve/runtime/search.py`` and
``serve/runtime/engine.py`` drive ``step()``. Inputs and outputs are bound by name
(tf2onnx orders a dict's outputs alphabetically), and the graphs' names are checked
against the contract at load time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serve.runtime.allocator import give_back_big_blocks
from serve.runtime.batching import pad_id_rows
from serve.runtime.blocklist import BLOCKLIST_FILE, Blocklist, BlocklistError
from serve.runtime.manifest import (
    DECODER_FILE,
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    ENCODER_FILE,
    ENCODER_INPUTS,
    ENCODER_OUTPUTS,
    Manifest,
    ModelError,
    load_manifest,
)
from serve.runtime.sessions import ort_session
from serve.runtime.tokenizer import Tokenizer


@dataclass
class EncoderState:
    """What the decoder attends to, for a batch of source rows.

    ``memory``/``memory_keys`` are [B,S,H] with zeros at padding, ``src_mask`` [B,S] has
    1 for real tokens, ``h``/``c`` [B,H] are the decoder's initial state.
    """

    memory: np.ndarray
    memory_keys: np.ndarray
    src_mask: np.ndarray
    h: np.ndarray
    c: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return self.src_mask.sum(axis=1).astype(np.int64)


@dataclass
class StepOutput:
    log_probs: np.ndarray  # [B,V]
    h: np.ndarray  # [B,H]
    c: np.ndarray  # [B,H]
    attention: np.ndarray | None = None  # [B,S], with step(..., attention=True)


def _check_names(session: ort.InferenceSession, path: Path, inputs, outputs) -> None:
    have_in = {i.name for i in session.get_inputs()}
    have_out = {o.name for o in session.get_outputs()}
    if have_in != set(inputs) or not set(outputs) <= have_out:
        raise ModelError(
            f"{path}: inputs {sorted(have_in)} / outputs {sorted(have_out)} do not match "
            f"the contract (inputs {list(inputs)}, outputs {list(outputs)})"
        )


class OnnxSeq2Seq:
    """The model folder loaded for inference: tokenizer, manifest and two ORT sessions."""

    def __init__(
        self,
        model_dir: Path,
        manifest: Manifest,
        tokenizer: Tokenizer,
        encoder: ort.InferenceSession,
        decoder: ort.InferenceSession,
        blocklist_words: tuple[str, ...] = (),
    ):
        self.model_dir = model_dir
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.decoder = decoder
        ids = manifest.special_ids
        self.pad_id, self.unk_id = int(ids["pad"]), int(ids["unk"])
        self.bos_id, self.eos_id = int(ids["bos"]), int(ids["eos"])
        self.vocab_size = len(tokenizer.vocab)
        self.hidden_dim = int(manifest.dims["hidden_dim"])
        self.blocklist_words = blocklist_words

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        *,
        intra_op_num_threads: int = 0,
        inter_op_num_threads: int = 1,
        verify: bool = True,
    ) -> OnnxSeq2Seq:
        """Load a model folder; ``verify`` checks every file's sha256 against the manifest.

        ``intra_op_num_threads=0`` lets onnxruntime pick (one per core); set it to 1 or 2
        when several server processes share a machine.
        """
        give_back_big_blocks()  # before the batches' arrays: see serve.runtime.allocator
        model_dir = Path(model_dir)
        manifest = load_manifest(model_dir, verify=verify)
        tokenizer = folder_tokenizer(model_dir, manifest)
        sessions = []
        for name, inputs, outputs in (
            (ENCODER_FILE, ENCODER_INPUTS, ENCODER_OUTPUTS),
            (DECODER_FILE, DECODER_INPUTS, DECODER_OUTPUTS),
        ):
            path = model_dir / name
            if not path.is_file():
                raise ModelError(f"{model_dir}: {name} is missing")
            session = ort_session(path, intra_op_num_threads, inter_op_num_threads)
            _check_names(session, path, inputs, outputs)
            sessions.append(session)
        blocklist_words: tuple[str, ...] = ()
        if BLOCKLIST_FILE in manifest.files:
            try:
                blocklist_words = Blocklist.load(model_dir / BLOCKLIST_FILE).words
            except BlocklistError as e:
                raise ModelError(f"{model_dir}: {e}") from e
        return cls(model_dir, manifest, tokenizer, *sessions, blocklist_words=blocklist_words)

    def encode(self, src_ids: list[list[int]]) -> EncoderState:
        """Run the encoder over rows of token ids (padded here with ``<pad>``).

        An empty row is encoded as a lone ``<unk>``: the graph needs one position.
        """
        if not src_ids:
            raise ValueError("encode() needs at least one row")
        ids, lengths = pad_id_rows(src_ids, pad_id=self.pad_id, empty_id=self.unk_id)
        max_len = ids.shape[1]
        memory, keys, h0, c0 = self.encoder.run(
            list(ENCODER_OUTPUTS), {"src_ids": ids, "src_len": lengths}
        )
        if len(src_ids) == 1:  # (every request's encoder: no padding to mask)
            mask = np.ones((1, max_len), np.float32)
        else:
            mask = (np.arange(max_len)[None, :] < lengths[:, None]).astype(np.float32)
        return EncoderState(memory, keys, mask, h0, c0)

    def step(
        self,
        prev_ids: np.ndarray,
        h: np.ndarray,
        c: np.ndarray,
        memory: np.ndarray,
        memory_keys: np.ndarray,
        src_mask: np.ndarray,
        *,
        attention: bool = False,
    ) -> StepOutput:
        """One batched decoder step: prev_ids [B] -> log_probs [B,V] and the new state
        (and the attention weights [B,S] with ``attention``: decoding does not read them,
        and fetching them costs a few microseconds a step)."""
        feeds = {
            "prev_ids": np.asarray(prev_ids, np.int64),
            "h": h,
            "c": c,
            "memory": memory,
            "memory_keys": memory_keys,
            "src_mask": src_mask,
        }
        names = _STEP_WITH_ATTENTION if attention else _STEP_OUTPUTS
        return StepOutput(*self.decoder.run(names, feeds))


_STEP_OUTPUTS = ["log_probs", "h_out", "c_out"]  # DECODER_OUTPUTS' order, StepOutput's
_STEP_WITH_ATTENTION = [*_STEP_OUTPUTS, "attention"]


def folder_tokenizer(model_dir: Path, manifest: Manifest) -> Tokenizer:
    """The folder's tokenizer, as its manifest sets it up (ModelError if unusable or of
    another vocabulary size than the manifest's)."""
    try:
        tokenizer = Tokenizer.from_dir(model_dir, manifest.tokenizer)
    except (OSError, ValueError, TypeError) as e:
        raise ModelError(f"{model_dir}: unusable vocab.txt or tokenizer settings ({e})") from e
    if len(tokenizer.vocab) != int(manifest.dims.get("vocab_size", len(tokenizer.vocab))):
        raise ModelError(
            f"{model_dir}: vocab.txt has {len(tokenizer.vocab)} tokens, "
            f"the manifest says {manifest.dims['vocab_size']}"
        )
    return tokenizer
