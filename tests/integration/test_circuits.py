"""Circuits from the CLI: the circuit config trains and audits, writes hypotheses; ``verify`` tests
one run's hypothesis on another run's checkpoint and on a shifted task, and prints the drift;
its errors are one line and exit 2."""

from __future__ import annotations

import json
import shutil

import pytest

from faithful_train.commands.cli import main
from tests.integration.tiny import fit_configs

TINY = [
    "trainer.max_steps=30",
    "trainer.val_every=15",
    "trainer.progress_bar=false",
    "audits.0.every_n_steps=15",
    "audits.0.n_examples=64",
    "audits.0.bootstrap=50",
    "data.val_size=64",
    "data.batch_size=32",
    "logger.wandb.mode=disabled",
]


@pytest.fixture(autouse=True)
def _in_repo(repo, monkeypatch):
    monkeypatch.chdir(repo)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The circuit config and its baseline, 30 steps each."""
    return fit_configs(tmp_path_factory.mktemp("circuits"), ["circuit", "circuit-baseline"], TINY)


def test_the_circuit_config_trains_audits_and_writes_hypotheses(two_runs):
    run = two_runs / "circuit"
    summary = json.loads((run / "summary.json").read_text())["metrics"]
    for key in (
        "train/objective/circuit",
        "train/objective/circuit/sufficiency",
        "audit/ablation/faithfulness",
        "audit/ablation/necessity",
        "audit/ablation/sufficiency",
        "audit/ablation/cpr",
    ):
        assert key in summary, key
    objective = json.loads((run / "hypotheses" / "circuit.json").read_text())
    audit = json.loads((run / "hypotheses" / "ablation.json").read_text())
    assert objective["nodes"] == audit["nodes"] and objective["kind"] == "circuit"
    assert audit["figures"]["faithfulness"] == pytest.approx(summary["audit/ablation/faithfulness"])
    assert audit["step"] == 30


def test_verify_prints_the_drift_on_another_checkpoint_and_on_a_shifted_task(two_runs, capsys):
    hypothesis = two_runs / "circuit" / "hypotheses" / "ablation.json"
    # the same checkpoint: no drift
    assert main(["verify", str(hypothesis), "--ckpt", str(two_runs / "circuit" / "checkpoints" / "last.ckpt")]) == 0
    same = capsys.readouterr().out
    assert "the same weights and the same audit set" in same
    row = next(line for line in same.splitlines() if line.startswith("faithfulness "))
    assert row.split()[-1] in ("+0.0000", "-0.0000")
    # the baseline's checkpoint: other weights, a drift
    assert (
        main(["verify", str(hypothesis), "--ckpt", str(two_runs / "circuit-baseline" / "checkpoints" / "last.ckpt")])
        == 0
    )
    other = capsys.readouterr().out
    assert "other weights" in other
    row = next(line for line in other.splitlines() if line.startswith("faithfulness "))
    assert abs(float(row.split()[-1])) > 0
    # a shifted task: more symbols, the same model
    ckpt = two_runs / "circuit" / "checkpoints" / "last.ckpt"
    assert (
        main(["verify", str(hypothesis), "--ckpt", str(ckpt), "-c", "configs/circuit.yaml", "task.equal_rate=0.9"]) == 0
    )
    assert "shifted" in capsys.readouterr().out


def test_verify_errors_are_one_line_and_exit_2(two_runs, tmp_path, capsys):
    ckpt = str(two_runs / "circuit" / "checkpoints" / "last.ckpt")
    assert main(["verify", str(tmp_path / "missing.json"), "--ckpt", ckpt]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.json" in err and "does not exist" in err
    bad = json.loads((two_runs / "circuit" / "hypotheses" / "ablation.json").read_text())
    bad["nodes"] = ["blocks.5.mlp.out"]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert main(["verify", str(tmp_path / "bad.json"), "--ckpt", ckpt]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "blocks.5.mlp.out" in err and "Traceback" not in err
    shutil.copy(two_runs / "circuit" / "config.yaml", tmp_path / "config.yaml")
    assert main(["verify", str(tmp_path / "bad.json"), "--ckpt", str(tmp_path / "nothing.ckpt")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
