"""Pre-rendered scene sets: many micro-world scenes as plain numpy arrays, rendered once.

Training steps index these arrays instead of rendering, so a step costs no Python scene work.
Rendering fans out over worker processes (spawned; the workers import numpy and OpenCV, never
torch). A set keeps what every trainer needs: the images, the label maps, the captions and,
per scene, each phrase with the labels its mask covers (``mask`` rebuilds a phrase mask).
This module is torch-free so that any trainer (SD, heads) can use it.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import zipfile
from pathlib import Path
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from ..errors import LdznetError
from .scenes import make_scene, phrase_labels

_CHUNK = 128  # scenes per worker task: large enough that pickling overhead is small
_FORMAT = 1


@dataclass(frozen=True, eq=False)
class SceneSet:
    """``N`` scenes rendered at ``size`` px. ``images`` uint8 [N, S, S, 3] RGB, ``labels`` uint8
    [N, S, S] (``world.spec.label_map`` ids), ``seeds`` int64 [N], ``captions`` N strings,
    ``phrases`` N dicts phrase -> label ids (``()`` for phrases of absent things)."""

    size: int
    seeds: np.ndarray
    images: np.ndarray
    labels: np.ndarray
    captions: tuple[str, ...]
    phrases: tuple[dict[str, tuple[int, ...]], ...]

    def __len__(self) -> int:
        return len(self.seeds)

    def mask(self, index: int, phrase: str) -> np.ndarray:
        """bool [S, S] mask of ``phrase`` in scene ``index`` (all False for an absent thing)."""
        if phrase not in self.phrases[index]:
            raise LdznetError(f"scene {int(self.seeds[index])} has no phrase {phrase!r}; "
                              f"its phrases: {', '.join(self.phrases[index])}")
        return np.isin(self.labels[index], self.phrases[index][phrase])

    def save(self, path: str | os.PathLike) -> None:
        """Write the set to one uncompressed ``.npz`` file (fast to load; about 65 KB per 128 px scene)."""
        meta = {"format": _FORMAT, "size": self.size, "captions": list(self.captions),
                "phrases": [{p: list(ids) for p, ids in ph.items()} for ph in self.phrases]}
        with open(path, "wb") as f:
            np.savez(f, seeds=self.seeds, images=self.images, labels=self.labels,
                     meta=np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8))

    @classmethod
    def load(cls, path: str | os.PathLike) -> SceneSet:
        """Read a set written by :meth:`save`; LdznetError for anything else."""
        if not Path(path).is_file():
            raise LdznetError(f"{path}: " + ("not a file" if Path(path).exists() else "no such scene set file"))
        try:
            if not zipfile.is_zipfile(path):  # else numpy reads it as a pickle and advises allow_pickle
                raise ValueError("not an .npz archive")
            with zipfile.ZipFile(path) as archive:  # what its arrays take once unpacked, as its directory says
                unpacked, memory = sum(info.file_size for info in archive.infolist()), physical_memory()
            if memory and unpacked > memory:  # a few MB of zeros unpack to any size
                raise LdznetError(f"{path}: its arrays take {unpacked / 2**30:.1f} GiB of memory unpacked, more than "
                                  f"this machine's {memory / 2**30:.1f} GiB")
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(data["meta"].tobytes().decode("utf-8"))
                arrays = {k: data[k] for k in ("seeds", "images", "labels")}
        except LdznetError:
            raise
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as error:
            raise LdznetError(f"{path}: not a scene set written by SceneSet.save ({error})") from error
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise LdznetError(f"{path}: scene set format {found!r}; expected {_FORMAT}")
        seeds, images, labels = arrays["seeds"], arrays["images"], arrays["labels"]
        size, count = meta.get("size"), len(seeds) if seeds.ndim == 1 else -1
        try:  # every array and list must agree, or a run fails (or trains on the wrong masks) scenes later
            phrases = tuple({str(p): tuple(int(i) for i in ids) for p, ids in ph.items()} for ph in meta["phrases"])
            captions = tuple(str(c) for c in meta["captions"])
            if not (type(size) is int and count > 0 and seeds.dtype.kind in "iu"
                    and images.dtype == labels.dtype == np.uint8 and images.shape == (count, size, size, 3)
                    and labels.shape == (count, size, size)
                    and len(phrases) == len(captions) == count):
                raise ValueError(f"{count} seeds, images {images.dtype} {images.shape}, labels {labels.dtype} "
                                 f"{labels.shape}, size {size!r}, {len(phrases)} phrase lists, "
                                 f"{len(captions)} captions")
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as error:
            raise LdznetError(f"{path}: not a scene set written by SceneSet.save ({error})") from error
        return cls(size, seeds, images, labels, captions, phrases)


def _render_chunk(task: tuple[Sequence[int], int, str | None]) -> tuple:
    seeds, size, domain = task
    scenes = [make_scene(int(s), size, domain) for s in seeds]
    return (np.stack([s.image for s in scenes]), np.stack([s.labels for s in scenes]),
            [s.caption for s in scenes], [phrase_labels(s.spec) for s in scenes])


def default_workers() -> int:
    """Render processes to use: every core this process may run on, at most 16."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(16, cores))


def physical_memory() -> int | None:
    """This machine's memory in bytes (None where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _check_memory(count: int, size: int) -> None:
    """LdznetError when ``count`` scenes at ``size`` px cannot be held in this machine's memory: a scene set
    is rendered into memory (an RGB image and a label map per scene, and its chunks once more while they
    are joined), and past the machine's memory the kernel ends the process without a word, hours in."""
    needed, memory = 2 * count * size * size * 4, physical_memory()
    if memory and needed > memory:
        raise LdznetError(f"{count:,} scenes at {size} px take about {needed / 2**30:.1f} GiB of memory to render "
                          f"(they are held in memory), more than this machine's {memory / 2**30:.1f} GiB: use fewer "
                          "scenes or a smaller size")


def _ignore_interrupts() -> None:
    """A render worker's start: Ctrl-C reaches every process of the terminal, and the parent alone reports
    it (the pool ends its workers); a worker would print its own traceback of the interrupt."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def render_scene_set(seeds: Iterable[int], size: int = 128, workers: int | None = None,
                     progress: bool = False, domain: str | None = None) -> SceneSet:
    """Render scenes ``seeds`` at ``size`` px into a :class:`SceneSet`, all painted in ``domain``
    (None: cartoon for even seeds, photo for odd, as ``make_scene``).

    ``workers`` processes (default :func:`default_workers`; 1 renders in this process). The result
    depends only on the seeds and the size, never on the worker count.
    """
    seeds = np.asarray(list(seeds), dtype=np.int64)
    if seeds.ndim != 1 or len(seeds) == 0:
        raise LdznetError(f"a scene set needs at least one seed, got {len(seeds)}")
    _check_memory(len(seeds), size)
    workers = default_workers() if workers is None else workers
    tasks = [(seeds[i:i + _CHUNK].tolist(), size, domain) for i in range(0, len(seeds), _CHUNK)]
    bar = tqdm(total=len(seeds), desc=f"render {size} px", unit="scene", disable=not progress)
    parts = []
    if workers <= 1 or len(tasks) == 1:
        for task in tasks:
            parts.append(_render_chunk(task))
            bar.update(len(task[0]))
    else:
        # spawn: forking a process that already runs torch's thread pools can deadlock.
        with multiprocessing.get_context("spawn").Pool(min(workers, len(tasks)), _ignore_interrupts) as pool:
            for part in pool.imap(_render_chunk, tasks):
                parts.append(part)
                bar.update(len(part[2]))
    bar.close()
    return SceneSet(size, seeds, np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                    tuple(c for p in parts for c in p[2]), tuple(ph for p in parts for ph in p[3]))
