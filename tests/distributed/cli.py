"""The 2-process tests' shared steps: the command line in a process of its own, and one process
re-auditing a checkpoint (the figure a 2-rank audit must equal)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

# two CPU ranks, 8 steps, audits and validation every 4
TWO_RANKS = [
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.max_steps=8",
    "trainer.val_every=4",
    "trainer.progress_bar=false",
    "data.batch_size=16",
    "data.val_size=64",
    "logger.wandb.mode=disabled",
]


def cli(repo: Path, *args: str) -> subprocess.CompletedProcess:
    """``faithful-train ARGS`` from the repository root; fails the test unless it exits 0."""
    cmd = [sys.executable, "-m", "faithful_train.commands.cli", *args]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def audit_alone(repo: Path, config: str, ckpt: Path, run_dir: Path, *overrides: str) -> dict[str, Any]:
    """The summary metrics of one process auditing ``ckpt`` with ``config``'s audits."""
    cli(repo, "audit", "-c", config, "--ckpt", str(ckpt), "--run-dir", str(run_dir), *overrides)
    return json.loads((run_dir / "summary.json").read_text())["metrics"]
