"""Training logs: a head run's RUN_DIR/log.csv (and TensorBoard event files when tensorboard is installed),
and the JSON log of staged runs such as the micro SD's."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from ..data.files import read_json
from ..errors import LdznetError
from ..outputs import replacing

COLUMNS = ("step", "loss", "lr", "seconds", "samples_per_second")
LOG = "log.csv"
TENSORBOARD = "tensorboard"


class RunLog:
    """Appends one row per logging interval to RUN_DIR/log.csv (a resumed run continues the file)
    and, where ``torch.utils.tensorboard`` imports, writes the same scalars to RUN_DIR/tensorboard.

    ``step``: where the run starts. Rows an interrupted run logged after its last checkpoint are removed,
    since the resumed run logs those steps again."""

    def __init__(self, run_dir: str | os.PathLike, step: int = 0):
        self.path = Path(run_dir) / LOG
        self._drop_rows_after(step)
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the optional tensorboard package
        except ImportError:
            self.writer = None
        else:
            self.writer = SummaryWriter(str(Path(run_dir) / TENSORBOARD))

    def write(self, record: dict[str, float]) -> None:
        """Log a record whose keys are ``COLUMNS``."""
        new = not self.path.is_file()
        with open(self.path, "a", encoding="utf-8", newline="") as file:
            writer = csv.DictWriter(file, COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow(record)
        if self.writer is not None:
            for name in COLUMNS[1:]:
                self.writer.add_scalar(f"train/{name}", record[name], int(record["step"]))
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def _drop_rows_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        with open(self.path, encoding="utf-8", newline="") as file:
            rows = list(csv.DictReader(file))
        kept = [row for row in rows if not (row.get("step") or "").isdigit() or int(row["step"]) <= step]
        if len(kept) == len(rows):
            return
        with replacing(self.path) as temporary, open(temporary, "w", encoding="utf-8", newline="") as file:
            writer = csv.DictWriter(file, COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)


def _earlier_stages(path: Path) -> dict:
    """The "stages" of an earlier log at ``path`` ({} when there is none); LdznetError naming the file
    when it is no such log, which the run would otherwise end on, or overwrite."""
    if not path.is_file():
        return {}
    log = read_json(path, "a training log; move it away or give another output folder")
    recipe, stages = (log.get("recipe"), log.get("stages")) if isinstance(log, dict) else (None, None)
    # A run's log always has both from its first write: a file without them is someone else's, which the
    # run would overwrite, with the files the log stands for.
    if not (isinstance(recipe, dict) and isinstance(stages, dict)
            and all(isinstance(v, dict) for v in stages.values())):
        raise LdznetError(f"{path}: not a training log of `ldznet world train-sd` (no recipe and stages); move it "
                          "away or give another output folder")
    return stages


class StageLog:
    """A JSON run log of training stages (the micro SD's ``train_sd_log.json``): the run's header,
    per stage ``{"log": [interval records], ...}``, and ``probes``; rewritten on every change so that
    it can be polled. Entries of stages not run this time are kept from an earlier log at ``path``."""

    def __init__(self, path: Path, header: dict):
        self.path = path
        self.data = {**header, "stages": _earlier_stages(path), "probes": {}}

    def stage(self, name: str) -> dict:
        """Start (reset) a stage's entry and return it; fill it, then call :meth:`write`."""
        self.data["stages"][name] = {"log": []}
        return self.data["stages"][name]

    def write(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1) + "\n", encoding="utf-8")
