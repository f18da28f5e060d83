"""Sweep files: parsing, checks against the base config (one-line errors, nothing written), the
storage, and the multi-objective pruner on a real Optuna study."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import yaml

from faithful_train.commands.cli import main
from faithful_train.commands.sweep import SweepPruner, check, load_sweep, open_study, trial_config
from faithful_train.errors import ConfigError

REPO = Path(__file__).resolve().parents[3]
SWEEP = {
    "base": str(REPO / "configs" / "quickstart.yaml"),
    "overrides": {"trainer.max_steps": 20},
    "space": {"objectives.0.weight": {"grid": [0.0, 1.0]}},
    "figures": {"val/task_acc": "maximize", "audit/interchange/iia": "maximize"},
    "sampler": "grid",
}


def write(tmp_path: Path, edit=None) -> Path:
    data = yaml.safe_load(yaml.safe_dump(SWEEP, sort_keys=False))
    if edit:
        edit(data)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_ranges_bundles_and_trial_configs(tmp_path):
    def edit(d):
        d["space"] = {
            "optim.lr": {"log_float": [1e-4, 1e-2]},
            "data.batch_size": {"int": [16, 64]},
            "variant": {
                "choice": {"a": {"objectives.0.weight": 0.5, "trainer.val_every": 5}, "b": {"objectives.0.weight": 2.0}}
            },
        }
        d["sampler"] = "nsga2"

    sweep = load_sweep(write(tmp_path, edit), ["trainer.val_every=10"])
    lr, batch, variant = sweep.params
    assert (lr.kind, lr.values, batch.values, variant.values) == ("log_float", [1e-4, 1e-2], [16, 64], ["a", "b"])
    cfg = trial_config(sweep, {"optim.lr": 1e-3, "data.batch_size": 32, "variant": "a"})
    assert (
        cfg.optim.lr,
        cfg.data.batch_size,
        cfg.objectives[0].weight,
        cfg.trainer.val_every,
        cfg.trainer.max_steps,
    ) == (1e-3, 32, 0.5, 5, 20)
    assert cfg.logger.wandb.mode == "disabled" and cfg.trainer.progress_bar is False
    check(sweep)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda d: d["space"].update({"objectives.0.wieght": {"grid": [1.0]}}),
            "space.objectives.0.wieght: objectives.0: unknown argument",
        ),
        (
            lambda d: d["space"].update({"trainer.max_stepz": {"grid": [1]}}),
            "space.trainer.max_stepz: unknown config key",
        ),
        (
            lambda d: d["figures"].update({"audit/interchange/accuracy": "maximize"}),
            "'audit/interchange/accuracy' is not logged by this config",
        ),
        (
            lambda d: d["figures"].update({"audit/concepts/leakage": "minimize"}),
            "'audit/concepts/leakage' is not logged",
        ),
        (
            lambda d: d["space"].update({"optim.lr": {"float": [0.01, 0.01]}}),
            "empty range: float [0.01, 0.01] needs low < high",
        ),
        (lambda d: d["space"].update({"optim.lr": {"choice": []}}), "empty range: choice needs a non-empty list"),
        (lambda d: d["space"].update({"optim.lr": {"normal": [0, 1]}}), "unknown range kind 'normal'"),
        (lambda d: d["figures"].update({"val/task_acc": "maximise"}), "'maximise' is not one of maximize, minimize"),
        (lambda d: d.update(sampler="random"), "unknown sampler 'random'"),
        (lambda d: d["space"].update({"optim.lr": {"float": [0.001, 0.01]}}), "the grid sampler needs finite values"),
    ],
)
def test_bad_sweeps_are_one_line_and_write_nothing(tmp_path, capsys, edit, message):
    out = tmp_path / "out"
    assert main(["sweep", "-c", str(write(tmp_path, edit)), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err and "Traceback" not in err, err
    assert not out.exists()


def test_a_storage_that_cannot_be_opened_is_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        main(
            [
                "sweep",
                "-c",
                str(write(tmp_path)),
                "--out",
                str(out),
                "--storage",
                f"sqlite:///{tmp_path}/no/such/dir/study.db",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--storage sqlite:///" in err and "cannot open it" in err, err
    assert not out.exists()
    with pytest.raises(ConfigError, match="--storage nosuchdb://x: cannot open it"):
        open_study(load_sweep(write(tmp_path)), "nosuchdb://x")


class FakeAudit:
    def __init__(self, step, iia):
        self.latest_step, self.latest = step, {"iia": iia}


def _trainer(step, acc):
    return SimpleNamespace(
        global_step=step,
        sanity_checking=False,
        max_steps=100,
        should_stop=False,
        callback_metrics={"val/task_acc": acc},
    )


def test_the_pruner_stops_a_trial_the_front_dominates_at_the_same_step(tmp_path):
    sweep = load_sweep(write(tmp_path, lambda d: d.update(pruning={"margin": 0.05, "min_step": 10})))
    study = optuna.create_study(directions=sweep.directions)
    dist = {"objectives.0.weight": optuna.distributions.CategoricalDistribution([0.0, 1.0])}
    study.add_trial(
        optuna.trial.create_trial(
            values=[1.0, 0.9],
            params={"objectives.0.weight": 1.0},
            distributions=dist,
            user_attrs={"figures_at": {"10": [0.9, 0.8], "20": [1.0, 0.9]}},
        )
    )
    close = SweepPruner(sweep, study, study.ask(), [SimpleNamespace(label="interchange", **vars(FakeAudit(10, 0.78)))])
    trainer = _trainer(10, 0.9)
    close.on_validation_end(trainer, None)
    assert not trainer.should_stop and close.history == {"10": [0.9, 0.78]}  # within the margin
    early = SweepPruner(sweep, study, study.ask(), [SimpleNamespace(label="interchange", **vars(FakeAudit(5, 0.1)))])
    trainer = _trainer(5, 0.1)
    early.on_validation_end(trainer, None)
    assert not trainer.should_stop  # before min_step
    far = SweepPruner(sweep, study, study.ask(), [SimpleNamespace(label="interchange", **vars(FakeAudit(10, 0.5)))])
    trainer = _trainer(10, 0.9)
    far.on_validation_end(trainer, None)
    assert trainer.should_stop and far.pruned_at == 10
    stale = SweepPruner(sweep, study, study.ask(), [SimpleNamespace(label="interchange", **vars(FakeAudit(0, 0.5)))])
    trainer = _trainer(10, 0.9)
    stale.on_validation_end(trainer, None)
    assert not trainer.should_stop and stale.history == {}  # the audit has not run at this step


def _finished(study, weight, at_10, replicate):
    dist = {"objectives.0.weight": optuna.distributions.CategoricalDistribution([0.0, 0.5, 1.0])}
    study.add_trial(
        optuna.trial.create_trial(
            values=at_10,
            params={"objectives.0.weight": weight},
            distributions=dist,
            user_attrs={"figures_at": {"10": at_10}, "replicate": replicate},
        )
    )


def _asked(study, weight):
    trial = study.ask()
    trial.suggest_categorical("objectives.0.weight", [0.0, 0.5, 1.0])
    return trial


def test_with_replicates_the_pruner_compares_means_over_seeds(tmp_path):
    def edit(d):
        d.update(pruning={"margin": 0.05, "min_step": 10}, replicates=2)
        d["space"] = {"objectives.0.weight": {"grid": [0.0, 0.5, 1.0]}}

    sweep = load_sweep(write(tmp_path, edit))
    study = optuna.create_study(directions=sweep.directions)
    _finished(study, 1.0, [0.9, 0.8], 0)  # weight 1: IIA 0.8 and 0.4 over its two seeds, mean 0.6
    _finished(study, 1.0, [0.9, 0.4], 1)
    study.enqueue_trial({"objectives.0.weight": 0.0})
    trial = _asked(study, 0.0)
    pruner = SweepPruner(sweep, study, trial, [SimpleNamespace(label="interchange", **vars(FakeAudit(10, 0.7)))])
    trainer = _trainer(10, 0.9)
    pruner.on_validation_end(trainer, None)
    # one seed at 0.7 is beaten by weight 1's first seed (0.8) by more than the margin, but not by its mean
    assert not trainer.should_stop
    study.enqueue_trial({"objectives.0.weight": 0.5})
    weak = _asked(study, 0.5)
    pruner = SweepPruner(sweep, study, weak, [SimpleNamespace(label="interchange", **vars(FakeAudit(10, 0.5)))])
    trainer = _trainer(10, 0.9)
    pruner.on_validation_end(trainer, None)
    assert trainer.should_stop and pruner.pruned_at == 10  # 0.5 against a mean of 0.6
    study.tell(weak, state=optuna.trial.TrialState.PRUNED)
    study.enqueue_trial({"objectives.0.weight": 0.5})
    sibling = _asked(study, 0.5)  # the same point's other seed stops with it, whatever its figures
    pruner = SweepPruner(sweep, study, sibling, [SimpleNamespace(label="interchange", **vars(FakeAudit(10, 0.99)))])
    trainer = _trainer(10, 0.99)
    pruner.on_validation_end(trainer, None)
    assert trainer.should_stop


def test_replicates_must_be_a_whole_number(tmp_path, capsys):
    for bad in (0, 1.5, "two", True):
        path = write(tmp_path, lambda d, bad=bad: d.update(replicates=bad))
        with pytest.raises(ConfigError, match="replicates: a whole number of seeds >= 1"):
            load_sweep(path)
    sweep = load_sweep(write(tmp_path, lambda d: d.update(replicates=3)))
    assert sweep.replicates == 3
    cfg = trial_config(sweep, {"objectives.0.weight": 1.0}, replicate=2)
    assert cfg.seed == 2 and cfg.objectives[0].weight == 1.0
    assert trial_config(load_sweep(write(tmp_path)), {"objectives.0.weight": 1.0}, replicate=None).seed == 0


PARENT = """
import multiprocessing as mp
import sys
import time

from faithful_train.commands.sweep.workers import _child


def ready_then_sleep(path):
    open(path, "w").close()
    time.sleep(120)


if __name__ == "__main__":
    worker = mp.get_context("spawn").Process(target=_child, args=(ready_then_sleep, sys.argv[1]))
    worker.start()
    print(worker.pid, flush=True)
    time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_process_dies_with_the_command_that_started_it(tmp_path):
    """Killing ``faithful-train sweep``/``repro`` must not leave its workers training."""
    import os
    import signal
    import subprocess
    import time

    script, ready = tmp_path / "parent.py", tmp_path / "ready"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script), str(ready)], stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ready.exists() and _alive(worker)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    survived = _alive(worker)
    if survived:  # leave nothing behind
        os.kill(worker, signal.SIGKILL)
    assert not survived
