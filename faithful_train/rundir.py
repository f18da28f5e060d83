"""The run directory: atomic writes of the resolved config, ``audits.jsonl`` and ``summary.json``,
and the end-of-run summary table.

Layout (DESIGN.md §4)::

    <run dir>/config.yaml      resolved config (values from ${oc.env:VAR} stay references)
    <run dir>/preregistration.json  audit thresholds + config hash, written before the first step
    <run dir>/metrics.csv      every logged metric by step (kill-safe; continued on resume)
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
import pickle
import re
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from faithful_train.errors import ConfigError, TrainingDiverged, first_line, note


def umask_mode(mode: int) -> int:
    """``mode`` less the process's umask: what ``open`` would have given a new file or folder."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


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
        os.chmod(tmp, umask_mode(0o666))  # mkstemp makes 0600; a run directory's files follow the umask
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_run_dir(path: str | Path) -> Path:
    """``path`` if a run can be written there (a directory, or one that can be made), else a
    one-line ``ConfigError``. Creates nothing: a config that fails later leaves no trace."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"run directory {str(path)!r} is a file, not a directory")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"run directory {str(path)!r} cannot be made: {str(existing)!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"run directory {str(path)!r} cannot be written: no write permission on {str(existing)!r}")
    return path


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
    """``{"step", "metrics": {name: value}, "thresholds": {metric: verdict}, "passed", "warnings"}``."""
    values = {k: float(v) for k, v in metrics.items()}
    thresholds, warnings = {}, []
    for audit in audits:
        values |= {f"audit/{audit.label}/{k}": v for k, v in audit.latest.items()}
        thresholds |= {f"audit/{audit.label}/{k}": v for k, v in audit.latest_verdicts.items()}
        warnings += audit.warnings()
    return {
        "step": step,
        "metrics": dict(sorted(values.items())),
        "thresholds": thresholds,
        "passed": all(v["pass"] for v in thresholds.values()),
        "warnings": warnings,
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    """A plain-text table of the final metrics and threshold verdicts."""
    rows = [
        (name, f"{value:.4f}" if isinstance(value, float) else str(value)) for name, value in summary["metrics"].items()
    ]
    for name, verdict in summary.get("thresholds", {}).items():
        rows.append((f"{name} {verdict['threshold']}", "PASS" if verdict["pass"] else "FAIL"))
    width = max((len(name) for name, _ in rows), default=10)
    line = "-" * (width + 13)
    body = "\n".join(f"{name:<{width}}  {value:>10}" for name, value in rows)
    warnings = "".join(f"\nwarning: {w}" for w in summary.get("warnings", []))
    return f"{line}\n{'metric':<{width}}  {'value':>10}\n{line}\n{body}\n{line}\nstep {summary['step']}{warnings}"


def preregister(
    run_dir: Path, config_text: str, audits: list[Any], strict: bool, keep_existing: bool = False, at_step: int = 0
) -> dict[str, Any]:
    """Write ``<run dir>/preregistration.json`` before the first step: every audit threshold, the
    SHA-256 of the resolved ``config.yaml`` and the time, so a reader can see the thresholds were
    set before the figures existed. With ``keep_existing`` (a resumed run, an audit) an existing
    record is kept and other thresholds are refused (a pre-registration is not edited); one
    written later than step 0 says at which step (``written_at_step``)."""
    import hashlib
    import time

    thresholds = {f"audit/{a.label}/{metric}": f"{op} {value:g}" for a in audits for metric, (op, value) in a.thresholds.items()}
    path = Path(run_dir) / "preregistration.json"
    if keep_existing and path.is_file():
        try:
            original = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); restore it, or use another run directory") from None
        if not isinstance(original, dict) or original.get("thresholds") != thresholds:
            found = original.get("thresholds") if isinstance(original, dict) else original
            raise ConfigError(
                f"the thresholds {thresholds} differ from those pre-registered in {path} ({found}); "
                "a pre-registration is kept as written (use another run directory to change them)"
            )
        return original
    record = {
        "thresholds": thresholds,
        "strict": strict,
        "config_sha256": hashlib.sha256(config_text.encode()).hexdigest(),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if at_step:
        record["written_at_step"] = at_step  # after figures existed: not a pre-registration in the strict sense
    atomic_write_json(path, record)
    return record


def truncate_jsonl(path: str | Path, last_step: int) -> None:
    """Keep only records with ``step <= last_step`` (a resumed run replays what came after)."""
    path = Path(path)
    if path.exists():
        kept = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
        atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))


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


def first_nonfinite(module: torch.nn.Module) -> str | None:
    """The first parameter or buffer with a non-finite value (of this rank's shard, when sharded)."""
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


class SoundCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` that never writes non-finite weights (``last.ckpt`` stays
    the last sound state) and first flushes ``metrics.csv``, recording its row count in the
    checkpoint so a resume can tell whether the log lost rows."""

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        bad = first_nonfinite(trainer.lightning_module)
        if trainer.strategy.reduce_boolean_decision(bad is not None, all=False):
            raise TrainingDiverged(
                f"non-finite weights ({bad or 'on another process'}) at step {trainer.global_step}; not checkpointed"
            )
        super()._save_checkpoint(trainer, filepath)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, RunCSVLogger) and trainer.is_global_zero:
                logger.save()
                checkpoint["metrics_csv_rows"] = logger.experiment.rows_written


def _first_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(1)


def load_checkpoint(path: Path) -> dict:
    """A Lightning checkpoint's contents, loaded with ``weights_only=True`` (a pickle that would run
    code is refused, not run), or a one-line error."""
    if not path.is_file():
        raise ConfigError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path) and _first_byte(path) != b"\x80":  # neither torch.save's zip nor a pickle
        raise ConfigError(f"{path} is not a checkpoint that loads safely: not a file written by torch.save")
    try:
        # mmap needs torch.save's zip format; an older or foreign file is read (safely) without it
        with warnings.catch_warnings():  # "Detected pickle protocol 4": a foreign pickle, refused below if unsafe
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:
        code = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", str(e))
        if code:
            reason = f"it would call {code.group(1)} (refused: checkpoints load with weights_only=True)"
        elif "Weights only load failed" in str(e):
            reason = (
                "it holds more than tensors and plain containers (refused: checkpoints load with weights_only=True)"
            )
        else:
            reason = first_line(e, 160) if isinstance(e, pickle.UnpicklingError) else "not a file written by torch.save"
        raise ConfigError(f"{path} is not a checkpoint that loads safely: {reason}") from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise ConfigError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    return state


def model_weights(model: torch.nn.Module, state: Mapping[str, Any], path: Path, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The model's weights in checkpoint ``state`` (its keys under ``prefix``), checked against
    ``model`` before anything loads, each mismatch one line: a weight of another shape (another
    size or vocabulary), weights missing or unexpected. A LoRA run's checkpoint holds the
    trainable weights only and names its base by hash (``faithful_train.base``): the base's
    weights are then the model's own, which must be that base."""
    from faithful_train.modeling.lora import has_adapters

    saved = {k[len(prefix) :]: v for k, v in state["state_dict"].items() if k.startswith(prefix)}
    own = model.state_dict()
    for key, value in saved.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise ConfigError(
                f"checkpoint {path} does not fit the config's model: {prefix}{key} is {list(value.shape)} there and "
                f"{list(own[key].shape)} here (a model of another size or vocabulary?)"
            )
    base = (state.get("faithful_train") or {}).get("base")
    adapters = has_adapters(model)
    if base is not None and not adapters:
        raise ConfigError(f"checkpoint {path} holds LoRA adapters only (trained on base {base}); the config has no model.lora")
    optional: set[str] = set()
    if base is not None:
        if base != model.__dict__["lora_base_hash"]:
            raise ConfigError(
                f"checkpoint {path} holds adapters trained on another base model (base {base}; this config's model is "
                f"{model.__dict__['lora_base_hash']}): point model.path at the model that run started from"
            )
        optional = {name for name, p in model.named_parameters() if "lora_" not in name}
    missing = [k for k in own if k not in saved and k not in optional]
    unexpected = [k for k in saved if k not in own]
    if missing or unexpected:
        hint = " (the config adds LoRA adapters; the checkpoint has none)" if adapters and base is None else ""
        raise ConfigError(f"checkpoint {path} does not fit the config's model{hint}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return saved
