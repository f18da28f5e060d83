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

Each trial is an ordinary run directory (``<sweep dir>/trials/<number>``) trained with the
base config's seed, so a trial's figures depend on its parameters alone. The study lives in
SQLite in the sweep directory (``--storage`` takes any database URL Optuna accepts, so workers
on several machines share it); ``--workers N`` runs trials in N processes here, each with
``--threads`` torch threads (default 1, so results do not depend on the number of workers).
After every trial the sweep writes ``trials.csv``, the Pareto front as ``pareto.csv`` and
``pareto.md`` (with the hypervolume against the reference point) and ``pareto.png``. A sweep
stopped and started again continues: finished trials stay, and a trial cut off mid-run is run
again.

Pruning (``pruning: {margin: m, min_step: s}``): at each validation step from ``min_step`` on
where every figure has been measured, a trial's figures are compared with the front of the
finished trials' figures *at the same step*; a trial that a front member matches or beats in
every figure, and beats by more than ``m`` in one, stops and is recorded as pruned
(``pareto.should_prune``). Optuna's pruners handle one objective only.
"""

from __future__ import annotations

import csv
import io
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from lightning.pytorch import Callback

from faithful_train.errors import ConfigError, FaithfulError, first_line
from faithful_train.pareto import DIRECTIONS, front_mask, hypervolume, orient, should_prune
from faithful_train.rundir import atomic_write_json, atomic_write_text

KINDS = ("float", "log_float", "int", "choice", "grid")
SAMPLERS = ("nsga2", "tpe", "grid")
VAL_FIGURES = ("val/task_acc", "val/task_loss", "val/logit_diff", "val/ppl", "val/kl_to_start", "val/tool_selection_acc")
TRAIN_FIGURES = ("train/task_loss", "train/task_acc", "train/loss")
TRIAL_OVERRIDES = ["trainer.progress_bar=false", "logger.wandb.mode=disabled"]


@dataclass
class Param:
    """One dimension of the space: a config key and its range, or (``bundles``) a name whose
    values are labels of several keys set together (``{grid: {hard: {model.bottleneck.mode:
    hard, objectives.0.leakage: 0.0}, ...}}``), for settings that only make sense jointly."""

    name: str
    kind: str
    values: list[Any]  # [low, high] for ranges, the values (or bundle labels) for choice and grid
    bundles: dict[str, dict[str, Any]] | None = None

    def overrides(self, value: Any) -> list[str]:
        if self.bundles is None:
            return [_override(self.name, value)]
        return [_override(k, v) for k, v in self.bundles[value].items()]

    def suggest(self, trial: Any) -> Any:
        if self.kind == "float":
            return trial.suggest_float(self.name, self.values[0], self.values[1])
        if self.kind == "log_float":
            return trial.suggest_float(self.name, self.values[0], self.values[1], log=True)
        if self.kind == "int":
            return trial.suggest_int(self.name, self.values[0], self.values[1])
        return trial.suggest_categorical(self.name, self.values)

    def first(self) -> Any:
        return self.values[0]


@dataclass
class Sweep:
    path: Path
    name: str
    base: Path
    overrides: list[str]
    params: list[Param]
    figures: list[str]
    directions: list[str]
    sampler: str = "nsga2"
    seed: int = 0
    reference: list[float] | None = None
    margin: float | None = None
    min_step: int = 0
    report: list[str] = field(default_factory=list)

    def grid(self) -> dict[str, list[Any]]:
        return {p.name: list(p.values) for p in self.params}

    def grid_size(self) -> int:
        return math.prod(len(p.values) for p in self.params)


def _override(key: str, value: Any) -> str:
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def _param(name: str, spec: Any, where: str) -> Param:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where}: a range is one of {{{', '.join(k + ': ...' for k in KINDS)}}}, got {spec!r}")
    kind, values = next(iter(spec.items()))
    if kind not in KINDS:
        raise ConfigError(f"{where}: unknown range kind {kind!r}; valid: {', '.join(KINDS)}")
    if kind in ("choice", "grid"):
        if isinstance(values, dict) and values:
            for label, bundle in values.items():
                if not isinstance(bundle, dict) or not bundle:
                    raise ConfigError(f"{where}.{label}: a bundle is a non-empty mapping of config key -> value, got {bundle!r}")
            return Param(name, kind, [str(label) for label in values], {str(k): dict(v) for k, v in values.items()})
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: empty range: {kind} needs a non-empty list of values (or a mapping of bundles), got {values!r}")
        return Param(name, kind, values)
    if not isinstance(values, list) or len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{where}: {kind} needs [low, high], got {values!r}")
    low, high = values
    if not low < high:
        raise ConfigError(f"{where}: empty range: {kind} [{low}, {high}] needs low < high")
    if kind == "log_float" and low <= 0:
        raise ConfigError(f"{where}: log_float needs low > 0, got {low}")
    if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
        raise ConfigError(f"{where}: int needs whole bounds, got {values!r}")
    return Param(name, kind, [int(low), int(high)] if kind == "int" else [float(low), float(high)])


def load_sweep(path: str | Path, extra: list[str] | tuple[str, ...] = ()) -> Sweep:
    """Read and check a sweep file (names checked against the base config later, ``check``);
    ``extra`` overrides (``key=value``) apply to every trial after the file's."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"sweep {path}: not YAML: {first_line(e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"sweep {path}: a mapping of base, space, figures, ... expected")
    known = {"base", "overrides", "space", "figures", "sampler", "seed", "reference_point", "pruning", "report"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"sweep {path}: unknown key {unknown[0]!r}; valid: {', '.join(sorted(known))}")
    for key in ("base", "space", "figures"):
        if not raw.get(key):
            raise ConfigError(f"sweep {path}: {key!r} is missing or empty")
    base = (path.parent / str(raw["base"])).resolve()
    if not base.is_file():
        raise ConfigError(f"sweep {path} base: config not found: {base}")
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"sweep {path} overrides: a mapping of config key -> value, got {overrides!r}")
    if not isinstance(raw["space"], dict):
        raise ConfigError(f"sweep {path} space: a mapping of config key -> range, got {raw['space']!r}")
    params = [_param(str(k), v, f"sweep {path} space.{k}") for k, v in raw["space"].items()]
    figures = raw["figures"]
    if not isinstance(figures, dict):
        raise ConfigError(f"sweep {path} figures: a mapping of figure -> maximize|minimize, got {figures!r}")
    for name, direction in figures.items():
        if direction not in DIRECTIONS:
            raise ConfigError(f"sweep {path} figures.{name}: {direction!r} is not one of {', '.join(DIRECTIONS)}")
    sampler = str(raw.get("sampler", "nsga2"))
    if sampler not in SAMPLERS:
        raise ConfigError(f"sweep {path} sampler: unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
    if sampler == "grid":
        ranged = [p.name for p in params if p.kind not in ("choice", "grid")]
        if ranged:
            raise ConfigError(f"sweep {path} space.{ranged[0]}: the grid sampler needs finite values (choice or grid), not a range")
    reference = raw.get("reference_point")
    if reference is not None:
        if not isinstance(reference, dict) or set(reference) != set(figures):
            raise ConfigError(f"sweep {path} reference_point: one value per figure ({', '.join(figures)}), got {reference!r}")
        reference = [float(reference[name]) for name in figures]
    report = raw.get("report") or []
    if not isinstance(report, list) or not all(isinstance(r, str) for r in report):
        raise ConfigError(f"sweep {path} report: a list of figure names, got {report!r}")
    pruning = raw.get("pruning")
    margin, min_step = None, 0
    if pruning:
        if not isinstance(pruning, dict) or set(pruning) - {"margin", "min_step"}:
            raise ConfigError(f"sweep {path} pruning: {{margin: <number>, min_step: <step>}} expected, got {pruning!r}")
        margin, min_step = float(pruning.get("margin", 0.0)), int(pruning.get("min_step", 0))
        if margin < 0 or min_step < 0:
            raise ConfigError(f"sweep {path} pruning: margin and min_step must be >= 0, got {margin} and {min_step}")
    return Sweep(
        path=path, name=path.stem, base=base, overrides=[*(_override(k, v) for k, v in overrides.items()), *extra], params=params,
        figures=[str(f) for f in figures], directions=[str(d) for d in figures.values()], sampler=sampler,
        seed=int(raw.get("seed", 0)), reference=reference, margin=margin, min_step=min_step, report=list(report),
    )  # fmt: skip


def trial_config(sweep: Sweep, params: dict[str, Any]) -> Any:
    from faithful_train.config import load_config

    by_name = {p.name: p for p in sweep.params}
    chosen = [item for name, value in params.items() for item in by_name[name].overrides(value)]
    return load_config(sweep.base, [*TRIAL_OVERRIDES, *sweep.overrides, *chosen])


def check(sweep: Sweep) -> None:
    """Every space key and figure names something the base config has, before anything is
    written: a run is assembled with each key alone (so an error names the key), then with
    every first value."""
    from faithful_train import run as runs

    run = None
    for p in sweep.params:  # each key alone: an error names it
        for value in p.values if p.bundles is not None else [p.first()]:
            where = f"space.{p.name}" + (f".{value}" if p.bundles is not None else "")
            try:
                built = runs.build(trial_config(sweep, {p.name: value}), Path(os.devnull) / "check", sweep.base.parent)
            except FaithfulError as e:
                raise ConfigError(f"sweep {sweep.path} {where}: {e}") from None
            run = run or built
    first = {p.name: p.first() for p in sweep.params}
    try:
        run = runs.build(trial_config(sweep, first), Path(os.devnull) / "check", sweep.base.parent) if len(sweep.params) > 1 else run
    except FaithfulError as e:
        raise ConfigError(f"sweep {sweep.path} space (first values {first}): {e}") from None
    logged = set(VAL_FIGURES) | set(TRAIN_FIGURES) | {f"train/objective/{o.label}" for o in run.objectives}
    logged |= {f"audit/{a.label}/{m}" for a in run.audits for m in a.metric_names(run.task)}
    for name in [*sweep.figures, *sweep.report]:
        if name not in logged:
            audits = sorted(m for m in logged if m.startswith("audit/"))
            hint = f"; the audits log: {', '.join(audits[:12])}{' ...' if len(audits) > 12 else ''}" if audits else "; the base config has no audits"
            where = "figures" if name in sweep.figures else "report"
            raise ConfigError(f"sweep {sweep.path} {where}: {name!r} is not logged by this config{hint}")


# -- the study -----------------------------------------------------------------------------------


def open_study(sweep: Sweep, storage: str) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if sweep.sampler == "grid":
        sampler = optuna.samplers.GridSampler(sweep.grid(), seed=sweep.seed)
    elif sweep.sampler == "tpe":
        sampler = optuna.samplers.TPESampler(seed=sweep.seed)
    else:
        sampler = optuna.samplers.NSGAIISampler(seed=sweep.seed)
    try:
        engine = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else {}
        store = optuna.storages.RDBStorage(storage, engine_kwargs=engine)
        return optuna.create_study(study_name=sweep.name, storage=store, directions=sweep.directions, sampler=sampler, load_if_exists=True)
    except Exception as e:  # a driver that is not installed, a server that does not answer, a bad URL
        raise ConfigError(f"--storage {storage}: cannot open it: {first_line(e)}") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(study: Any) -> int:
    """Trials left running by a sweep that was stopped (their process on this host is gone) are
    marked failed and their parameters queued to run again; returns how many."""
    from optuna.trial import TrialState

    host = socket.gethostname()
    again = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("host") == host and not _alive(int(t.user_attrs.get("pid", -1))):
            _tell(study, t.number, state=TrialState.FAIL)
            study.enqueue_trial(t.params, user_attrs={"rerun_of": t.number})
            again += 1
    return again


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
        if others and should_prune(orient([values], self.sweep.directions)[0], orient(others, self.sweep.directions), self.sweep.margin):
            self.pruned_at = step
            trainer.should_stop = True


def _tell(study: Any, trial: Any, values: list[float] | None = None, state: Any = None) -> None:
    """``study.tell``; the grid sampler calls ``study.stop()`` once its grid is used up, which
    raises outside ``study.optimize`` after the result is stored: that is not an error here."""
    try:
        study.tell(trial, values, state=state)
    except RuntimeError as e:
        if "Study.stop" not in str(e):
            raise


def run_trial(sweep: Sweep, study: Any, out: Path) -> None:
    """Ask the study for one trial, train it in its own run directory, tell the result."""
    from optuna.trial import TrialState

    from faithful_train import run as runs

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


# -- results -------------------------------------------------------------------------------------


def _rows(sweep: Sweep, study: Any) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        row: dict[str, Any] = {"trial": t.number, "state": t.state.name.lower()}
        row |= {p.name: t.params.get(p.name) for p in sweep.params}
        values = t.values if t.values is not None else [None] * len(sweep.figures)
        if t.values is None and t.user_attrs.get("figures_at"):  # pruned: the last figures it reached
            last = max(t.user_attrs["figures_at"], key=int)
            values = t.user_attrs["figures_at"][last]
        row |= dict(zip(sweep.figures, values))
        row |= {name: (t.user_attrs.get("report") or {}).get(name) for name in sweep.report}
        row |= {k: t.user_attrs.get(k) for k in ("steps", "pruned_at", "seconds", "run_dir", "error")}
        rows.append(row)
    return rows


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    return buffer.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-3 and value != 0 else f"{value:.3f}"
    return str(value)


def write_results(sweep: Sweep, study: Any, out: Path) -> dict[str, Any]:
    """``trials.csv``, ``pareto.csv``, ``pareto.md``, ``pareto.png`` and ``summary.json``."""
    rows = _rows(sweep, study)
    columns = ["trial", "state", *(p.name for p in sweep.params), *sweep.figures, *sweep.report, "steps", "pruned_at", "seconds", "run_dir", "error"]
    atomic_write_text(out / "trials.csv", _csv(rows, columns))
    done = [r for r in rows if r["state"] == "complete"]
    points = orient([[r[f] for f in sweep.figures] for r in done], sweep.directions) if done else np.zeros((0, len(sweep.figures)))
    on_front = front_mask(points) if done else np.zeros(0, dtype=bool)
    best_first = orient([[r[sweep.figures[0]]] for r in done], sweep.directions[:1])[:, 0] if done else []
    front = [r for _, r in sorted(((-v, r["trial"]), r) for v, r, keep in zip(best_first, done, on_front) if keep)]
    atomic_write_text(out / "pareto.csv", _csv(front, columns))
    reference = sweep.reference
    if reference is None and done:  # the nadir of the finished trials
        reference = list(orient([points.min(0)], sweep.directions)[0])
    volume = hypervolume(points[on_front], orient([reference], sweep.directions)[0]) if done else 0.0
    states = {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "fail", "running")}
    steps = sum(int(r["steps"] or 0) for r in rows)
    head = [p.name for p in sweep.params] + [f"{f} ({d[:3]})" for f, d in zip(sweep.figures, sweep.directions)] + sweep.report
    table = ["| trial | " + " | ".join(head) + " | steps | seconds |", "|" + "---|" * (len(head) + 3)]
    for r in front:
        keys = ["trial", *(p.name for p in sweep.params), *sweep.figures, *sweep.report, "steps", "seconds"]
        table.append("| " + " | ".join(_cell(r[k]) for k in keys) + " |")
    lines = [
        f"# Pareto front of {sweep.name}",
        "",
        f"{len(front)} of {states['complete']} finished trials on the front; {states['pruned']} pruned, {states['fail']} failed; "
        f"{steps} training steps in all.",
        "",
        *table,
        "",
        f"Hypervolume {volume:.6g} against the reference point "
        + ", ".join(f"{f} = {_cell(v)}" for f, v in zip(sweep.figures, reference or [])) + ("" if sweep.reference else " (the finished trials' nadir)"),
    ]  # fmt: skip
    atomic_write_text(out / "pareto.md", "\n".join(lines) + "\n")
    _plot(sweep, rows, front, out / "pareto.png")
    summary = {"trials": len(rows), **states, "front": [r["trial"] for r in front], "hypervolume": volume, "reference_point": reference, "steps": steps}
    atomic_write_json(out / "summary.json", summary)
    return summary


def _plot(sweep: Sweep, rows: list[dict[str, Any]], front: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_name, y_name = (sweep.figures + ["trial"])[:2] if len(sweep.figures) == 1 else sweep.figures[:2]
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for state, style in (("complete", dict(c="0.45", marker="o")), ("pruned", dict(c="0.7", marker="x"))):
        chosen = [r for r in rows if r["state"] == state and r.get(x_name) is not None and r.get(y_name) is not None]
        if chosen:
            ax.scatter([r[x_name] for r in chosen], [r[y_name] for r in chosen], s=28, label=f"{state} ({len(chosen)})", **style)
    if front:
        ordered = sorted(front, key=lambda r: r[x_name])
        ax.plot([r[x_name] for r in ordered], [r[y_name] for r in ordered], "-o", c="tab:red", ms=6, label="Pareto front")
        for r in front:
            ax.annotate(str(r["trial"]), (r[x_name], r[y_name]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(x_name)
    ax.set_ylabel(y_name)
    ax.set_title(f"{sweep.name}: {len(rows)} trials")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(f".{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# -- workers -------------------------------------------------------------------------------------


def _worker(sweep_path: str, extra: list[str], pruning: bool, out: str, storage: str, slots: Any, threads: int, lock_path: str) -> None:
    """One process: claim a slot, run a trial, write the results; until no slot is left."""
    import fcntl

    import torch

    from faithful_train import run as runs

    torch.set_num_threads(threads)
    runs.quiet_lightning()
    sweep = load_sweep(sweep_path, extra)
    if not pruning:
        sweep.margin = None
    study = open_study(sweep, storage)
    while True:
        with slots.get_lock():
            if slots.value <= 0:
                return
            slots.value -= 1
        run_trial(sweep, study, Path(out))
        with open(lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            write_results(sweep, study, Path(out))


def run_sweep(sweep_path: str | Path, out: str | Path | None = None, trials: int | None = None, workers: int = 1,
              storage: str | None = None, threads: int = 1, extra: list[str] | tuple[str, ...] = (), pruning: bool = True) -> dict[str, Any]:  # fmt: skip
    """Check the sweep, open (or continue) its study, add ``trials`` trials with ``workers``
    processes, and write the results. Returns the sweep's summary."""
    import multiprocessing as mp

    from optuna.trial import TrialState

    extra = list(extra)
    sweep = load_sweep(sweep_path, extra)
    if workers < 1 or threads < 1:
        raise ConfigError(f"--workers and --threads must be >= 1, got {workers} and {threads}")
    if trials is not None and trials < 0:
        raise ConfigError(f"--trials must be >= 0, got {trials}")
    out = Path(out) if out is not None else Path("runs") / "sweeps" / sweep.name
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: a file, not a directory")
    check(sweep)
    if storage is None:
        out.mkdir(parents=True, exist_ok=True)
        storage = f"sqlite:///{(out / 'study.db').resolve()}"
    study = open_study(sweep, storage)
    out.mkdir(parents=True, exist_ok=True)
    rerun = recover(study)
    if trials is None:
        trials = sweep.grid_size() if sweep.sampler == "grid" else 8
    if sweep.sampler == "grid":  # a grid point runs once
        taken = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)))
        trials = min(trials, max(0, sweep.grid_size() - taken))
    trials += rerun
    ctx = mp.get_context("spawn")
    slots = ctx.Value("i", trials)
    lock = str(out / ".results.lock")
    if workers == 1 or trials <= 1:
        _worker(str(sweep.path), extra, pruning, str(out), storage, slots, threads, lock)
    else:
        procs = [ctx.Process(target=_worker, args=(str(sweep.path), extra, pruning, str(out), storage, slots, threads, lock)) for _ in range(min(workers, trials))]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        failed = [p.exitcode for p in procs if p.exitcode]
        if failed:
            raise FaithfulError(f"{len(failed)} sweep worker(s) stopped with exit status {failed[0]}; see the trials in {out / 'trials.csv'}")
    return write_results(sweep, study, out)


def format_front(out: Path) -> str:
    return (out / "pareto.md").read_text()
