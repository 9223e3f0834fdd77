"""Step-keyed CSV logs (``loss_log.csv``, ``eval_log.csv``), kept consistent across resumes.

Both logs are "append a row per step; on resume, drop the rows a dead run wrote past its last
checkpoint", so they share :class:`StepLog` and differ only in their header and row format.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path


class StepLog:
    """A CSV file whose first column is the optimizer step; the header is written with the first row."""

    HEADER: tuple[str, ...] = ("step",)

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def _append_row(self, row: list[object]) -> None:
        new = not self.path.exists()
        with self.path.open("a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(self.HEADER)
            writer.writerow(row)

    def trim_after(self, step: int) -> None:
        """Drop rows of steps after ``step`` (written by a run that died before its next checkpoint)."""
        if not self.path.exists():
            return
        with self.path.open(newline="") as handle:
            rows = list(csv.reader(handle))
        kept = rows[:1] + [row for row in rows[1:] if row and int(row[0]) <= step]
        # Written beside and renamed over, so a kill mid-trim never loses the log.
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w", newline="") as handle:
            csv.writer(handle).writerows(kept)
        os.replace(tmp, self.path)


class LossLog(StepLog):
    """``loss_log.csv``: ``step,loss,lr`` rows, one per optimizer step."""

    HEADER = ("step", "loss", "lr")

    def append(self, step: int, loss: float, lr: float) -> None:
        self._append_row([step, f"{loss:.6f}", f"{lr:.6e}"])
