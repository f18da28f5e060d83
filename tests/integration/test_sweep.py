"""``faithful-train sweep`` end to end on tiny trials: the front, the table and the PNG; a second
invocation adds to the same study; two workers give the same figures as one; a sweep stopped
mid-trial continues."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import optuna
import pytest
import yaml

from faithful_train.commands.cli import main
from faithful_train.commands.sweep import load_sweep, open_study
from tests.integration.tiny import TINY, read_csv

SWEEP = "configs/sweeps/iit-weight.yaml"


@pytest.fixture(autouse=True)
def _in_repo(repo, monkeypatch):
    monkeypatch.chdir(repo)


def rows(out):
    return read_csv(out / "trials.csv")


def test_a_sweep_writes_the_front_and_a_second_invocation_adds_trials(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "-c", SWEEP, "--out", str(out), "--trials", "3", *TINY]) == 0
    printed = capsys.readouterr().out
    assert "# Pareto front of iit-weight" in printed and "Hypervolume" in printed
    first = rows(out)
    assert [r["state"] for r in first] == ["complete"] * 3
    for name in ("pareto.csv", "pareto.md", "pareto.png", "summary.json", "study.db"):
        assert (out / name).is_file(), name
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for r in first:  # each trial is an ordinary run directory
        summary = json.loads((tmp_path / r["run_dir"].split(str(tmp_path) + "/", 1)[1] / "summary.json").read_text())
        assert summary["metrics"]["val/task_acc"] == pytest.approx(float(r["val/task_acc"]))
    front = list(csv.DictReader(open(out / "pareto.csv")))
    assert front and {r["trials"] for r in front} <= {r["trial"] for r in first}
    assert all(r["point"] == f"weight={float(r['objectives.0.weight']):g}" for r in front)  # named by value
    assert main(["sweep", "-c", SWEEP, "--out", str(out), "--trials", "2", *TINY]) == 0
    both = rows(out)
    assert [r["trial"] for r in both] == ["0", "1", "2", "3", "4"]
    assert len({r["objectives.0.weight"] for r in both}) == 5  # the grid: each weight once
    assert json.loads((out / "summary.json").read_text())["complete"] == 5


@pytest.mark.distributed  # two worker processes
def test_two_workers_give_the_figures_of_one(tmp_path):
    figures = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        assert main(["sweep", "-c", SWEEP, "--out", str(out), "--trials", "2", "--workers", str(workers), *TINY]) == 0
        figures[workers] = {
            r["objectives.0.weight"]: (r["val/task_acc"], r["audit/interchange/iia"]) for r in rows(out)
        }
    common = set(figures[1]) & set(figures[2])
    assert common and all(figures[1][w] == figures[2][w] for w in common)


def test_a_stopped_sweep_runs_its_cut_off_trial_again(tmp_path):
    out = tmp_path / "sweep"
    out.mkdir()
    sweep = load_sweep(SWEEP, TINY)
    study = open_study(sweep, f"sqlite:///{out / 'study.db'}")
    cut = study.ask()
    cut.suggest_categorical("objectives.0.weight", sweep.params[0].values)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    import socket

    cut.set_user_attr("host", socket.gethostname())
    cut.set_user_attr("pid", int(dead))  # the process that ran it is gone
    assert main(["sweep", "-c", SWEEP, "--out", str(out), "--trials", "1", *TINY]) == 0
    trials = optuna.load_study(study_name="iit-weight", storage=f"sqlite:///{out / 'study.db'}").get_trials()
    assert trials[0].state == optuna.trial.TrialState.FAIL
    again = [t for t in trials if t.user_attrs.get("rerun_of") == 0]
    assert (
        len(again) == 1 and again[0].params == trials[0].params and again[0].state == optuna.trial.TrialState.COMPLETE
    )
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) == 2  # the rerun and the one added


@pytest.mark.slow  # four trials: in make test-slow (CI runs both), to keep make test under its budget
def test_replicates_run_each_point_over_seeds_and_the_front_is_on_means(tmp_path):
    spec = yaml.safe_load(open(SWEEP))
    spec["base"] = str((tmp_path.cwd() / "configs" / "quickstart.yaml").resolve())
    spec["space"] = {"objectives.0.weight": {"grid": [0.0, 1.0]}}
    spec["replicates"] = 2
    spec["report"] = ["val/task_loss"]
    spec.pop("pruning")
    path = tmp_path / "replicated.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "sweep"
    assert main(["sweep", "-c", str(path), "--out", str(out), *TINY]) == 0
    trials = rows(out)
    assert sorted((r["point"], r["replicate"]) for r in trials) == [
        ("weight=0", "0"),
        ("weight=0", "1"),
        ("weight=1", "0"),
        ("weight=1", "1"),
    ]
    by_seed = {(r["point"], r["replicate"]): float(r["val/task_loss"]) for r in trials}
    assert by_seed[("weight=0", "0")] != by_seed[("weight=0", "1")]  # the seeds differ
    front = list(csv.DictReader(open(out / "pareto.csv")))
    assert front and all(r["n"] == "2" for r in front)
    for r in front:  # a point's figure is the mean over its seeds, inside its interval
        seeds = [float(t["audit/interchange/iia"]) for t in trials if t["point"] == r["point"]]
        mean = float(r["audit/interchange/iia"])
        assert mean == pytest.approx(sum(seeds) / 2)
        assert float(r["audit/interchange/iia low"]) <= mean <= float(r["audit/interchange/iia high"])
    md = (out / "pareto.md").read_text()
    assert "means over 2 seeds [95% bootstrap CI]" in md and "| weight=" in md
