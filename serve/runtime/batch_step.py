"""One step of the engine's shared batch, run in a worker thread.

The newcomers' encoders run alone (batch 1, their own source length), ahead when the
engine prepared the request (``encode``), else here; then one decoder
step for every row, ``memory``/``memory_keys`` padded with zeros and ``src_mask`` with 0
to the batch's longest source (re-padded only when the batch's rows change); then every
row chooses its token with its own rules and its own seeded RNG.
"""

from __future__ import annotations

import numpy as np

from serve.runtime.model import OnnxSeq2Seq, pad_memory
from serve.runtime.rules import process_rows
from serve.runtime.sampling import choose_tokens
from serve.runtime.search import SequenceDecoder


class BatchRow:
    """A request's place in the shared batch: its decoder and its decoder state."""

    def __init__(self, src_ids: list[int], decoder: SequenceDecoder):
        self.src_ids = src_ids
        self.decoder = decoder
        # Set when the encoder ran.
        self.memory: np.ndarray | None = None
        self.memory_keys: np.ndarray | None = None
        self.src_mask: np.ndarray | None = None
        self.h: np.ndarray | None = None
        self.c: np.ndarray | None = None
        self.prev_id = 0


class BatchStep:
    """``step(newcomers, rows)``: the next token of every row (each row's decoder has
    accepted it). Not thread-safe: the engine runs one step at a time."""

    def __init__(self, model: OnnxSeq2Seq):
        self.model = model
        self._rows: list[BatchRow] = []  # the rows the padded memory below is for
        self._memory: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def reset(self) -> None:
        """Forget the padded memory (the batch failed or the engine stopped)."""
        self._rows, self._memory = [], None

    def step(self, newcomers: list[BatchRow], rows: list[BatchRow]) -> list[int]:
        self._encode(newcomers)
        memory, keys, mask = self._padded(rows)
        h = np.stack([r.h for r in rows])
        c = np.stack([r.c for r in rows])
        prev = np.array([r.prev_id for r in rows], np.int64)
        out = self.model.step(prev, h, c, memory, keys, mask)
        decoders = [r.decoder for r in rows]
        processed = process_rows(
            out.log_probs, [d.rules for d in decoders], [d.token_ids for d in decoders]
        )
        tokens = choose_tokens(processed, [d.options for d in decoders],
                               [d.rng for d in decoders])
        for i, (row, decoder, token) in enumerate(zip(rows, decoders, tokens, strict=True)):
            decoder.accept(token, processed[i])
            row.h, row.c, row.prev_id = out.h[i], out.c[i], token
        return tokens

    def encode(self, row: BatchRow) -> None:
        """Run ``row``'s encoder (batch 1, its own source length). Thread-safe: the
        engine calls it when a request is prepared, so the encoder runs beside the
        decoder step, not inside it."""
        state = self.model.encode([row.src_ids])
        row.memory, row.memory_keys = state.memory[0], state.memory_keys[0]
        row.src_mask, row.h, row.c = state.src_mask[0], state.h[0], state.c[0]
        row.prev_id = self.model.bos_id

    def _encode(self, newcomers: list[BatchRow]) -> None:
        for row in newcomers:
            if row.memory is None:  # not encoded ahead
                self.encode(row)

    def _padded(self, rows: list[BatchRow]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._rows != rows or self._memory is None:  # membership changed: re-pad
            self._memory = pad_memory(
                [(r.memory, r.memory_keys, r.src_mask) for r in rows]  # type: ignore[misc]
            )
            self._rows = list(rows)
        return self._memory
