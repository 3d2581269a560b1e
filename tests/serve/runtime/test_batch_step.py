"""The batch's slots: rows written, moved and continued by byte copies hold exactly what
numpy's row assignments would (a former row's longer source wiped)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from serve.runtime.batch_step import BatchRow, _Slots

HIDDEN, DIM, WIDTH, CAPACITY = 8, 6, 5, 6


def _row(rng: np.random.Generator, length: int) -> BatchRow:
    row = BatchRow([1] * length, None)  # type: ignore[arg-type]  # no decoder needed here
    row.memory = rng.standard_normal((length, DIM)).astype(np.float32)
    row.memory_keys = rng.standard_normal((length, DIM)).astype(np.float32)
    row.src_mask = np.ones(length, np.float32)
    row.h, row.c = (rng.standard_normal(HIDDEN).astype(np.float32) for _ in range(2))
    row.prev_id = int(rng.integers(4, 100))
    return row


def _reference_write(arrays: list[np.ndarray], slot: int, row: BatchRow) -> None:
    prev, h, c, memory, keys, mask = arrays
    length = len(row.src_mask)
    prev[slot], h[slot], c[slot] = row.prev_id, row.h, row.c
    memory[slot], keys[slot], mask[slot] = 0.0, 0.0, 0.0
    memory[slot, :length], keys[slot, :length] = row.memory, row.memory_keys
    mask[slot, :length] = row.src_mask


def test_writes_moves_and_updates_match_numpy_row_assignments():
    rng, pick = np.random.default_rng(0), random.Random(0)
    slots = _Slots(CAPACITY, WIDTH, HIDDEN, DIM)
    reference = [a.copy() for a in slots.arrays()]
    for _ in range(300):
        kind = pick.choice(["write", "move", "update"])
        if kind == "write":  # a short row over a long one's slot leaves no trace of it
            slot, row = pick.randrange(CAPACITY), _row(rng, pick.randint(1, WIDTH))
            slots.write(slot, row)
            _reference_write(reference, slot, row)
        elif kind == "move":
            source, target = pick.randrange(CAPACITY), pick.randrange(CAPACITY)
            slots.move(source, target)
            for a in reference:
                a[target] = a[source]
        else:
            n = pick.randint(1, CAPACITY)
            tokens = [int(t) for t in rng.integers(4, 100, n)]
            h, c = (rng.standard_normal((n, HIDDEN)).astype(np.float32) for _ in range(2))
            slots.update(tokens, h, c)
            reference[0][:n], reference[1][:n], reference[2][:n] = tokens, h, c
        for ours, theirs in zip(slots.arrays(), reference, strict=True):
            np.testing.assert_array_equal(ours, theirs)


def test_a_row_wider_than_its_slot_is_refused():
    slots = _Slots(2, 3, HIDDEN, DIM)
    with pytest.raises(ValueError, match="bytes in slots of"):
        slots.write(0, _row(np.random.default_rng(1), 4))  # never past its slot's end
