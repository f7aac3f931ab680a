"""The trainer's data order: which example each data position reads, on each process.

``ShardOrder`` is a pure function of (seed, rank, world size, position), so the next index never
depends on what was read (``data.stream.iterate_examples`` skips unreadable ones), and
``PositionView`` reads the source by position.
"""

from __future__ import annotations

import numpy as np

from ..data.examples import Example, Source
from ..errors import LdznetError

# The last word of a seed key names its stream: numpy pads keys with zeros ([s, i] and [s, i, 0]
# seed alike), so keys of different streams, and the trainer's [seed, index], never coincide.
ORDER_STREAM, EXAMPLE_STREAM = 1, 2


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
