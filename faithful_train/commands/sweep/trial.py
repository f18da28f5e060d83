"""One trial: take it from the study, train its run directory with the multi-objective pruner
(``SweepPruner``, a Lightning callback), tell the result.

A trial is one point of the space trained with one seed (its ``replicate``). Points with
replicates are compared by their means over seeds: the pruner averages a trial's figures with
those its sibling replicates reached at the same step, and the points it compares with are
averaged the same way.
"""

from __future__ import annotations

import math
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch import Callback

from faithful_train.commands.sweep.spec import THRESHOLDS_FAILED, Sweep, trial_config
from faithful_train.commands.sweep.study import Heartbeat, _tell
from faithful_train.errors import FaithfulError, first_line
from faithful_train.functional.pareto import orient, should_prune


def point_key(params: dict[str, Any]) -> str:
    return repr(sorted((k, repr(v)) for k, v in params.items()))


def _at(trials: list[Any], step: str) -> dict[str, list[list[float]]]:
    """Per point, its trials' figures at ``step`` (those that reached it)."""
    grouped: dict[str, list[list[float]]] = {}
    for t in trials:
        values = t.user_attrs.get("figures_at", {}).get(step)
        if values is not None:
            grouped.setdefault(point_key(t.params), []).append(values)
    return grouped


class SweepPruner(Callback):
    """Records a trial's figures at each validation step where all are measured, and stops the
    trial when the front of the finished points at that step dominates its point by ``margin``
    (means over replicates on both sides), or when a sibling replicate was pruned."""

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

        mine = point_key(self.trial.params)
        trials = self.study.get_trials(deepcopy=False)
        siblings = [t for t in trials if t.number != self.trial.number and point_key(t.params) == mine]
        if any(t.state == TrialState.PRUNED for t in siblings):
            self.pruned_at = step
            trainer.should_stop = True
            return
        own = _at([t for t in siblings if t.state != TrialState.FAIL], str(step)).get(mine, [])
        own_mean = np.mean([values, *own], axis=0)
        finished = _at([t for t in trials if t.state == TrialState.COMPLETE], str(step))
        others = [np.mean(v, axis=0) for key, v in finished.items() if key != mine]
        if others and should_prune(
            orient([own_mean], self.sweep.directions)[0], orient(others, self.sweep.directions), self.sweep.margin
        ):
            self.pruned_at = step
            trainer.should_stop = True


def _ask(sweep: Sweep, study: Any, trial: Any) -> tuple[dict[str, Any], int | None]:
    """The trial's point and replicate; a new point proposed by the sampler (replicate 0) queues
    its other replicates, so that workers run them next."""
    params = {p.name: p.suggest(trial) for p in sweep.params}
    replicate = trial.user_attrs.get("replicate")
    if replicate is None and (sweep.replicates > 1 or sweep.configs):
        replicate = 0
        trial.set_user_attr("replicate", 0)
        for k in range(1, sweep.replicates):
            study.enqueue_trial(params, user_attrs={"replicate": k})
    return params, replicate


def run_trial(sweep: Sweep, study: Any, out: Path, trial: Any) -> None:
    """Train ``trial`` (from ``study.next_trial``) in its own run directory and tell the result.
    Every final figure and threshold verdict is kept on the trial (``metrics``, ``thresholds``)."""
    from optuna.trial import TrialState

    from faithful_train.training import run as runs

    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    with Heartbeat(study, trial):
        params, replicate = _ask(sweep, study, trial)
        run_dir = out / "trials" / f"{trial.number:04d}"
        trial.set_user_attr("run_dir", str(run_dir))
        mine = point_key(params)
        pruned = [
            t
            for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
            if point_key(t.params) == mine and t.number != trial.number
        ]
        if pruned:  # its point was pruned in another seed: nothing to learn from this one
            trial.set_user_attr("pruned_at", pruned[0].user_attrs.get("pruned_at"))
            _tell(study, trial, state=TrialState.PRUNED)
            return
        started = time.perf_counter()
        try:
            run = runs.build(trial_config(sweep, params, replicate), run_dir, sweep.base_of(params).parent)
            pruner = SweepPruner(sweep, study, trial, run.audits)
            summary = runs.fit(run, extra_callbacks=[pruner])
        except FaithfulError as e:
            trial.set_user_attr("error", first_line(e))
            _tell(study, trial, state=TrialState.FAIL)
            return
        metrics = dict(summary["metrics"])
        metrics[THRESHOLDS_FAILED] = float(sum(not v["pass"] for v in summary["thresholds"].values()))
        trial.set_user_attr("seconds", round(time.perf_counter() - started, 2))
        trial.set_user_attr("report", {name: metrics.get(name) for name in sweep.report})
        trial.set_user_attr("metrics", {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        trial.set_user_attr("thresholds", summary["thresholds"])
        trial.set_user_attr("steps", int(summary["step"]))
        if pruner.pruned_at is not None:
            trial.set_user_attr("pruned_at", pruner.pruned_at)
            _tell(study, trial, state=TrialState.PRUNED)
            return
        missing = [f for f in sweep.figures if f not in metrics or not math.isfinite(metrics[f])]
        if missing:
            trial.set_user_attr("error", f"figure {missing[0]!r} was not measured (or is not finite)")
            _tell(study, trial, state=TrialState.FAIL)
            return
        _tell(study, trial, [float(metrics[f]) for f in sweep.figures])
