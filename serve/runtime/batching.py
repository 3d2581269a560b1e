"""Padding a batch of token-id rows: one rule for serving, export's checks and scoring."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from serve.runtime.tokenizer import PAD_ID, UNK_ID


def pad_id_rows(
    rows: Sequence[Sequence[int]], *, pad_id: int = PAD_ID, empty_id: int = UNK_ID
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ids -> (ids int64 [B,L] padded with ``pad_id``, lengths int64 [B]).

    An empty row becomes a lone ``empty_id`` (``<unk>``): the graphs need one position, and
    "a message we cannot read" is what an empty source is.
    """
    if not rows:
        raise ValueError("a batch needs at least one row")
    if len(rows) == 1:  # (every request's encoder: nothing to pad)
        row = list(rows[0]) or [empty_id]
        return np.array([row], np.int64), np.array([len(row)], np.int64)
    rows = [list(r) if len(r) else [empty_id] for r in rows]
    lengths = np.array([len(r) for r in rows], np.int64)
    ids = np.full((len(rows), int(lengths.max())), pad_id, np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    return ids, lengths
