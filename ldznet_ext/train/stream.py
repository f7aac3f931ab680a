"""Reading examples in worker processes for long runs: a bad file is logged and skipped, never fatal.

``iterate_examples(source, indices, workers, on_error)`` yields ``(index, Example)`` in the order
of ``indices`` (which may be endless, e.g. a resumable training order). With ``workers > 0`` a
torch DataLoader reads ahead in that many processes (forked on Linux, so sources are shared, not
copied; on spawn platforms the source must pickle). An example whose ``source[index]`` raises a
recoverable error (``LdznetError``, which includes ImageError, or ``OSError``) is passed to
``on_error(index, error)`` and skipped; by default it is logged as a warning on the
``ldznet_ext.data`` logger. ``on_error`` may raise to stop the run (e.g. after too many errors).
Any other exception is a bug and propagates.

The trainer's order is ``ShardOrder``: a pure function of (seed, rank, world size, position), so
the next index never depends on what was read, and ``PositionView`` reads the source by position.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import LdznetError
from .data import Example, Source

LOG = logging.getLogger("ldznet_ext.data")
RECOVERABLE = (LdznetError, OSError)

ErrorHandler = Callable[[int, Exception], None]
# The last word of a seed key names its stream: numpy pads keys with zeros ([s, i] and [s, i, 0]
# seed alike), so keys of different streams, and the trainer's [seed, index], never coincide.
ORDER_STREAM, EXAMPLE_STREAM = 1, 2


def log_error(index: int, error: Exception) -> None:
    """The default ``on_error``: one warning per skipped example."""
    LOG.warning("skipping example %d: %s", index, error)


class _Reader(Dataset):
    """``source[index]`` as (index, example, None) or, for a recoverable error, (index, None, error)."""

    def __init__(self, source: Source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[int, Example | None, Exception | None]:
        try:
            return index, self.source[index], None
        except RECOVERABLE as error:
            # Re-created as the plain class with its message: any exception instance must pickle back.
            return index, None, type(error)(str(error)) if isinstance(error, LdznetError) else OSError(str(error))


def _keep(item: tuple) -> tuple:
    """The collate function: examples stay ``Example`` objects (no tensor stacking)."""
    return item


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers decode images; intra-op threads there only compete


def iterate_examples(source: Source, indices: Iterable[int], workers: int = 0,
                     on_error: ErrorHandler | None = None, prefetch: int = 4) -> Iterator[tuple[int, Example]]:
    """Yield ``(index, source[index])`` for each of ``indices`` in order, skipping unreadable ones.

    ``workers``: reader processes (0 reads in this process); ``prefetch``: examples each worker
    reads ahead; ``on_error(index, error)``: called for each skipped example (default: a warning).
    """
    handle = on_error or log_error
    reader = _Reader(source)
    if workers <= 0:
        items: Iterable[tuple] = (reader[int(i)] for i in indices)
    else:
        items = DataLoader(reader, batch_size=None, sampler=(int(i) for i in indices), num_workers=workers,
                           collate_fn=_keep, prefetch_factor=prefetch, worker_init_fn=_worker_init)
    for index, example, error in items:
        if error is None:
            yield index, example
        else:
            handle(index, error)


class ShardOrder:
    """Process ``rank`` of ``world_size``'s data order over ``count`` examples: it owns the shard
    of indices rank, rank + world_size, ...; position p = 0, 1, ... walks that shard epoch by epoch,
    each epoch in a fresh permutation drawn from (seed, rank, world_size, epoch)."""

    def __init__(self, count: int, seed: int, rank: int = 0, world_size: int = 1, description: str = "the source"):
        if count < world_size:
            raise LdznetError(f"{description}: {count} examples cannot be shared by {world_size} processes")
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shard = (count - rank + world_size - 1) // world_size
        self._epoch, self._indices = -1, np.arange(0)

    def epoch(self, epoch: int) -> np.ndarray:
        """The source indices of epoch ``epoch`` in their order: int64 [shard length], read-only."""
        if epoch != self._epoch:  # one epoch at a time: positions are read in order
            key = [self.seed, self.rank, self.world_size, epoch, ORDER_STREAM]
            permutation = np.random.default_rng(key).permutation(self.shard)
            self._epoch, self._indices = epoch, self.rank + self.world_size * permutation
            self._indices.flags.writeable = False
        return self._indices

    def index(self, position: int) -> int:
        """The source index at ``position`` (>= 0)."""
        epoch, offset = divmod(position, self.shard)
        return int(self.epoch(epoch)[offset])


def example_rng(seed: int, rank: int, position: int) -> np.random.Generator:
    """The generator of what the example at ``position`` contributes (its phrase, crop, prompt)."""
    return np.random.default_rng([seed, rank, position, EXAMPLE_STREAM])


class PositionView:
    """``source`` read by data position: ``view[p] = source[order.index(p)]``, for
    ``iterate_examples`` (it pickles when the source does). Any position >= 0 is valid; the length
    is one epoch's."""

    def __init__(self, source: Source, order: ShardOrder):
        self.source, self.order = source, order
        self.description = source.description

    def __len__(self) -> int:
        return self.order.shard

    def __getitem__(self, position: int) -> Example:
        return self.source[self.order.index(position)]
