"""Packing documents into fixed-length rows, and the batches a trainer reads (SPEC §7: packed
sequences, dynamic image sizes).

A row is `seq_len` tokens holding whole documents; a document is never split across rows (one longer
than `seq_len` is a ValueError: raise `seq_len` or split the data). Per token a row carries
- `ids` (T,) long, the pad id after the last document;
- `weights` (T,) float, the loss weight of the token as a target (0 on padding);
- `doc_ids` (T,) long, 1, 2, ... per document in the row and 0 on padding: attention is causal inside
  a document only (`model.attention.document_mask_mod`), padding sees only padding;
- `positions` (T,) long, restarting at 0 at each document (rotary positions), as at inference.

Packing is first-fit over a window of open rows: a document goes into the first open row with room; when
more than `window` rows are open the fullest is emitted. Deterministic for the same input.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch

from train.data.format import Encoded, read_header, read_shard


@dataclass
class Row:
    docs: list[Encoded] = field(default_factory=list)
    length: int = 0


@dataclass
class Batch:
    ids: torch.Tensor  # (B, T) long
    weights: torch.Tensor  # (B, T) float32
    doc_ids: torch.Tensor  # (B, T) long
    positions: torch.Tensor  # (B, T) long

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in (self.ids, self.weights, self.doc_ids, self.positions)))

    @property
    def num_tokens(self) -> int:
        return int((self.doc_ids > 0).sum())


def pack(docs: Iterable[Encoded], seq_len: int, window: int = 16) -> Iterator[Row]:
    """Encoded documents -> rows of at most seq_len tokens (first-fit over `window` open rows)."""
    if seq_len <= 1:
        raise ValueError(f"seq_len: must be > 1, got {seq_len}")
    open_rows: list[Row] = []
    for doc in docs:
        if len(doc) > seq_len:
            raise ValueError(f"seq_len: a document of {len(doc)} tokens does not fit in seq_len={seq_len}; "
                             "raise seq_len or use smaller images / shorter episodes")
        assert doc.weights[0] == 0.0, "a document starts with BOS, which is never a target"
        for row in open_rows:
            if row.length + len(doc) <= seq_len:
                break
        else:
            row = Row()
            open_rows.append(row)
        row.docs.append(doc)
        row.length += len(doc)
        if len(open_rows) > window:
            fullest = max(range(len(open_rows)), key=lambda i: open_rows[i].length)
            yield open_rows.pop(fullest)
    yield from open_rows


def row_tensors(row: Row, seq_len: int, pad_id: int) -> tuple[torch.Tensor, ...]:
    """Row -> ids, weights, doc_ids, positions, each (seq_len,)."""
    ids = torch.full((seq_len,), pad_id, dtype=torch.long)
    weights = torch.zeros(seq_len, dtype=torch.float32)
    doc_ids = torch.zeros(seq_len, dtype=torch.long)
    positions = torch.zeros(seq_len, dtype=torch.long)
    at = 0
    for d, doc in enumerate(row.docs, start=1):
        n = len(doc)
        ids[at:at + n] = torch.tensor(doc.ids, dtype=torch.long)
        weights[at:at + n] = torch.tensor(doc.weights, dtype=torch.float32)
        doc_ids[at:at + n] = d
        positions[at:at + n] = torch.arange(n)
        at += n
    # padding: its own causal "document" with positions counting from 0
    positions[at:] = torch.arange(seq_len - at)
    return ids, weights, doc_ids, positions


def collate(rows: list[Row], seq_len: int, pad_id: int) -> Batch:
    parts = [row_tensors(r, seq_len, pad_id) for r in rows]
    return Batch(*(torch.stack(t) for t in zip(*parts)))


class PackedStream:
    """Endless, deterministic stream of packed rows from shards.

    Epoch e interleaves the shards: each next record comes from a shard drawn at random (seeded with
    (seed, e)) with probability proportional to the records it has left, and each shard's records come
    in an order shuffled the same way. So every stretch of the stream mixes the sources in proportion
    to their sizes, and a short run (a fine-tune of a few hundred steps) sees all of them, not the first
    few shards in some order. A shard listed twice counts twice (a way to up-weight a source). Records
    are encoded with `encode` (record -> Encoded) and packed. A shard is read when first drawn and its
    records are kept until the epoch has used them, so an epoch holds the shards' records in memory.
    `batches(global_batch, rank, world_size, skip)` yields, per optimizer step, this rank's rows
    `rows[rank::world_size]` of the step's `global_batch` rows; `skip` steps are consumed first (resume).
    """

    def __init__(self, shards: list[str], encode: Callable[[dict], Encoded], seq_len: int, pad_id: int,
                 seed: int = 0, window: int = 16):
        self.shards, self.encode, self.seq_len, self.pad_id = list(shards), encode, seq_len, pad_id
        self.seed, self.window = seed, window

    def _docs(self, epoch: int) -> Iterator[Encoded]:
        rng = random.Random(f"{self.seed}-{epoch}")
        left = [read_header(path)["num_records"] for path in self.shards]
        loaded: dict[int, list] = {}
        while sum(left):
            i = rng.choices(range(len(left)), weights=left)[0]
            if i not in loaded:
                loaded[i] = list(read_shard(self.shards[i]))
                rng.shuffle(loaded[i])
            left[i] -= 1
            yield self.encode(loaded[i].pop())

    def rows(self) -> Iterator[Row]:
        epoch = 0
        while True:
            produced = False
            for row in pack(self._docs(epoch), self.seq_len, self.window):
                produced = True
                yield row
            if not produced:
                raise ValueError(f"data: the shards {self.shards} hold no records")
            epoch += 1

    def batches(self, global_batch: int, rank: int = 0, world_size: int = 1, skip: int = 0) -> Iterator[Batch]:
        if global_batch % world_size:
            raise ValueError(f"batch_size: the global batch {global_batch} must be divisible by the "
                             f"number of processes {world_size}")
        rows = self.rows()
        step = 0
        while True:
            chunk = [next(rows) for _ in range(global_batch)]
            if step >= skip:
                yield collate(chunk[rank::world_size], self.seq_len, self.pad_id)
            step += 1
