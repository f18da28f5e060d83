"""The run directory: atomic writes of the resolved config, ``audits.jsonl`` and ``summary.json``,
and the end-of-run summary table.

Layout (DESIGN.md §4)::

    <run dir>/config.yaml      resolved config
    <run dir>/metrics.csv      every logged metric by step (Lightning's CSVLogger)
    <run dir>/audits.jsonl     one record per audit run: step, figures, threshold verdicts
    <run dir>/summary.json     final value of every metric + pass/fail of thresholds
    <run dir>/checkpoints/     Lightning checkpoints (last.ckpt and periodic ones)
    <run dir>/wandb/           the wandb run (offline unless turned online)
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from faithful_train.errors import ConfigError


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temporary file in the same directory and ``os.replace``: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):
        return _jsonable(value.item())
    return value


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(_jsonable(data), indent=2, sort_keys=True) + "\n")


def append_jsonl(path: str | Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line with a single ``write`` + ``fsync``: a crash leaves whole lines only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(_jsonable(record), sort_keys=True) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def build_summary(metrics: Mapping[str, float], audits: list[Any], step: int) -> dict[str, Any]:
    """``{"step", "metrics": {name: value}, "thresholds": {metric: verdict}, "passed"}``."""
    values = {k: float(v) for k, v in metrics.items()}
    thresholds = {}
    for audit in audits:
        values |= {f"audit/{audit.label}/{k}": v for k, v in audit.latest.items()}
        thresholds |= {f"audit/{audit.label}/{k}": v for k, v in audit.latest_verdicts.items()}
    return {
        "step": step,
        "metrics": dict(sorted(values.items())),
        "thresholds": thresholds,
        "passed": all(v["pass"] for v in thresholds.values()),
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    """A plain-text table of the final metrics and threshold verdicts."""
    rows = [(name, f"{value:.4f}" if isinstance(value, float) else str(value)) for name, value in summary["metrics"].items()]
    for name, verdict in summary.get("thresholds", {}).items():
        rows.append((f"{name} {verdict['threshold']}", "PASS" if verdict["pass"] else "FAIL"))
    width = max((len(name) for name, _ in rows), default=10)
    line = "-" * (width + 13)
    body = "\n".join(f"{name:<{width}}  {value:>10}" for name, value in rows)
    return f"{line}\n{'metric':<{width}}  {'value':>10}\n{line}\n{body}\n{line}\nstep {summary['step']}"


def truncate_jsonl(path: str | Path, last_step: int) -> None:
    """Keep only records with ``step <= last_step`` (a resumed run replays what came after)."""
    path = Path(path)
    if path.exists():
        kept = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
        atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))


class _ResumableWriter(ExperimentWriter):
    """Lightning's CSV writer deletes ``metrics.csv`` in a non-empty directory; on resume this
    one keeps the rows up to the checkpoint's step instead, so the file continues the run."""

    def __init__(self, log_dir: str, resume_step: int | None):
        self.resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        if self.resume_step is None:
            path.unlink()
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [row for row in reader if row.get("step") and int(row["step"]) <= self.resume_step]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, buffer.getvalue())
        self.metrics_keys = header


class RunCSVLogger(CSVLogger):
    """``<run dir>/metrics.csv``, continued (not overwritten) when the run resumes."""

    def __init__(self, run_dir: str | Path, resume_step: int | None = None):
        super().__init__(save_dir=str(run_dir), name="", version="")
        self.resume_step = resume_step

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumableWriter(self.log_dir, self.resume_step)
        return self._experiment


def load_checkpoint(path: Path) -> dict:
    """A Lightning checkpoint's contents, loaded with ``weights_only=True`` (a pickle that would run
    code is refused, not run), or a one-line error."""
    if not path.is_file():
        raise ConfigError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ConfigError(f"{path} is not a checkpoint that loads safely: {str(e).splitlines()[0][:160]}") from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise ConfigError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    return state
