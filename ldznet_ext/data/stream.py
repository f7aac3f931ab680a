"""Reading examples in worker processes for long runs: a bad file is logged and skipped, never fatal.

``iterate_examples(source, indices, workers, on_error)`` yields ``(index, Example)`` in the order
of ``indices`` (which may be endless, e.g. a resumable training order). With ``workers > 0`` a
torch DataLoader reads ahead in that many processes (forked on Linux, so sources are shared, not
copied; on spawn platforms the source must pickle). An example whose ``source[index]`` raises a
recoverable error (``LdznetError``, which includes ImageError, or ``OSError``) is passed to
``on_error(index, error)`` and skipped; by default it is logged as a warning on the
``ldznet_ext.data`` logger. ``on_error`` may raise to stop the run (e.g. after too many errors).
Any other exception is a bug and propagates.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import LdznetError
from .examples import Example, Source

LOG = logging.getLogger("ldznet_ext.data")
RECOVERABLE = (LdznetError, OSError)

ErrorHandler = Callable[[int, Exception], None]


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
