"""Packing: several examples per row of ``seq_len`` tokens, none attending to another.

Padded batches of short examples are mostly padding. A packed row holds examples one after
another; the batch then carries, besides ``input_ids``, ``attention_mask`` and
``loss_mask``:

* ``segment_ids``: ``1, 2, ...`` for the examples of a row, 0 for its padding tail. The
  model lets query ``i`` see key ``j`` only when ``j <= i`` and both lie in one example
  (a block-diagonal causal mask: ``jqlora.models.common.attention_mask``);
* ``positions``: each example's own ``0, 1, 2, ...``, as it would have alone (RoPE and
  learned position embeddings see the same positions packed or not);
* ``loss_mask``: each example's own, with its first token cleared: that token would be
  scored from the last token of the example before it.

So the loss and the gradients of a packed batch equal those of the same examples padded one
per row (tested). Rows are filled once, first-fit over the examples longest first (the row
set is a pure function of the data); each epoch visits the rows in the permutation drawn
from ``(seed, epoch)``, so micro-batch ``i`` of a run is the same whether or not it was
interrupted, as for ``data.BatchStream``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jqlora.train.data import DataError, Example


def pack_rows(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Example indices per row: first-fit decreasing, each row holding at most ``seq_len``
    tokens, examples in a row in increasing index order."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > seq_len:
            raise DataError(f"an example of {lengths[i]} tokens exceeds seq_len={seq_len}")
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            rows.append([])
            room.append(seq_len)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return [sorted(r) for r in rows]


def collate_packed(
    rows: Sequence[Sequence[Example]], batch_size: int, seq_len: int, pad_id: int
) -> dict:
    """``[batch_size, seq_len]`` arrays of packed rows (module doc); missing rows are padding.

    ``input_ids``, ``attention_mask``, ``segment_ids``, ``positions`` (int32) and ``loss_mask``
    (float32).
    """
    ids = np.full((batch_size, seq_len), pad_id, np.int32)
    segments = np.zeros((batch_size, seq_len), np.int32)
    positions = np.zeros((batch_size, seq_len), np.int32)
    loss = np.zeros((batch_size, seq_len), np.float32)
    for r, row in enumerate(rows):
        start = 0
        for s, e in enumerate(row, start=1):
            end = start + len(e)
            ids[r, start:end] = e.input_ids
            segments[r, start:end] = s
            positions[r, start:end] = np.arange(len(e))
            loss[r, start + 1 : end] = e.loss_mask[1:]
            start = end
    return {
        "input_ids": ids,
        "attention_mask": (segments > 0).astype(np.int32),
        "loss_mask": loss,
        "segment_ids": segments,
        "positions": positions,
    }


class PackedStream:
    """The run's packed micro-batches by index, ``stream[i]`` (see the module doc); the same
    interface as ``data.BatchStream``."""

    def __init__(
        self, examples: list[Example], batch_size: int, seq_len: int, pad_id: int, seed: int
    ):
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}")
        if not examples:
            raise DataError("no training examples")
        self.examples, self.batch_size, self.seq_len = examples, batch_size, seq_len
        self.pad_id, self.seed = pad_id, seed
        self.rows = pack_rows([len(e) for e in examples], seq_len)
        self.batches_per_epoch = -(-len(self.rows) // batch_size)
        self.buckets = (seq_len,)  # one shape: every row is seq_len long

    def __getitem__(self, index: int) -> dict:
        epoch, k = divmod(index, self.batches_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
        picked = order[k * self.batch_size : (k + 1) * self.batch_size]
        rows = [[self.examples[i] for i in self.rows[r]] for r in picked]
        return collate_packed(rows, self.batch_size, self.seq_len, self.pad_id)

    def padding_fraction(self) -> float:
        """The share of an epoch's token slots that hold padding."""
        tokens = sum(len(e) for e in self.examples)
        return 1.0 - tokens / (self.batches_per_epoch * self.batch_size * self.seq_len)
