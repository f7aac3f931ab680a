"""A run's training log: RUN_DIR/log.csv, and TensorBoard event files when tensorboard is installed."""

from __future__ import annotations

import csv
import os
from pathlib import Path

COLUMNS = ("step", "loss", "lr", "seconds", "samples_per_second")
LOG = "log.csv"
TENSORBOARD = "tensorboard"


class RunLog:
    """Appends one row per logging interval to RUN_DIR/log.csv (a resumed run continues the file)
    and, where ``torch.utils.tensorboard`` imports, writes the same scalars to RUN_DIR/tensorboard."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOG
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
