"""``<run dir>/metrics.csv``: every logged metric by step, kill-safe and continued on resume."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from faithful_train.errors import note
from faithful_train.io.files import atomic_write_text


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a CSV file (none if missing); a field beyond the header is dropped."""
    if not path.is_file():
        return [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = [{k: v for k, v in row.items() if k is not None} for row in reader]
        return list(reader.fieldnames or []), rows


def _step(row: Mapping[str, str]) -> int | None:
    try:
        return int(row.get("step") or "")
    except ValueError:
        return None


def _csv_text(header: list[str], rows: list[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


class _ResumableWriter(ExperimentWriter):
    """``metrics.csv`` that survives a kill at any moment and continues on resume.

    Lightning's writer truncates and rewrites the file whenever a new metric appears; a kill in
    that window leaves only the header. Here a new header means write-new-then-replace, and
    other rows are appended and synced, so the file on disk is always a whole CSV. On resume
    the rows up to the checkpoint's step are kept; fewer rows than the checkpoint recorded
    means the file was damaged, and the user is told."""

    def __init__(self, log_dir: str, resume_step: int | None, expected_rows: int | None = None):
        self.resume_step, self.expected_rows = resume_step, expected_rows
        self.rows_written = 0
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if self.resume_step is None:
            path.unlink(missing_ok=True)
            return
        header, rows = _read_csv(path)
        rows = [row for i, row in enumerate(rows) if self._kept(row, i)]
        if self.expected_rows is not None and len(rows) < self.expected_rows:
            note(
                f"{path} holds {len(rows)} rows up to step {self.resume_step}, the checkpoint recorded "
                f"{self.expected_rows}: rows were lost before this resume (the run continues; the log has a gap)"
            )
        if header:
            atomic_write_text(path, _csv_text(header, rows))
        self.metrics_keys, self.rows_written = header, len(rows)

    def _kept(self, row: Mapping[str, str], index: int) -> bool:
        """Rows the resumed run will not log again: those before the checkpoint's step, and at
        its step those written before the checkpoint or logged after training at that step
        (validation, audits). A training row stamped with the checkpoint's step comes from the
        next step (Lightning stamps a step's training row with the steps done before it), which
        the resumed run repeats."""
        step = _step(row)
        if step is None or step > self.resume_step:
            return False
        if step < self.resume_step or (self.expected_rows is not None and index < self.expected_rows):
            return True
        return not any(value and key.startswith("train/") for key, value in row.items())

    def save(self) -> None:
        if not self.metrics:
            return
        path = Path(self.metrics_file_path)
        keys = sorted(set(self.metrics_keys).union(*self.metrics))
        if keys != self.metrics_keys or not path.is_file():  # a new header: write a new file and replace
            _, old = _read_csv(path)
            atomic_write_text(path, _csv_text(keys, [*old, *self.metrics]))
            self.metrics_keys = keys  # only once the file has them (a save after a kill appends under them)
        else:  # the same header: append whole rows and sync
            buffer = io.StringIO()
            csv.DictWriter(buffer, fieldnames=self.metrics_keys).writerows(self.metrics)
            with open(path, "a", newline="") as f:
                f.write(buffer.getvalue())
                f.flush()
                os.fsync(f.fileno())
        self.rows_written += len(self.metrics)
        self.metrics = []


class RunCSVLogger(CSVLogger):
    """``<run dir>/metrics.csv``, kill-safe and continued (not overwritten) when the run resumes."""

    def __init__(self, run_dir: str | Path, resume_step: int | None = None, expected_rows: int | None = None):
        super().__init__(save_dir=str(run_dir), name="", version="")
        self.resume_step, self.expected_rows = resume_step, expected_rows

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumableWriter(self.log_dir, self.resume_step, self.expected_rows)
        return self._experiment
