"""The sweep file: its ranges (``Param``), its parsed form (``Sweep``, ``load_sweep``), the config
of one trial (``trial_config``) and the check of every key and figure against the base config."""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from faithful_train.errors import ConfigError, FaithfulError, first_line
from faithful_train.functional.pareto import DIRECTIONS

KINDS = ("float", "log_float", "int", "choice", "grid")
SAMPLERS = ("nsga2", "tpe", "grid")
VAL_FIGURES = (
    "val/task_acc",
    "val/task_loss",
    "val/logit_diff",
    "val/ppl",
    "val/kl_to_start",
    "val/tool_selection_acc",
)
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
    replicates: int = 1  # each point trained with seeds 0..replicates-1 (the config's own seed when 1)
    configs: dict[str, Path] | None = None  # repro: label -> config; the ``config`` param picks the base
    command: str = ""  # the command line that started it, for the results page

    def grid(self) -> dict[str, list[Any]]:
        return {p.name: list(p.values) for p in self.params}

    def grid_size(self) -> int:
        return math.prod(len(p.values) for p in self.params)

    def points(self) -> list[dict[str, Any]]:
        """Every point of a grid, in the file's order (the last key varies fastest)."""
        return [dict(zip(self.grid(), values)) for values in itertools.product(*self.grid().values())]

    def base_of(self, params: dict[str, Any]) -> Path:
        return self.configs[params["config"]] if self.configs else self.base

    def label(self, params: dict[str, Any]) -> str:
        """A point named by the values swept, e.g. ``weight=0.3`` (a key's last part when that is
        unambiguous, else the whole key)."""
        short = {p.name: p.name.rsplit(".", 1)[-1] for p in self.params}
        if len(set(short.values())) < len(short):
            short = {p.name: p.name for p in self.params}
        return ", ".join(f"{short[name]}={_value(value)}" for name, value in params.items() if name in short)


def _value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


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
                    raise ConfigError(
                        f"{where}.{label}: a bundle is a non-empty mapping of config key -> value, got {bundle!r}"
                    )
            return Param(name, kind, [str(label) for label in values], {str(k): dict(v) for k, v in values.items()})
        if not isinstance(values, list) or not values:
            raise ConfigError(
                f"{where}: empty range: {kind} needs a non-empty list of values (or a mapping of bundles), "
                f"got {values!r}"
            )
        return Param(name, kind, values)
    if (
        not isinstance(values, list)
        or len(values) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    ):
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
    known = {
        "base",
        "overrides",
        "space",
        "figures",
        "sampler",
        "seed",
        "reference_point",
        "pruning",
        "report",
        "replicates",
    }
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
            raise ConfigError(
                f"sweep {path} space.{ranged[0]}: the grid sampler needs finite values (choice or grid), not a range"
            )
    reference = raw.get("reference_point")
    if reference is not None:
        if not isinstance(reference, dict) or set(reference) != set(figures):
            raise ConfigError(
                f"sweep {path} reference_point: one value per figure ({', '.join(figures)}), got {reference!r}"
            )
        reference = [float(reference[name]) for name in figures]
    report = raw.get("report") or []
    if not isinstance(report, list) or not all(isinstance(r, str) for r in report):
        raise ConfigError(f"sweep {path} report: a list of figure names, got {report!r}")
    replicates = raw.get("replicates", 1)
    if isinstance(replicates, bool) or not isinstance(replicates, int) or replicates < 1:
        raise ConfigError(f"sweep {path} replicates: a whole number of seeds >= 1, got {replicates!r}")
    if "seed" in {p.name for p in params} and replicates > 1:
        raise ConfigError(f"sweep {path} space.seed: with replicates the seeds are 0..{replicates - 1}; drop one")
    pruning = raw.get("pruning")
    margin, min_step = None, 0
    if pruning:
        if not isinstance(pruning, dict) or set(pruning) - {"margin", "min_step"}:
            raise ConfigError(f"sweep {path} pruning: {{margin: <number>, min_step: <step>}} expected, got {pruning!r}")
        margin, min_step = float(pruning.get("margin", 0.0)), int(pruning.get("min_step", 0))
        if margin < 0 or min_step < 0:
            raise ConfigError(f"sweep {path} pruning: margin and min_step must be >= 0, got {margin} and {min_step}")
    return Sweep(
        path=path,
        name=path.stem,
        base=base,
        overrides=[*(_override(k, v) for k, v in overrides.items()), *extra],
        params=params,
        figures=[str(f) for f in figures],
        directions=[str(d) for d in figures.values()],
        sampler=sampler,
        seed=int(raw.get("seed", 0)),
        reference=reference,
        margin=margin,
        min_step=min_step,
        report=list(report),
        replicates=replicates,
    )


def trial_config(sweep: Sweep, params: dict[str, Any], replicate: int | None = None) -> Any:
    """The config of one trial: the base (a repro's: the chosen config), the sweep's overrides,
    the point's values, and ``seed=<replicate>`` when the point runs over seeds."""
    from faithful_train.training.config import load_config

    by_name = {p.name: p for p in sweep.params}
    chosen = [
        item
        for name, value in params.items()
        if not (sweep.configs and name == "config")
        for item in by_name[name].overrides(value)
    ]
    seed = [f"seed={replicate}"] if replicate is not None and (sweep.replicates > 1 or sweep.configs) else []
    return load_config(sweep.base_of(params), [*TRIAL_OVERRIDES, *sweep.overrides, *chosen, *seed])


def fingerprints(sweep: Sweep) -> dict[str, str]:
    """Per base config (a repro's configs), a hash of the config as the trials compose it (file,
    presets and the sweep's overrides; not the points' values or seeds): a study continued with
    a config that has changed since would mix two recipes, and is refused."""
    import hashlib

    from omegaconf import OmegaConf

    from faithful_train.training.config import load_config

    bases = sweep.configs or {sweep.name: sweep.base}
    return {
        label: hashlib.sha256(
            OmegaConf.to_yaml(load_config(path, [*TRIAL_OVERRIDES, *sweep.overrides])).encode()
        ).hexdigest()[:16]
        for label, path in bases.items()
    }


THRESHOLDS_FAILED = "thresholds_failed"  # how many pre-registered thresholds a run failed (a figure too)


def build_point(sweep: Sweep, params: dict[str, Any], where: str) -> Any:
    """The run of one point, assembled (nothing written) to check it; an error names ``where``."""
    from faithful_train.training import run as runs

    try:
        return runs.build(trial_config(sweep, params), Path(os.devnull) / "check", sweep.base_of(params).parent)
    except FaithfulError as e:
        raise ConfigError(f"{where}: {e}") from None


def logged_figures(run: Any) -> set[str]:
    """Every figure name a run's final summary can hold: validation, training, objective terms,
    audits' figures, and ``thresholds_failed``."""
    logged = set(VAL_FIGURES) | set(TRAIN_FIGURES) | {f"train/objective/{o.label}" for o in run.objectives}
    logged |= {f"audit/{a.label}/{m}" for a in run.audits for m in a.metric_names(run.task)}
    return logged | {THRESHOLDS_FAILED}


def check(sweep: Sweep) -> None:
    """Every space key and figure names something the base config has, before anything is
    written: a run is assembled with each key alone (so an error names the key), then with
    every first value."""
    run = None
    for p in sweep.params:  # each key alone: an error names it
        for value in p.values if p.bundles is not None or sweep.configs else [p.first()]:
            where = f"space.{p.name}" + (f".{value}" if p.bundles is not None else "")
            built = build_point(sweep, {p.name: value}, f"sweep {sweep.path} {where}")
            run = run or built
    first = {p.name: p.first() for p in sweep.params}
    if len(sweep.params) > 1:
        run = build_point(sweep, first, f"sweep {sweep.path} space (first values {first})")
    logged = logged_figures(run)
    for name in [*sweep.figures, *sweep.report]:
        if name not in logged:
            audits = sorted(m for m in logged if m.startswith("audit/"))
            hint = (
                f"; the audits log: {', '.join(audits[:12])}{' ...' if len(audits) > 12 else ''}"
                if audits
                else "; the base config has no audits"
            )
            where = "figures" if name in sweep.figures else "report"
            raise ConfigError(f"sweep {sweep.path} {where}: {name!r} is not logged by this config{hint}")
