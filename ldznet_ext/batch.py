"""The batch engine of `ldznet batch` and the WebUI's LD-ZNet tab: masks for a whole folder,
resumable and shardable.

Writes ``OUT_DIR/{stem}.png`` for every image ``INPUT_DIR/{stem}.{ext}``: the names A1111's
"Inpaint batch mask directory" looks up. A mask counts as done once it has been renamed into
place (outputs.save_png), so a killed run leaves no half-written mask and a rerun skips exactly the
finished ones. Every file gets one line in a JSONL manifest. A bad file is recorded and the batch
goes on. Shard K of N (1-based) takes every N-th file of the sorted list, so N processes split a
folder without overlap; they may share OUT_DIR and the manifest (each line is one O_APPEND write).
Front ends follow and stop a run through :class:`BatchCallbacks`; this module reads no arguments.

Manifest lines of written masks carry ``terms``: each term's ``found`` and ``score`` (``masks/presence.py``).
With ``instances``, each object of a mask is also written as ``OUT_DIR/instances/{stem}-{k}.png``
(k = 1.. left to right; stems cannot collide: ``a-1``'s are ``a-1-{k}``) before the mask itself, and
the line lists them (order, box, area, score, file).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from . import outputs
from .errors import ImageError, LdznetError
from .images import MAX_PIXELS, load_image, open_image
from .masks.instances import instance_image
from .masks.ops import MaskOptions
from .masks.tree import Expression
from .segmenter import Prediction, Segmenter

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
INSTANCES_FOLDER = "instances"
MANIFEST_NAME = "ldznet-manifest.jsonl"


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The image files directly in ``folder`` (suffix in IMAGE_SUFFIXES, any case), sorted by name.
    Hidden files (".name", e.g. macOS "._x.png" resource forks) are not images and are left out; a
    broken link is kept, so that it is reported as a failed file rather than passed over."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LdznetError(f"input folder not found: {folder}")
    return sorted((p for p in folder.iterdir()
                   if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
                   and (p.is_file() or (p.is_symlink() and not p.exists()))),
                  key=lambda p: p.name)


def shard(files: Sequence[Path], k: int, n: int) -> list[Path]:
    """Shard K of N (1-based): every N-th file starting at index K-1; the N shards partition ``files``."""
    return list(files[k - 1::n])


def stem_owners(files: Sequence[Path]) -> dict[str, Path]:
    """For each output name, the first file (in order) that writes it. Stems are compared
    case-insensitively, since "A.png" and "a.png" are one file on Windows and macOS."""
    owners: dict[str, Path] = {}
    for path in files:
        owners.setdefault(path.stem.casefold(), path)
    return owners


@dataclass
class BatchSummary:
    """Files counted by manifest status ("ok", "skipped", "error") in one run."""

    counts: Counter = field(default_factory=Counter)
    empty: int = 0  # of the "ok" masks, those that select nothing
    interrupted: bool = False  # stopped early by BatchCallbacks.stop_requested

    @property
    def empty_note(self) -> str:
        """" (N of them empty)" after the count of masks written, when some select nothing; else ""."""
        return f" ({self.empty} of them empty)" if self.empty else ""

    @property
    def exit_status(self) -> int:
        """0 when every file is ok or skipped, 1 when any failed."""
        return 1 if self.counts["error"] else 0


class BatchCallbacks:
    """How a front end (the CLI's progress bar, the WebUI tab) follows and stops :func:`run_batch`;
    the defaults do nothing."""

    def started(self, total: int) -> None:
        """Once, before any file, with the number of files of this run (this shard's)."""

    def file_done(self, entry: dict) -> None:
        """After each file, with its manifest entry (status "ok", "skipped" or "error")."""

    def stop_requested(self) -> bool:
        """Asked before each group of up to ``batch_size`` files is read; True ends the run there,
        keeping the masks and manifest lines written so far (a rerun resumes)."""
        return False

    def finished(self) -> None:
        """Once at the end, also when the run ends by an exception (Ctrl-C)."""


class Manifest:
    """Appends one JSON object per line; each line goes out in a single O_APPEND write, so shards
    sharing the file never interleave and a kill loses at most the line being written."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o666)
        if self._ends_torn():  # a kill mid-line: start a fresh line so the next entry stays readable
            os.write(self._fd, b"\n")

    def _ends_torn(self) -> bool:
        with open(self.path, "rb") as file:
            file.seek(0, os.SEEK_END)
            if file.tell() == 0:
                return False
            file.seek(-1, os.SEEK_END)
            return file.read(1) != b"\n"

    def write(self, entry: dict) -> None:
        """Append ``entry`` as one line. A lone surrogate (a Linux file name that is not UTF-8, e.g.
        Latin-1 "caf\\xe9.png") can only sit inside a JSON string, so backslashreplace writes it as the
        escape ``\\udce9``: the line stays UTF-8 and reads back as the same name."""
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        os.write(self._fd, line.encode("utf-8", errors="backslashreplace"))

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def read_manifest(path: str | os.PathLike) -> list[dict]:
    """The entries of a manifest; a torn last line (from a kill) is skipped."""
    entries = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def listed_instances(entries: Sequence) -> set[str]:
    """The names of the instance masks that manifest ``entries`` list (their "instances" fields)."""
    names = set()
    for entry in entries:
        instances = entry.get("instances") if isinstance(entry, dict) else None
        for instance in instances if isinstance(instances, list) else ():
            if isinstance(instance, dict) and isinstance(instance.get("file"), str):
                names.add(Path(instance["file"]).name)
    return names


@dataclass
class BatchJob:
    """One batch run: which files, which expression and options, where the results go."""

    input_dir: Path | None  # None when ``files`` are given (uploads)
    output_dir: Path
    expression: Expression
    expression_text: str
    options: MaskOptions = field(default_factory=MaskOptions)
    settings: dict = field(default_factory=dict)  # recorded in the manifest as is
    overwrite: bool = False
    shard: tuple[int, int] = (1, 1)
    batch_size: int = 4
    max_pixels: int = MAX_PIXELS
    files: list[Path] | None = None  # the images to mask instead of input_dir's (already checked)
    instances: bool = False  # also one mask per object, in OUT_DIR/instances

    def output_for(self, path: Path) -> Path:
        return self.output_dir / f"{path.stem}.png"

    def instance_for(self, path: Path, order: int) -> Path:
        return self.output_dir / INSTANCES_FOLDER / f"{path.stem}-{order}.png"


def _header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the file header without decoding; None when that is unreadable (the
    decoder then reports the problem properly)."""
    try:
        with open_image(path) as image:  # never an EPS file's reader: only images are grouped
            return image.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def _groups(files: Sequence[Path], batch_size: int) -> Iterator[list[Path]]:
    """Files with the same header size, in chunks of ``batch_size``, in order of first appearance.
    Only headers are read here, so memory holds one chunk of decoded images at a time."""
    by_size: dict[object, list[Path]] = {}
    for path in files:
        size = _header_size(path)
        by_size.setdefault(size if size is not None else path, []).append(path)
    for same in by_size.values():
        for start in range(0, len(same), batch_size):
            yield same[start:start + batch_size]


class _Run:
    """The state of one batch run: the job, the model, the manifest, the counts and the callbacks."""

    def __init__(self, job: BatchJob, segmenter: Segmenter, manifest: Manifest, callbacks: BatchCallbacks):
        self.job, self.segmenter, self.manifest, self.callbacks = job, segmenter, manifest, callbacks
        self.summary = BatchSummary()
        # The instance masks earlier runs wrote (their manifest lists them): the only files in OUT/instances
        # this run may replace or remove; any other file there is the user's.
        self.earlier_instances = listed_instances(read_manifest(manifest.path)) if job.instances else set()

    def record(self, path: Path, status: str, output: Path | None = None, error: str | None = None,
               seconds: float = 0.0, found: dict | None = None) -> None:
        """One manifest line; ``found``: the written mask's "terms" (and "instances") fields."""
        entry = {"input": str(path), "expression": self.job.expression_text, "settings": self.job.settings,
                 "output": str(output) if output else None, "status": status, "error": error,
                 "seconds": round(seconds, 4), **(found or {})}
        self.manifest.write(entry)
        self.summary.counts[status] += 1
        self.callbacks.file_done(entry)

    def group(self, paths: list[Path]) -> None:
        """Decode, predict (one batch per image size) and write the masks of one group."""
        loaded: dict[tuple[int, int], list[tuple[Path, np.ndarray, float]]] = {}
        for path in paths:
            start = time.perf_counter()
            try:
                image = load_image(path, self.job.max_pixels)
            except ImageError as error:
                self.record(path, "error", error=str(error), seconds=time.perf_counter() - start)
                continue
            loaded.setdefault(image.shape[:2], []).append((path, image, time.perf_counter() - start))
        for items in loaded.values():  # an EXIF rotation can split a header-size group
            start = time.perf_counter()
            try:
                predictions = self.segmenter.predict_images([image for _, image, _ in items], self.job.expression,
                                                            self.job.options, max_pixels=self.job.max_pixels)
            except (LdznetError, RuntimeError) as error:  # RuntimeError: e.g. out of device memory
                share = (time.perf_counter() - start) / len(items)
                for path, _, seconds in items:
                    self.record(path, "error", error=f"prediction failed: {error}", seconds=seconds + share)
                continue
            share = (time.perf_counter() - start) / len(items)
            for (path, _, seconds), prediction in zip(items, predictions):
                start = time.perf_counter()
                output = self.job.output_for(path)
                try:
                    found = self.write(path, output, prediction)
                except OSError as error:  # a full disk, a read-only folder, ...
                    self.record(path, "error", error=f"cannot write {output.name}: {error.strerror or error}",
                                seconds=seconds + share + time.perf_counter() - start)
                    continue
                except LdznetError as error:  # a file of the user's where an instance mask would go
                    self.record(path, "error", error=str(error), seconds=seconds + share + time.perf_counter() - start)
                    continue
                self.record(path, "ok", output, seconds=seconds + share + time.perf_counter() - start, found=found)

    def write(self, path: Path, output: Path, prediction: Prediction) -> dict:
        """Write the instances (when asked) and then the mask, which marks the file done; returns the
        manifest fields of what was found."""
        found: dict = {"terms": prediction.presence_report()}
        if self.job.instances:
            instances = prediction.instances()
            targets = [self.job.instance_for(path, instance.order) for instance in instances]
            for target in targets:  # all checked before any is written
                if target.exists() and target.name not in self.earlier_instances:
                    raise LdznetError(f"{INSTANCES_FOLDER}/{target.name}: exists and is no instance mask that an "
                                      "earlier run of this folder wrote; move it, or choose another output folder")
            listed = []
            for instance, target in zip(instances, targets):
                outputs.write_mask(target, instance_image(instance, self.job.options.feather))
                listed.append({**instance.to_dict(), "file": str(target)})
            extra = len(listed) + 1
            # an earlier run (--overwrite) found more objects: its masks of them go, the user's files stay
            while (stale := self.job.instance_for(path, extra)).name in self.earlier_instances:
                stale.unlink(missing_ok=True)
                extra += 1
            found["instances"] = listed
        mask = prediction.mask_image()
        outputs.write_mask(output, mask)
        self.summary.empty += not mask.any()
        return found


def check_folders(input_dir: Path, output_dir: Path, instances: bool = False) -> list[Path]:
    """The input images (:func:`list_images`); LdznetError when there are none, when the masks (or
    with ``instances`` the objects' masks) would land among them or when the output folder cannot
    take files (it is created)."""
    files = list_images(input_dir)
    if not files:
        raise LdznetError(f"no images in {input_dir} (looked for {', '.join(IMAGE_SUFFIXES)})")
    if outputs.same_file(output_dir, input_dir):
        raise LdznetError("the output folder is the input folder: the masks ({stem}.png) would overwrite "
                          "the images; choose another output folder")
    if instances and outputs.same_file(output_dir / INSTANCES_FOLDER, input_dir):
        raise LdznetError("the input folder is where --instances writes each object's mask "
                          "({stem}-{k}.png, which would overwrite images such as a-1.png); choose another "
                          "output folder")
    outputs.writable_folder(output_dir)
    return files


def check_manifest(path: Path, files: Sequence[Path], output_dir: Path) -> None:
    """LdznetError unless ``path`` can take manifest lines without harm: a .jsonl (or .json) name that
    is neither an input image nor a mask of the run, new, empty or already a manifest, and writable."""
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise LdznetError(f"{path}: a manifest is a JSON Lines file; give a name ending in .jsonl")
    for image in files:
        for other, what in ((image, "the input image"), (output_dir / f"{image.stem}.png", "the mask")):
            if outputs.same_file(path, other):
                raise LdznetError(f"{path}: the same file as {what} {other}; give the manifest another name")
    outputs.writable_path(path)
    if not _is_manifest(path):
        raise LdznetError(f"{path}: not an ldznet manifest (its first line is not a manifest entry); "
                          "give a new file or an earlier run's manifest")


SAME_MASKS = frozenset({"device", "cuda_graphs"})
"""Recorded settings whose change leaves every mask as it was (within rounding): not a job of its own."""


def check_resume(path: Path, expression: str, settings: Mapping, overwrite: bool) -> None:
    """LdznetError when the run would skip masks that another job made: the manifest's latest written
    mask has another expression, or other values of the job's ``settings`` (keys it records, but
    ``SAME_MASKS``). With ``overwrite`` every mask is made again, so any earlier job is fine."""
    if overwrite or not path.is_file():
        return
    last = next((e for e in reversed(read_manifest(path)) if isinstance(e, dict) and e.get("status") == "ok"), None)
    if last is None:
        return
    recorded = last.get("settings") if isinstance(last.get("settings"), dict) else {}
    changed = [f"{key} {recorded[key]!r} -> {value!r}" for key, value in settings.items()
               if key in recorded and key not in SAME_MASKS and recorded[key] != value]
    if last.get("expression") != expression:
        changed.insert(0, f"expression {last.get('expression')!r} -> {expression!r}")
    if changed:
        raise LdznetError(f"{path} lists masks of another job ({'; '.join(changed)}), which this run would skip as "
                          "done; overwrite them (--overwrite), or choose another output folder")


MANIFEST_KEYS = frozenset({"input", "expression", "settings", "output", "status"})
"""Keys of every manifest entry (``_Run.record``): a JSON Lines file of other objects is someone else's."""


def _is_manifest(path: Path) -> bool:
    """True for a missing or empty file, or one whose first line is a manifest entry."""
    try:
        with open(path, "rb") as file:
            first = file.readline(1 << 20)
    except FileNotFoundError:
        return True
    if not first:
        return True
    try:
        entry = json.loads(first)
    except ValueError:  # not JSON, or not UTF-8
        return False
    return isinstance(entry, dict) and MANIFEST_KEYS <= entry.keys()


def run_batch(job: BatchJob, segmenter: Segmenter, manifest: Manifest,
              callbacks: BatchCallbacks | None = None) -> BatchSummary:
    """Process this shard's files; per-file problems are recorded in ``manifest``, never raised.

    ``callbacks`` hear of every file (a progress bar, the WebUI's job state) and may stop the run
    between groups (summary.interrupted).
    """
    callbacks = callbacks or BatchCallbacks()
    files = check_folders(job.input_dir, job.output_dir, job.instances) if job.files is None else list(job.files)
    job.output_dir.mkdir(parents=True, exist_ok=True)
    if job.instances:
        (job.output_dir / INSTANCES_FOLDER).mkdir(exist_ok=True)
    owners = stem_owners(files)
    mine = shard(files, *job.shard)
    callbacks.started(len(mine))
    try:
        run = _Run(job, segmenter, manifest, callbacks)
        owned, todo = set(), []
        for path in mine:
            output = job.output_for(path)
            owner = owners[path.stem.casefold()]
            if owner != path:
                run.record(path, "error", error=f"{owner.name} has the same stem and already writes "
                           f"{output.name}; rename one of them")
                continue
            owned.add(output.name)
            if output.exists() and not job.overwrite:
                run.record(path, "skipped", output)
            else:
                todo.append(path)
        outputs.remove_abandoned_temporaries(job.output_dir, owned)
        for group in _groups(todo, job.batch_size):
            if callbacks.stop_requested():
                run.summary.interrupted = True
                break
            run.group(group)
    finally:
        callbacks.finished()
    return run.summary
