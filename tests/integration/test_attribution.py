"""Explanation-stability configs from the command line: each runs, logs its terms and the
attribution audit's figures; the decoy task's baseline learns the shortcut."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from faithful_train.cli import main
from tests.integration.test_cli import TINY

CONFIGS = ["configs/stability.yaml", "configs/stability-baseline.yaml", "configs/right-reasons-decoy.yaml", "configs/right-reasons-decoy-baseline.yaml"]


@pytest.fixture(autouse=True)
def _in_repo(repo, monkeypatch):
    monkeypatch.chdir(repo)


@pytest.mark.parametrize("config", CONFIGS)
def test_shipped_configs_run(tmp_path, config):
    assert Path(config).read_text().splitlines()[0] == f"# faithful-train fit -c {config}"
    assert main(["fit", "-c", config, "--run-dir", str(tmp_path), *TINY]) == 0
    metrics = json.loads((tmp_path / "summary.json").read_text())["metrics"]
    for key in ("audit/attribution/stability/spearman", "audit/attribution/randomisation/spearman",
                "audit/attribution/eraser/comprehensiveness", "audit/attribution/calibration", "audit/attribution/completeness_error"):  # fmt: skip
        assert key in metrics, key
    if "baseline" not in config:
        term = "stability" if config.endswith("stability.yaml") else "right_reasons"
        assert f"train/objective/stability/{term}" in metrics
