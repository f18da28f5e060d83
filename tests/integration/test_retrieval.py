"""The retrieval configs from the CLI: train, audit, write provenance records; bad input is one line."""

from __future__ import annotations

import json

import pytest

from faithful_train.cli import main
from tests.integration.test_cli import assert_fit_fails_in_one_line

TINY = [
    "trainer.max_steps=20",
    "trainer.val_every=10",
    "trainer.progress_bar=false",
    "audits.0.every_n_steps=10",
    "audits.0.n_examples=32",
    "data.val_size=32",
    "data.batch_size=16",
    "logger.wandb.mode=disabled",
]


@pytest.fixture(autouse=True)
def _in_repo(repo, monkeypatch):
    monkeypatch.chdir(repo)


@pytest.mark.parametrize("config", ["configs/retrieval-cf.yaml", "configs/retrieval-baseline.yaml"])
def test_retrieval_configs_run_and_write_provenance(config, tmp_path):
    assert main(["fit", "-c", config, "--run-dir", str(tmp_path), *TINY]) == 0
    metrics = json.loads((tmp_path / "summary.json").read_text())["metrics"]
    for key in ("audit/retrieval/counterfactual_follow", "audit/retrieval/reliance_acc", "audit/retrieval/consulted_used_spearman"):
        assert key in metrics, key
    assert ("train/objective/counterfactual_context" in metrics) == config.endswith("cf.yaml")
    records = (tmp_path / "provenance" / "step000020.jsonl").read_text().splitlines()
    assert len(records) == 32 * 4 and {"consulted", "used", "kind"} <= set(json.loads(records[0]))


def test_retrieval_needs_documents(tmp_path, capsys):
    assert_fit_fails_in_one_line(
        "configs/retrieval-baseline.yaml", tmp_path, capsys, ["task={name: hierarchical_equality}"], "needs a task with documents", "kv_retrieval"
    )
