"""Each Ray Train worker's stream of training pairs, read from the prepared shards.

The order of an epoch is a pure function of (seed, epoch): the shards are shuffled, grouped
into windows of about ``WINDOW_ROWS`` rows, and each window's rows are shuffled. Global batch
``b`` of the epoch is rows ``[b*B, (b+1)*B)`` of that order, and worker ``r`` of ``N`` trains on
its ``r``-th slice of ``B/N`` rows. So:

- every worker runs the same number of steps, and the incomplete last batch is dropped;
- a worker holds one window, not the training set (nor an index of every row);
- resuming at step ``s`` starts at the window that holds batch ``s`` and continues the very
  order the interrupted run had, without reading the batches before it.

Compared with one permutation of every row (the in-memory sampler this replaced), a window
mixes rows from random shards of the whole set but not all of them at once; at the sizes where
the set fits one window (up to ``WINDOW_ROWS`` pairs, STS-B's 5,749 included) it is a full
shuffle. Every worker reads every window (it needs a slice of each batch), which costs a read
of the prepared set per worker per epoch: text, a small fraction of an epoch's forward passes.

Ray Data's ``get_dataset_shard`` was the other choice; it streams blocks in an order that is
not a function of the seed, and cannot start at a step without reading every batch before it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sentence_transformers import SentenceTransformerTrainer
from torch.utils.data import DataLoader, IterableDataset

from sbertray import storage
from sbertray.config import StorageConfig
from sbertray.train.prepare import Shard

WINDOW_ROWS = 262_144  # rows shuffled together: ~40 MB of short pairs in a worker


def epoch_windows(
    shard_rows: list[int], seed: int, epoch: int, window_rows: int = WINDOW_ROWS
) -> list[list[int]]:
    """The epoch's shard indices, shuffled and grouped into windows of at most ``window_rows``
    rows (a window holds at least one shard)."""
    order = np.random.default_rng([seed, epoch]).permutation(len(shard_rows))
    windows: list[list[int]] = [[]]
    filled = 0
    for index in order.tolist():
        if windows[-1] and filled + shard_rows[index] > window_rows:
            windows.append([])
            filled = 0
        windows[-1].append(index)
        filled += shard_rows[index]
    return windows


class PairStream(IterableDataset):
    """This worker's slice of each global batch of one epoch (``set_epoch`` picks the epoch),
    as lists of ``{"sentence_0", "sentence_1", "label"}`` rows."""

    def __init__(
        self,
        shards: list[Shard],
        storage_config: StorageConfig | None,
        *,
        global_batch: int,
        world: int,
        rank: int,
        seed: int,
        start_step: int = 0,
        window_rows: int = WINDOW_ROWS,
    ):
        self.shards, self.storage_config = shards, storage_config
        self.global_batch, self.world, self.rank = global_batch, world, rank
        self.seed, self.start_step, self.window_rows = seed, start_step, window_rows
        self.rows = sum(s.rows for s in shards)
        self.steps_per_epoch = self.rows // global_batch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[list[dict]]:
        first = max(0, self.start_step - self.epoch * self.steps_per_epoch)
        yield from self.batches(self.epoch, first)

    def batches(self, epoch: int, first_step: int = 0) -> Iterator[list[dict]]:
        """Steps ``first_step`` to the end of ``epoch``: this worker's rows of each."""
        size = self.global_batch // self.world
        mine = slice(self.rank * size, (self.rank + 1) * size)
        rows = [s.rows for s in self.shards]
        start, position, step = first_step * self.global_batch, 0, first_step
        carry: pa.Table | None = None
        for w, window in enumerate(epoch_windows(rows, self.seed, epoch, self.window_rows)):
            length = sum(rows[i] for i in window)
            if position + length <= start:  # wholly before the resume point: not read
                position += length
                continue
            table = self._read_window(window)
            table = table.take(np.random.default_rng([self.seed, epoch, w]).permutation(length))
            table = table.slice(max(0, start - position))
            position += length
            carry = table if carry is None else pa.concat_tables([carry, table])
            while len(carry) >= self.global_batch and step < self.steps_per_epoch:
                batch, carry = carry.slice(0, self.global_batch), carry.slice(self.global_batch)
                yield batch.slice(mine.start, size).to_pylist()
                step += 1

    def _read_window(self, window: list[int]) -> pa.Table:
        def read(index: int) -> pa.Table:
            loc = storage.resolve(self.shards[index].url, self.storage_config)
            with loc.fs.open_input_file(loc.path) as f:
                return pq.read_table(f)

        return pa.concat_tables(storage.map_parallel(read, window)).combine_chunks()


class StreamLoader(DataLoader):
    """A ``DataLoader`` over a ``PairStream`` whose items are already batches; the trainer's
    ``set_epoch`` call reaches the stream, which orders the epoch by it."""

    def __init__(self, stream: PairStream, collate_fn):
        super().__init__(stream, batch_size=None, collate_fn=collate_fn)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


class StreamingTrainer(SentenceTransformerTrainer):
    """sentence-transformers' trainer, its batches from a ``PairStream``: the stream already
    splits each global batch among the workers, so it is not handed to accelerate to shard."""

    def __init__(self, stream: PairStream, **kwargs):
        super().__init__(**kwargs)
        self.stream = stream

    def get_train_dataloader(self) -> DataLoader:
        return StreamLoader(self.stream, collate_fn=self.data_collator)
