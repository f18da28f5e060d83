"""``faithful-train sweep``: capability–transparency trade-offs as a multi-objective Optuna study.

A sweep file (``configs/sweeps/<name>.yaml``)::

    base: ../iit-das.yaml                 # the config every trial starts from (relative to this file)
    overrides: {trainer.max_steps: 1500}  # fixed for every trial
    space:                                # any config key -> a range
      objectives.0.weight: {log_float: [0.01, 10]}   # also float: [lo, hi], int: [lo, hi],
      model.bottleneck.mode: {choice: [hard, hybrid]}  # choice: [...], grid: [...]
      variant: {grid: {a: {key1: 1, key2: x}, b: {key1: 2, key2: y}}}   # keys set together
    figures:                              # what to optimise, in order
      val/task_acc: maximize
      audit/interchange/iia: maximize
    sampler: nsga2                        # nsga2 | tpe | grid (every value of every grid/choice)
    seed: 0
    report: [audit/interchange/iia/left]  # more figures for the tables, not optimised
    reference_point: {val/task_acc: 0.0, audit/interchange/iia: 0.0}   # for the hypervolume
    pruning: {margin: 0.05, min_step: 500}   # or omitted: no pruning
    replicates: 3                         # each point over seeds 0, 1, 2 (default 1: the base's seed)

Each trial is an ordinary run directory (``<sweep dir>/trials/<number>``): one point trained
with one seed, the base config's unless ``replicates`` asks for seeds ``0..N-1``, so a trial's
figures depend on its parameters and seed alone. With replicates the front is computed on each
point's means over its seeds, with 95% bootstrap intervals in ``pareto.md`` and as error bars
in ``pareto.png``; points are named by the values swept (``weight=0.3``).

The study lives in SQLite in the sweep directory (``--storage`` takes any database URL Optuna
accepts, e.g. ``postgresql://``, so workers on several machines share it: see ``study``);
``--workers N`` runs trials in N processes here, each with ``--threads`` torch threads (default
1, so results do not depend on the number of workers). A grid's trials are planned once and
each is handed to one worker; a worker that dies mid-trial has its trial run again (at once on
the same machine, after the heartbeat's grace period from another). After every trial the sweep
writes ``trials.csv``, the Pareto front as ``pareto.csv`` and ``pareto.md`` (with the
hypervolume against the reference point) and ``pareto.png``. A sweep stopped and started again
continues: finished trials stay, and a trial cut off mid-run is run again.

Pruning (``pruning: {margin: m, min_step: s}``): at each validation step from ``min_step`` on
where every figure has been measured, a trial's point (its mean with its sibling seeds at that
step) is compared with the front of the finished points' means *at the same step*; a point
that a front member matches or beats in every figure, and beats by more than ``m`` in one,
stops and is recorded as pruned, with its other seeds (``pareto.should_prune``). Optuna's
pruners handle one objective only.
"""

# The package, one job a file (each imports only from the ones above it):
# spec (the sweep file) <- study (the Optuna study and storage) <- trial (one trial and its pruner)
# <- report (tables and plots) <- workers (processes, slots, locks; ``run_sweep``).

from faithful_train.commands.sweep.report import format_front, write_results
from faithful_train.commands.sweep.spec import (
    KINDS,
    SAMPLERS,
    THRESHOLDS_FAILED,
    TRAIN_FIGURES,
    TRIAL_OVERRIDES,
    VAL_FIGURES,
    Param,
    Sweep,
    check,
    load_sweep,
    trial_config,
)
from faithful_train.commands.sweep.study import next_trial, open_study, recover
from faithful_train.commands.sweep.trial import SweepPruner, run_trial
from faithful_train.commands.sweep.workers import run_study, run_sweep

__all__ = [
    "KINDS",
    "SAMPLERS",
    "THRESHOLDS_FAILED",
    "TRAIN_FIGURES",
    "TRIAL_OVERRIDES",
    "VAL_FIGURES",
    "Param",
    "Sweep",
    "SweepPruner",
    "check",
    "format_front",
    "load_sweep",
    "next_trial",
    "open_study",
    "recover",
    "run_study",
    "run_sweep",
    "run_trial",
    "trial_config",
    "write_results",
]
