"""``faithful-train repro``: every config over seeds ``0..N-1``, as a distribution.

    faithful-train repro -c CONFIG [-c CONFIG2 ...] --seeds N [--workers W] [--out DIR] [--strict] [key=value ...]

It runs on the sweep machinery: an Optuna study whose grid is the configs, each point run over
``N`` seeds as replicates (``seed=k`` overrides the config's seed), resumable, with workers and
storage as in ``sweep`` (``--storage postgresql://...`` for several machines). It writes, in
the repro directory (default ``runs/repro/<config>+<config>``):

- ``repro.csv``: one row per config and seed, with every final figure and each pre-registered
  threshold's verdict;
- ``repro.md``: per config and figure the mean, sd, 95% bootstrap CI, min and max
  (``functional.stats``), and the pass rate of each threshold; given two configs (an objective
  and its baseline) the seed-matched difference per figure, with its CI, how many seeds the
  first won, and a two-sided sign-test p. Thresholds are applied to every config that logs the
  figure, so a baseline's pass rate of its objective's thresholds is reported too;
- ``repro.png``: a strip plot per figure (thresholded figures first), one colour per config,
  the threshold as a dashed line;
- ``summary.json``: the same numbers as data.

``--strict`` exits 1 when a config's own threshold passes in fewer than all its seeds.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

from faithful_train.audits.base import meets
from faithful_train.commands.sweep.report import cell, save_png, trial_rows, write_csv
from faithful_train.commands.sweep.spec import THRESHOLDS_FAILED, Param, Sweep, build_point, logged_figures
from faithful_train.commands.sweep.study import GRACE
from faithful_train.commands.sweep.workers import run_study
from faithful_train.errors import ConfigError
from faithful_train.functional.stats import paired, spread
from faithful_train.io.files import atomic_write_json, atomic_write_text

MAX_PANELS = 8


def machine() -> str:
    """The processor, its cores and torch's version and device, for the results page."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}"


def plan(configs: list[str], seeds: int, extra: list[str] | tuple[str, ...] = (), command: str = "") -> Sweep:
    """Check the configs and seeds (one-line errors, nothing written) and return the repro as a
    sweep: a grid over the configs, ``seeds`` replicates each."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"--seeds must be a whole number >= 1, got {seeds!r}")
    if not configs:
        raise ConfigError("repro needs at least one config (-c CONFIG)")
    paths: dict[str, Path] = {}
    for given in configs:
        path = Path(given)
        if not path.is_file():
            raise ConfigError(f"-c {given}: config not found")
        if path.resolve() in [p.resolve() for p in paths.values()]:
            raise ConfigError(f"-c {given}: given twice")
        label = path.stem if path.stem not in paths else f"{path.stem}-{len(paths)}"
        paths[label] = path.resolve()
    labels = list(paths)
    sweep = Sweep(
        path=Path(configs[0]),
        name="repro:" + "+".join(labels),
        base=paths[labels[0]],
        overrides=list(extra),
        params=[Param("config", "grid", labels)],
        figures=[THRESHOLDS_FAILED],
        directions=["minimize"],
        sampler="grid",
        replicates=seeds,
        configs=paths,
        command=command,
    )
    runs = {label: build_point(sweep, {"config": label}, f"-c {configs[i]}") for i, label in enumerate(labels)}
    if len(labels) == 2:
        _check_pair(configs, runs)
    return sweep


def _check_pair(configs: list[str], runs: dict[str, Any]) -> None:
    """Two configs are compared seed by seed: they must train the same task and share a figure
    beyond validation (an audit's)."""
    (a, run_a), (b, run_b) = runs.items()
    task_a, task_b = run_a.cfg.task.get("name"), run_b.cfg.task.get("name")
    if task_a != task_b:
        raise ConfigError(
            f"-c {configs[1]}: trains task {task_b!r} and -c {configs[0]} task {task_a!r}; "
            "a paired difference needs the same task"
        )
    audits_a = {f for f in logged_figures(run_a) if f.startswith("audit/")}
    audits_b = {f for f in logged_figures(run_b) if f.startswith("audit/")}
    if not audits_a & audits_b:
        there, here = (", ".join(sorted(f)[:4]) or "no audits" for f in (audits_a, audits_b))
        raise ConfigError(
            f"-c {configs[1]}: shares no audit figure with -c {configs[0]} ({there} there, {here} here); "
            "a paired difference needs the same figures"
        )


def run_repro(
    configs: list[str],
    seeds: int,
    out: str | Path | None = None,
    workers: int = 1,
    storage: str | None = None,
    threads: int = 1,
    extra: list[str] | tuple[str, ...] = (),
    grace: int = GRACE,
    command: str = "",
) -> dict[str, Any]:
    """Check, then run (or continue) ``configs`` over seeds ``0..seeds-1`` and write the report;
    returns ``summary.json``'s content. ``command`` is recorded for the results page."""
    sweep = plan(configs, seeds, extra, command)
    out = Path(out) if out is not None else Path("runs") / "repro" / "+".join(sweep.configs or {})
    return run_study(sweep, out, None, workers, storage, threads, write_repro, grace)


def _thresholds(rows: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Per config, the thresholds it pre-registered: ``{label: {figure: ">= 0.9"}}``."""
    declared: dict[str, dict[str, str]] = {}
    for r in rows:
        for name, verdict in (r["_trial"].user_attrs.get("thresholds") or {}).items():
            declared.setdefault(r["config"], {})[name] = verdict["threshold"]
    return declared


def write_repro(sweep: Sweep, study: Any, out: Path) -> dict[str, Any]:
    """``repro.csv``, ``repro.md``, ``repro.png`` and ``summary.json``."""
    labels = list(sweep.configs or {})
    rows = [r | {"config": r["_trial"].params.get("config"), "seed": r["replicate"]} for r in trial_rows(sweep, study)]
    rows.sort(key=lambda r: (labels.index(r["config"]) if r["config"] in labels else 0, r["seed"] or 0, r["trial"]))
    done = [r for r in rows if r["state"] == "complete"]
    for r in done:
        r |= r["_trial"].user_attrs.get("metrics") or {}
    declared = _thresholds(done)
    thresholds = {name: spec for own in declared.values() for name, spec in own.items()}
    figures = sorted({k for r in done for k in r["_trial"].user_attrs.get("metrics") or {}} - {THRESHOLDS_FAILED})
    figures = [*[f for f in thresholds if f in figures], *[f for f in figures if f not in thresholds]]
    verdict_columns = []
    for name, spec in thresholds.items():
        column = f"{name} {spec}"
        verdict_columns.append(column)
        for r in done:
            if r.get(name) is not None:
                r[column] = "pass" if meets(r[name], spec) else "fail"
    columns = ["config", "seed", "state", *figures, *verdict_columns, "seconds", "steps", "trial", "run_dir", "error"]
    atomic_write_text(out / "repro.csv", write_csv(rows, columns))

    by_config = {label: [r for r in done if r["config"] == label] for label in labels}
    summary: dict[str, Any] = {
        "seeds": sweep.replicates,
        "command": sweep.command,
        "updated": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "configs": {},
        "paired": None,
    }
    lines = [
        f"# repro: {', '.join(labels)} over {sweep.replicates} seeds",
        "",
        "Seeds 0.."
        + f"{sweep.replicates - 1} (`seed=k`); "
        + (f"overrides `{' '.join(sweep.overrides)}`; " if sweep.overrides else "")
        + "mean, sd (n − 1) and a 95% percentile-bootstrap CI of the mean over the seeds that finished.",
    ]
    for label in labels:
        group = by_config[label]
        failed = [r for r in rows if r["config"] == label and r["state"] == "fail" and r["rerun_as"] is None]
        entry: dict[str, Any] = {"config": str((sweep.configs or {})[label]), "finished": len(group), "figures": {}}
        lines += ["", f"## {label}", "", f"`{(sweep.configs or {})[label]}`: {len(group)} of {sweep.replicates} seeds"]
        if failed:
            lines[-1] += "; failed: " + "; ".join(f"seed {r['seed']}: {r['error']}" for r in failed)
        rates = []
        entry["thresholds"] = {}
        for name, spec in thresholds.items():
            values = [r[name] for r in group if r.get(name) is not None]
            if not values:
                continue
            passed = sum(meets(v, spec) for v in values)
            own = name in declared.get(label, {})
            entry["thresholds"][name] = {"threshold": spec, "passed": passed, "n": len(values), "own": own}
            owner = "" if own else f" (declared by {', '.join(k for k in declared if name in declared[k])})"
            rates.append(f"`{name} {spec}`{owner}: **{passed}/{len(values)}**")
        if rates:
            lines += ["", "Thresholds: " + "; ".join(rates) + "."]
        lines += ["", "| figure | mean | sd | 95% CI | min | max | n |", "|---|---|---|---|---|---|---|"]
        for name in figures:
            values = [r[name] for r in group if r.get(name) is not None]
            if not values:
                continue
            s = spread(values)
            entry["figures"][name] = s.__dict__
            bold = "**" if name in thresholds else ""
            lines.append(
                f"| {bold}{name}{bold} | {cell(s.mean)} | {cell(s.sd)} | [{cell(s.low)}, {cell(s.high)}] | "
                f"{cell(s.min)} | {cell(s.max)} | {s.n} |"
            )
        summary["configs"][label] = entry
    if len(labels) == 2:
        summary["paired"] = _paired(lines, labels, by_config, figures)
    atomic_write_text(out / "repro.md", "\n".join(lines) + "\n")
    _plot(labels, by_config, figures, thresholds, sweep.replicates, out / "repro.png")
    summary["strict_failures"] = [
        f"{label}: {name} {t['threshold']} passed in {t['passed']}/{sweep.replicates} seeds"
        for label, entry in summary["configs"].items()
        for name, t in entry["thresholds"].items()
        if t["own"] and t["passed"] < sweep.replicates
    ]
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "headline.md", "\n".join([*HEADLINE_HEAD, *headline(summary, labels, thresholds)]) + "\n")
    return summary


HEADLINE_HEAD = [
    "| configs | figure | mean [95% CI] | passes | baseline: mean [95% CI] | passes | difference [95% CI] "
    "| seeds, date |",
    "|---|---|---|---|---|---|---|---|",
]
TABLE_START, TABLE_END = "<!-- repro:start -->", "<!-- repro:end -->"


def update_table(path: str | Path, out: Path) -> None:
    """Put this repro's headline rows (``<out>/headline.md``) into the table between
    ``<!-- repro:start -->`` and ``<!-- repro:end -->`` in ``path`` (a README or results page):
    rows of the same configs are replaced, others kept, the header written if missing."""
    path = Path(path)
    text = path.read_text() if path.is_file() else ""
    if TABLE_START not in text or TABLE_END not in text:
        raise ConfigError(f"--table {path}: no {TABLE_START} ... {TABLE_END} region to write the table into")
    head, rest = text.split(TABLE_START, 1)
    region, tail = rest.split(TABLE_END, 1)
    mine = (out / "headline.md").read_text().splitlines()[len(HEADLINE_HEAD) :]
    keys = {row.split("|")[1] for row in mine}
    kept = [row for row in region.strip().splitlines() if row.startswith("| ") and not row.startswith("| configs |")]
    kept = [row for row in kept if row.split("|")[1] not in keys]
    table = "\n".join([*HEADLINE_HEAD, *kept, *mine])
    atomic_write_text(path, f"{head}{TABLE_START}\n{table}\n{TABLE_END}{tail}")


def headline(summary: dict[str, Any], labels: list[str], thresholds: dict[str, str]) -> list[str]:
    """Rows of the results table (``headline.md``): per thresholded figure and ``val/task_acc``,
    each config's mean [CI] and pass rate, and (two configs) the paired difference. The README's
    results table is these rows from several repro directories (``benchmarks/seed_table.py``)."""
    configs = [summary["configs"][label] for label in labels]
    names = [*thresholds, *(["val/task_acc"] if "val/task_acc" not in thresholds else [])]
    rows = []
    for name in names:
        cells = []
        for entry in (configs + [None])[:2]:
            figure = entry["figures"].get(name) if entry else None
            verdict = entry["thresholds"].get(name) if entry else None
            if figure is None:
                cells += ["—", "—"]
                continue
            cells.append(f"{figure['mean']:.3f} [{figure['low']:.3f}, {figure['high']:.3f}]")
            cells.append(f"{verdict['passed']}/{verdict['n']}" if verdict else "—")
        diff = (summary.get("paired") or {}).get(name)
        cells.append(f"{diff['mean']:+.3f} [{diff['low']:+.3f}, {diff['high']:+.3f}]" if diff else "—")
        spec = f" `{thresholds[name]}`" if name in thresholds else ""
        cells.append(f"{summary['seeds']}, {summary['updated'][:10]}")
        rows.append(f"| {' vs '.join(f'`{label}`' for label in labels)} | `{name}`{spec} | " + " | ".join(cells) + " |")
    return rows


def _paired(
    lines: list[str], labels: list[str], by_config: dict[str, list[dict[str, Any]]], figures: list[str]
) -> dict[str, Any]:
    a, b = labels
    seeds_a = {r["seed"]: r for r in by_config[a]}
    seeds_b = {r["seed"]: r for r in by_config[b]}
    common = sorted(set(seeds_a) & set(seeds_b))
    lines += [
        "",
        f"## Paired difference: {a} − {b}",
        "",
        f"Matched by seed ({len(common)} seeds both finished). `{a} higher`: seeds where the difference "
        "is positive; p: two-sided exact sign test (with 5 seeds the smallest possible p is 0.0625).",
        "",
        f"| figure | mean difference | 95% CI | {a} higher | sign test p | n |",
        "|---|---|---|---|---|---|",
    ]
    out: dict[str, Any] = {}
    for name in figures:
        pairs = [
            (seeds_a[s][name], seeds_b[s][name])
            for s in common
            if seeds_a[s].get(name) is not None and seeds_b[s].get(name) is not None
        ]
        if not pairs:
            continue
        result = paired([x for x, _ in pairs], [y for _, y in pairs])
        d = result.difference
        out[name] = {"mean": d.mean, "low": d.low, "high": d.high, "wins": result.wins, "losses": result.losses}
        out[name] |= {"p": result.p, "n": d.n}
        lines.append(
            f"| {name} | {cell(d.mean)} | [{cell(d.low)}, {cell(d.high)}] | {result.wins}/{d.n} | "
            f"{result.p:.3g} | {d.n} |"
        )
    return out


def _panels(figures: list[str], thresholds: dict[str, str]) -> list[str]:
    """The figures worth a panel: thresholded ones, validation accuracy, then audits' headline
    figures (``audit/<label>/<figure>``, not per-variable breakdowns)."""
    chosen = [f for f in thresholds if f in figures]
    chosen += [f for f in figures if f == "val/task_acc" and f not in chosen]
    chosen += [f for f in figures if f.startswith("audit/") and f.count("/") == 2 and f not in chosen]
    return chosen[:MAX_PANELS]


def _plot(
    labels: list[str],
    by_config: dict[str, list[dict[str, Any]]],
    figures: list[str],
    thresholds: dict[str, str],
    seeds: int,
    path: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = _panels(figures, thresholds) or figures[:1]
    cols = min(4, max(1, len(panels)))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols + 0.6, 2.6 * rows + 0.5), squeeze=False)
    colours = plt.get_cmap("tab10")
    jitter = np.random.default_rng(0)
    for ax, name in zip(axes.flat, panels):
        for i, label in enumerate(labels):
            values = [r[name] for r in by_config[label] if r.get(name) is not None]
            if not values:
                continue
            x = i + jitter.uniform(-0.12, 0.12, len(values))
            ax.scatter(x, values, s=18, color=colours(i % 10), alpha=0.8, label=label)
            s = spread(values)
            ax.errorbar(
                i + 0.3, s.mean, yerr=[[s.mean - s.low], [s.high - s.mean]], fmt="_", color=colours(i % 10), capsize=3
            )
        if name in thresholds:
            spec = thresholds[name]
            ax.axhline(float(spec.split()[-1]), ls="--", c="0.4", lw=0.8)
            ax.set_title(f"{name}\n{spec}", fontsize=7)
        else:
            ax.set_title(name, fontsize=7)
        ax.set_xticks(range(len(labels)), labels, fontsize=6, rotation=15)
        ax.tick_params(axis="y", labelsize=6)
        ax.set_xlim(-0.5, len(labels) - 0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"{' vs '.join(labels)}: {seeds} seeds (dots), mean and 95% CI (bars)", fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def format_repro(out: Path) -> str:
    return (out / "repro.md").read_text()
