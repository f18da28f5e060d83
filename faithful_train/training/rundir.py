"""The run directory: its check before anything is written, the pre-registration of the audits'
thresholds, and the end-of-run summary.

Layout (DESIGN.md §4)::

    <run dir>/config.yaml      resolved config (values from ${oc.env:VAR} stay references)
    <run dir>/preregistration.json  audit thresholds + config hash, written before the first step
    <run dir>/metrics.csv      every logged metric by step (kill-safe; continued on resume; training.metrics_csv)
    <run dir>/audits.jsonl     one record per audit run: step, audit, metrics, verdicts
    <run dir>/summary.json     final value of every metric + pass/fail of thresholds
    <run dir>/checkpoints/     Lightning checkpoints (last.ckpt and periodic ones; training.checkpoints)
    <run dir>/hypotheses/      hypothesis files the objectives and audits write (intervene.hypotheses)
    <run dir>/wandb/           the wandb run (offline unless turned online)

Files are written atomically (``io.files``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from faithful_train.errors import ConfigError
from faithful_train.io.files import atomic_write_json


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

    thresholds = {
        f"audit/{a.label}/{metric}": f"{op} {value:g}" for a in audits for metric, (op, value) in a.thresholds.items()
    }
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
