"""Two CPU processes under DDP: objectives train, audits run on every rank and agree, and only
rank zero writes the run directory."""

from __future__ import annotations

import json

import pytest

from faithful_train.io.files import read_jsonl
from tests.distributed.cli import TWO_RANKS, audit_alone, cli

pytestmark = pytest.mark.distributed


def test_fit_with_two_cpu_processes(tmp_path, repo):
    run_dir = tmp_path / "ddp"
    proc = cli(
        repo,
        *("fit", "-c", "configs/quickstart.yaml", "--run-dir", str(run_dir), *TWO_RANKS),
        *("trainer.strategy=ddp", "audits.0.every_n_steps=4", "audits.0.n_examples=64"),
    )
    records = read_jsonl(run_dir / "audits.jsonl")
    assert [r["step"] for r in records] == [4, 8]  # one record per audit run, not one per rank
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 8 and "audit/interchange/iia" in summary["metrics"]
    assert summary["metrics"]["audit/interchange/iia"] == records[-1]["metrics"]["iia"]
    assert proc.stdout.count("run directory:") == 1

    # the DDP figure is the mean over both ranks' shards: it equals one process auditing all 64
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    alone = audit_alone(repo, "configs/quickstart.yaml", ckpt, tmp_path / "single", "audits.0.n_examples=64")
    for key, value in records[-1]["metrics"].items():
        assert alone[f"audit/interchange/{key}"] == pytest.approx(value, abs=1e-6), key


def test_learned_basis_under_ddp(tmp_path, repo):
    """The DAS basis lives on the LightningModule, so DDP reduces its gradient; before the
    objective's schedule starts it is idle, which DDP must tolerate (no unused-parameter error)."""
    import torch

    run_dir = tmp_path / "das"
    cli(
        repo,
        *("fit", "-c", "configs/iit-das.yaml", "--run-dir", str(run_dir), *TWO_RANKS, "trainer.strategy=ddp"),
        *("objectives.0.schedule.start=4", "objectives.0.schedule.steps=0"),
        *("audits.0.every_n_steps=4", "audits.0.n_examples=64"),
    )
    from faithful_train.training import run as runs
    from faithful_train.training.config import load_config

    trained = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    initial = runs.build(load_config(repo / "configs/iit-das.yaml"), tmp_path / "init").module.state_dict()
    keys = [k for k in initial if k.startswith("objective_modules.das.")]
    assert keys and all(k in trained for k in keys)
    assert any(not torch.equal(initial[k], trained[k]) for k in keys)  # optimised once the term started
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "audit/interchange/control/random_subspace/iia" in summary["metrics"]


def test_router_objective_and_audit_under_ddp(tmp_path, repo):
    """Router audit counts (contingency tables, loads, ablation tallies) are summed over ranks:
    the 2-rank figures equal one process auditing the whole set; bias balancing runs under DDP."""
    import torch

    run_dir = tmp_path / "router"
    common = ["audits.0.n_examples=64", "audits.0.batch_size=16", "logger.wandb.mode=disabled"]
    cli(
        repo,
        *("fit", "-c", "configs/moe-router.yaml", "--run-dir", str(run_dir), *TWO_RANKS, "trainer.strategy=ddp"),
        *("objectives.0.bias_rate=0.01", "audits.0.every_n_steps=4", *common),
    )
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["state_dict"]["model.blocks.0.mlp.selection_bias"].abs().max() > 0
    alone = audit_alone(repo, "configs/moe-router.yaml", ckpt, tmp_path / "single", *common)
    figures = read_jsonl(run_dir / "audits.jsonl")[-1]["metrics"]
    assert "expert_concept_nmi" in figures and "ablation/own_drop" in figures
    for key, value in figures.items():
        assert alone[f"audit/router/{key}"] == pytest.approx(value, abs=1e-6), key
