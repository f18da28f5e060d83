"""The interchange objective's causal effect: with it the model implements the causal model at
the aligned sites (IIA ~1); without it, the same model learns the task just as well but IIA
stays at chance. Uses a user task loaded from a file by the config (docs/guide/bring-your-own.md)."""

import json

import pytest

from faithful_train.commands.cli import main

pytestmark = pytest.mark.slow
CONFIG = "tests/integration/assets/halves.yaml"


def _fit(run_dir, *overrides):
    assert main(["fit", "-c", CONFIG, "--run-dir", str(run_dir), *overrides]) == 0
    return json.loads((run_dir / "summary.json").read_text())["metrics"]


def test_interchange_training_raises_iia_and_baseline_stays_at_chance(tmp_path, repo, monkeypatch):
    monkeypatch.chdir(repo)
    trained = _fit(tmp_path / "objective")
    baseline = _fit(tmp_path / "baseline", "objectives=[]")
    assert trained["val/task_acc"] >= 0.95 and baseline["val/task_acc"] >= 0.95
    assert trained["audit/interchange/iia"] >= 0.95
    assert trained["audit/interchange/iia_changed/low"] >= 0.9 and trained["audit/interchange/iia_changed/even"] >= 0.9
    assert baseline["audit/interchange/iia"] <= 0.65
