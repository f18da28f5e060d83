"""One trial: ask the study, train the trial's run directory with the multi-objective pruner
(``SweepPruner``, a Lightning callback), tell the result."""

from __future__ import annotations

import math
import os
import socket
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback

from faithful_train.commands.sweep.spec import Sweep, trial_config
from faithful_train.commands.sweep.study import _tell
from faithful_train.errors import FaithfulError, first_line
from faithful_train.functional.pareto import orient, should_prune


class SweepPruner(Callback):
    """Records a trial's figures at each validation step where all are measured, and stops the
    trial when the front of the finished trials at that step dominates it by ``margin``."""

    def __init__(self, sweep: Sweep, study: Any, trial: Any, audits: list[Any]):
        self.sweep, self.study, self.trial, self.audits = sweep, study, trial, {a.label: a for a in audits}
        self.history: dict[str, list[float]] = {}
        self.pruned_at: int | None = None

    def figures_at(self, trainer: Any) -> list[float] | None:
        step = trainer.global_step
        values = []
        for name in self.sweep.figures:
            if name.startswith("audit/"):
                label, metric = name.split("/", 2)[1:]
                audit = self.audits[label]
                if audit.latest_step != step or metric not in audit.latest:
                    return None
                values.append(float(audit.latest[metric]))
            elif name in trainer.callback_metrics:
                values.append(float(trainer.callback_metrics[name]))
            else:
                return None
        return values

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or trainer.global_step == 0:
            return
        values = self.figures_at(trainer)
        if values is None or not all(math.isfinite(v) for v in values):
            return
        step = trainer.global_step
        self.history[str(step)] = values
        self.trial.set_user_attr("figures_at", self.history)
        if self.sweep.margin is None or step < self.sweep.min_step or step >= trainer.max_steps:
            return
        from optuna.trial import TrialState

        others = [
            t.user_attrs["figures_at"][str(step)]
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if str(step) in t.user_attrs.get("figures_at", {})
        ]
        if others and should_prune(
            orient([values], self.sweep.directions)[0], orient(others, self.sweep.directions), self.sweep.margin
        ):
            self.pruned_at = step
            trainer.should_stop = True


def run_trial(sweep: Sweep, study: Any, out: Path) -> None:
    """Ask the study for one trial, train it in its own run directory, tell the result."""
    from optuna.trial import TrialState

    from faithful_train.training import run as runs

    trial = study.ask()
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    params = {p.name: p.suggest(trial) for p in sweep.params}
    run_dir = out / "trials" / f"{trial.number:04d}"
    trial.set_user_attr("run_dir", str(run_dir))
    started = time.perf_counter()
    try:
        run = runs.build(trial_config(sweep, params), run_dir, sweep.base.parent)
        pruner = SweepPruner(sweep, study, trial, run.audits)
        summary = runs.fit(run, extra_callbacks=[pruner])
    except FaithfulError as e:
        trial.set_user_attr("error", first_line(e))
        _tell(study, trial, state=TrialState.FAIL)
        return
    trial.set_user_attr("seconds", round(time.perf_counter() - started, 2))
    trial.set_user_attr("report", {name: summary["metrics"].get(name) for name in sweep.report})
    trial.set_user_attr("steps", int(summary["step"]))
    if pruner.pruned_at is not None:
        trial.set_user_attr("pruned_at", pruner.pruned_at)
        _tell(study, trial, state=TrialState.PRUNED)
        return
    missing = [f for f in sweep.figures if f not in summary["metrics"] or not math.isfinite(summary["metrics"][f])]
    if missing:
        trial.set_user_attr("error", f"figure {missing[0]!r} was not measured (or is not finite)")
        _tell(study, trial, state=TrialState.FAIL)
        return
    _tell(study, trial, [float(summary["metrics"][f]) for f in sweep.figures])
