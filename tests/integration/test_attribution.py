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
    if config.startswith("configs/stability"):  # and the gradient x input audit beside it
        assert {"audit/attribution_gxi/stability/cosine", "audit/attribution/stability/cosine"} <= set(metrics)
    else:  # the decoy task marks the tag and the noise
        assert "audit/attribution/irrelevant_share" in metrics
    if "baseline" not in config:
        term = "stability" if config.endswith("stability.yaml") else "right_reasons"
        assert f"train/objective/stability/{term}" in metrics


def _fit_short(tmp_path: Path, config: str, *overrides: str) -> dict:
    run_dir = tmp_path / Path(config).stem
    assert main(["fit", "-c", config, "--run-dir", str(run_dir), "trainer.progress_bar=false", "optim.decay=none", "data.batch_size=64", *overrides]) == 0
    return json.loads((run_dir / "summary.json").read_text())["metrics"]


@pytest.mark.slow
def test_right_reasons_term_escapes_the_decoy(tmp_path):
    """The tag names the label in every training example and is random at test: trained the
    usual way the model reads the tag and sits at chance on the test set; the right-reasons
    penalty on the tag's (and the noise's) input gradients makes it learn the rule instead."""
    short = ["audits=[]", "trainer.max_steps=400", "trainer.val_every=400", "data.val_size=512"]
    penalised = _fit_short(tmp_path, "configs/right-reasons-decoy.yaml", *short)["val/task_acc"]
    baseline = _fit_short(tmp_path, "configs/right-reasons-decoy-baseline.yaml", *short)["val/task_acc"]
    assert baseline <= 0.3, baseline  # chance is 0.25: the shortcut
    assert penalised >= baseline + 0.15, (penalised, baseline)  # 400 steps: 0.50 (3000 steps: 0.97)


@pytest.mark.slow
def test_stability_objective_makes_attributions_stable_under_perturbation(tmp_path):
    """Same task, transformer and steps, with and without the stability objective: the audit's
    gradient x input attributions of held-out examples and their perturbations (new order, new
    noise) agree in direction (cosine) far more with the objective, and in rank order (Spearman)
    more, at no cost in task accuracy."""
    short = ["trainer.max_steps=600", "trainer.val_every=600", "data.val_size=512", "audits.0.every_n_steps=600",
             "audits.0.n_examples=512", "audits.0.method=gradient_x_input", "audits.0.randomisation=false", "audits.0.calibration=false"]  # fmt: skip
    stable = _fit_short(tmp_path, "configs/stability.yaml", *short)
    plain = _fit_short(tmp_path, "configs/stability-baseline.yaml", *short)
    figure = lambda m, name: m[f"audit/attribution/stability/{name}"]  # noqa: E731
    assert figure(stable, "cosine") >= 0.99 and figure(plain, "cosine") <= 0.9, (stable, plain)
    # rank order moves the same way, less far: four of the five aligned tokens matter equally
    # (the label is their sum), so their order is partly a coin flip (3000 steps: 0.95 vs 0.80)
    assert figure(stable, "spearman") >= figure(plain, "spearman") + 0.03, (stable, plain)
    assert stable["val/task_acc"] >= plain["val/task_acc"] - 0.01, (stable, plain)
