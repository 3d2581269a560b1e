"""One step of the engine's shared batch, run in the scheduler's thread.

The newcomers' encoders run alone (batch 1, their own source length), ahead when the
engine prepared the request (``encode``), else here; then one decoder
step for every row, ``memory``/``memory_keys`` padded with zeros and ``src_mask`` with 0
to the longest source the batch has held; then every row chooses its token with its own
rules and its own seeded RNG.

The batch's inputs live in arrays kept from step to step, one slot a row: a row that
leaves gives its slot to the last row (one row copied), a newcomer writes its own row at
the end; nothing else is copied or padded again. (The attention over a few more padded
positions costs next to nothing beside the output projection; a batch that empties
starts over at its newcomers' width.)
"""

from __future__ import annotations

import numpy as np

from serve.runtime.model import OnnxSeq2Seq
from serve.runtime.search import SequenceDecoder, choose_rows


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
        self.slot = -1  # its index in the last step's batch


class _Slots:
    """The decoder inputs of the batch's rows, row ``i`` in slot ``i``: prev ids, h, c,
    memory, memory keys and mask (``width`` source positions).

    Rows are copied through byte views of the arrays (a ``memcpy`` that keeps the GIL),
    not by numpy, which lets the GIL go for any copy of more than a few hundred values:
    the preparer or the event loop then takes it, and this thread waits for it back, a
    millisecond at times, between two decoder steps (``Slots.move`` had such waits in
    one step of ten under load)."""

    def __init__(self, capacity: int, width: int, hidden: int, memory_dim: int):
        self.width = width
        self.prev = np.zeros(capacity, np.int64)
        self.h = np.zeros((capacity, hidden), np.float32)
        self.c = np.zeros((capacity, hidden), np.float32)
        self.memory = np.zeros((capacity, width, memory_dim), np.float32)
        self.keys = np.zeros((capacity, width, memory_dim), np.float32)
        self.mask = np.zeros((capacity, width), np.float32)
        # each array's bytes and the bytes of one of its rows
        self._bytes = [(memoryview(a).cast("B"), a.nbytes // capacity) for a in self.arrays()]
        self._zeros = bytes(self.memory.nbytes // capacity)  # a former row's tail, wiped

    def arrays(self) -> tuple[np.ndarray, ...]:
        return self.prev, self.h, self.c, self.memory, self.keys, self.mask

    def move(self, source: int, target: int) -> None:
        for view, size in self._bytes:
            view[target * size:(target + 1) * size] = view[source * size:(source + 1) * size]

    def write(self, slot: int, row: BatchRow) -> None:
        self.prev[slot] = row.prev_id
        parts = (row.h, row.c, row.memory, row.memory_keys, row.src_mask)
        for (view, size), part in zip(self._bytes[1:], parts, strict=True):
            data = _bytes_of(part)
            if len(data) > size:
                raise ValueError(f"a row of {len(data)} bytes in slots of {size}")
            start, end = slot * size, slot * size + len(data)
            view[start:end] = data
            view[end:(slot + 1) * size] = self._zeros[: size - len(data)]  # a former row's

    def update(self, tokens: list[int], h: np.ndarray, c: np.ndarray) -> None:
        """The first ``len(tokens)`` rows continue from a step's tokens and state."""
        self.prev[: len(tokens)] = tokens
        for (view, _), state in zip(self._bytes[1:3], (h, c), strict=True):
            data = _bytes_of(state)
            view[: len(data)] = data

    def widened(self, n: int, width: int) -> _Slots:
        """The same first ``n`` rows in slots of ``width`` positions."""
        grown = _Slots(len(self.prev), width, self.h.shape[1], self.memory.shape[2])
        for old, new in zip(self.arrays(), grown.arrays(), strict=True):
            if old.ndim == 3 or old is self.mask:  # memory, keys, mask: by position
                new[:n, : self.width] = old[:n]
            else:
                new[:n] = old[:n]
        return grown


def _bytes_of(array: np.ndarray) -> memoryview:
    """A flat byte view of ``array`` as float32 (the slots' rows; h, c, memory, keys,
    mask), copied first only if it is not contiguous float32 already."""
    return memoryview(np.ascontiguousarray(array, np.float32)).cast("B")


class BatchStep:
    """``step(newcomers, rows)``: the next token of every row, in the order of ``rows``
    (each row's decoder has accepted it). Not thread-safe: the engine runs one step at a
    time."""

    def __init__(self, model: OnnxSeq2Seq):
        self.model = model
        self._order: list[BatchRow] = []  # the row in each slot
        self._slots: _Slots | None = None

    def reset(self) -> None:
        """Forget the batch's rows (the batch failed or the engine stopped)."""
        self._order, self._slots = [], None

    def step(self, newcomers: list[BatchRow], rows: list[BatchRow]) -> list[int]:
        self._encode(newcomers)
        slots, order = self._place(rows), self._order
        n = len(order)
        out = self.model.step(*(a[:n] for a in slots.arrays()))
        decoders = [r.decoder for r in order]
        tokens, processed = choose_rows(  # the step's own output: no copy of it needed
            out.log_probs, decoders, in_place=out.log_probs.dtype == np.float32)
        for i, (decoder, token) in enumerate(zip(decoders, tokens, strict=True)):
            decoder.accept(token, processed[i])
        slots.update(tokens, out.h, out.c)
        return [tokens[r.slot] for r in rows]

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

    def _place(self, rows: list[BatchRow]) -> _Slots:
        """The slots with exactly ``rows`` in them (in any order: ``row.slot``)."""
        wanted = {id(r) for r in rows}
        order, slots = self._order, self._slots
        i = 0
        while i < len(order):  # a leaving row's slot goes to the last row
            if id(order[i]) in wanted:
                i += 1
                continue
            last = order.pop()
            if i < len(order):
                order[i], last.slot = last, i
                assert slots is not None
                slots.move(len(order), i)
        placed = {id(r) for r in order}
        fresh = [r for r in rows if id(r) not in placed]
        width = max((r.src_mask.shape[0] for r in fresh), default=0)  # type: ignore
        if slots is None or not order:
            slots = _Slots(max(len(rows), 1), max(width, 1), fresh[0].h.shape[0],  # type: ignore
                           fresh[0].memory.shape[1])  # type: ignore[union-attr]
        elif width > slots.width or len(rows) > len(slots.prev):
            slots = self._grown(slots, len(order), max(width, slots.width), len(rows))
        for row in fresh:
            row.slot = len(order)
            order.append(row)
            slots.write(row.slot, row)
        self._slots = slots
        return slots

    @staticmethod
    def _grown(slots: _Slots, n: int, width: int, rows: int) -> _Slots:
        if rows > len(slots.prev):  # more rows than ever: room for twice as many
            bigger = _Slots(2 * rows, slots.width, slots.h.shape[1], slots.memory.shape[2])
            for old, new in zip(slots.arrays(), bigger.arrays(), strict=True):
                new[:n] = old[:n]
            slots = bigger
        return slots.widened(n, width) if width > slots.width else slots
