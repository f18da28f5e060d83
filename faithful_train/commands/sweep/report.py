"""The sweep's results: ``trials.csv`` (one row per trial: a point and a seed), the Pareto front
as ``pareto.csv``, ``pareto.md`` and ``pareto.png``, and ``summary.json``.

With ``replicates: N`` a point's figures are its means over the N seeds, with a 95% bootstrap
interval (``functional.stats``); the front is computed on the means of the points whose every
seed finished, and ``pareto.png`` draws the intervals as error bars. Points are named by the
values swept (``weight=0.3``)."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from faithful_train.commands.sweep.spec import Sweep
from faithful_train.commands.sweep.trial import point_key
from faithful_train.functional.pareto import front_mask, hypervolume, orient
from faithful_train.functional.stats import spread
from faithful_train.io.files import atomic_write_json, atomic_write_text


def trial_rows(sweep: Sweep, study: Any) -> list[dict[str, Any]]:
    """One row per trial that ran (waiting ones left out); a failed trial that was run again
    says so (``rerun_as``)."""
    from optuna.trial import TrialState

    trials = [t for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING]
    rerun_as = {t.user_attrs["rerun_of"]: t.number for t in trials if "rerun_of" in t.user_attrs}
    rows = []
    for t in trials:
        row: dict[str, Any] = {"trial": t.number, "state": t.state.name.lower()}
        row |= {p.name: t.params.get(p.name) for p in sweep.params}
        row["point"] = sweep.label({p.name: t.params.get(p.name) for p in sweep.params})
        row["replicate"] = t.user_attrs.get("replicate")
        values = t.values if t.values is not None else [None] * len(sweep.figures)
        if t.values is None and t.user_attrs.get("figures_at"):  # pruned: the last figures it reached
            last = max(t.user_attrs["figures_at"], key=int)
            values = t.user_attrs["figures_at"][last]
        row |= dict(zip(sweep.figures, values))
        row |= {name: (t.user_attrs.get("report") or {}).get(name) for name in sweep.report}
        row |= {k: t.user_attrs.get(k) for k in ("steps", "pruned_at", "seconds", "run_dir", "error")}
        row["rerun_as"] = rerun_as.get(t.number)
        row["key"] = point_key(t.params)
        row["_trial"] = t
        rows.append(row)
    return rows


def write_csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    return buffer.getvalue()


def cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-3 and value != 0 else f"{value:.3f}"
    return str(value)


def _points(sweep: Sweep, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per point whose every replicate finished: the means of its figures, with the
    interval of each (``<figure> low`` / ``<figure> high``) and the trials it averages."""
    done: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["state"] == "complete":
            done.setdefault(r["key"], []).append(r)
    points = []
    for group in done.values():
        if len(group) < sweep.replicates:
            continue
        point = {k: group[0][k] for k in ("point", "key", *(p.name for p in sweep.params))}
        point["trial"] = min(r["trial"] for r in group)
        point["trials"] = " ".join(str(r["trial"]) for r in sorted(group, key=lambda r: r["trial"]))
        point["n"] = len(group)
        point["steps"] = sum(int(r["steps"] or 0) for r in group)
        point["seconds"] = round(sum(float(r["seconds"] or 0) for r in group), 2)
        for name in [*sweep.figures, *sweep.report]:
            values = [r[name] for r in group if r.get(name) is not None]
            if values:
                s = spread(values)
                point[name], point[f"{name} low"], point[f"{name} high"] = s.mean, s.low, s.high
            else:
                point[name] = None
        points.append(point)
    return points


def write_results(sweep: Sweep, study: Any, out: Path) -> dict[str, Any]:
    """``trials.csv``, ``pareto.csv``, ``pareto.md``, ``pareto.png`` and ``summary.json``."""
    rows = trial_rows(sweep, study)
    replicated = sweep.replicates > 1
    columns = [
        "trial",
        "state",
        "point",
        *(["replicate"] if replicated else []),
        *(p.name for p in sweep.params),
        *sweep.figures,
        *sweep.report,
        "steps",
        "pruned_at",
        "seconds",
        "run_dir",
        "rerun_as",
        "error",
    ]
    atomic_write_text(out / "trials.csv", write_csv(rows, columns))
    done = _points(sweep, rows)
    points = (
        orient([[r[f] for f in sweep.figures] for r in done], sweep.directions)
        if done
        else np.zeros((0, len(sweep.figures)))
    )
    on_front = front_mask(points) if done else np.zeros(0, dtype=bool)
    best_first = points[:, 0] if done else []
    front = [r for _, r in sorted(((-v, r["trial"]), r) for v, r, keep in zip(best_first, done, on_front) if keep)]
    intervals = [f"{f} {end}" for f in [*sweep.figures, *sweep.report] for end in ("low", "high")]
    point_columns = ["point", *(p.name for p in sweep.params), *sweep.figures, *sweep.report]
    point_columns += [*(intervals if replicated else []), "n", "trials", "steps", "seconds"]
    atomic_write_text(out / "pareto.csv", write_csv(front, point_columns))
    reference = sweep.reference
    if reference is None and done:  # the nadir of the finished points
        reference = list(orient([points.min(0)], sweep.directions)[0])
    volume = hypervolume(points[on_front], orient([reference], sweep.directions)[0]) if done else 0.0
    states = {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "fail", "running")}
    rerun = sum(r["rerun_as"] is not None for r in rows)
    steps = sum(int(r["steps"] or 0) for r in rows)
    head = [f"{f} ({d[:3]})" for f, d in zip(sweep.figures, sweep.directions)] + sweep.report
    table = ["| point | " + " | ".join(head) + " | trials | steps | seconds |", "|" + "---|" * (len(head) + 4)]
    for r in front:
        figures = [_mean_ci(r, name, replicated) for name in [*sweep.figures, *sweep.report]]
        table.append(f"| {r['point']} | " + " | ".join(figures) + f" | {r['trials']} | {r['steps']} | {r['seconds']} |")
    over = f", means over {sweep.replicates} seeds [95% bootstrap CI]" if replicated else ""
    lines = [
        f"# Pareto front of {sweep.name}",
        "",
        f"{len(front)} of {len(done)} finished points on the front{over}; "
        f"{states['complete']} trials finished, {states['pruned']} pruned, {states['fail']} failed"
        + (f" ({rerun} of them run again)" if rerun else "")
        + f"; {steps} training steps in all.",
        "",
        *table,
        "",
        f"Hypervolume {volume:.6g} against the reference point "
        + ", ".join(f"{f} = {cell(v)}" for f, v in zip(sweep.figures, reference or []))
        + ("" if sweep.reference else " (the finished points' nadir)"),
    ]
    atomic_write_text(out / "pareto.md", "\n".join(lines) + "\n")
    _plot(sweep, rows, done, front, out / "pareto.png")
    summary = {
        "trials": len(rows),
        **states,
        "rerun": rerun,
        "points": len(done),
        "front": [r["point"] for r in front],
        "front_trials": [r["trials"] for r in front],
        "hypervolume": volume,
        "reference_point": reference,
        "steps": steps,
    }
    atomic_write_json(out / "summary.json", summary)
    return summary


def _mean_ci(row: dict[str, Any], name: str, replicated: bool) -> str:
    if not replicated or row.get(f"{name} low") is None:
        return cell(row.get(name))
    return f"{cell(row[name])} [{cell(row[f'{name} low'])}, {cell(row[f'{name} high'])}]"


def _plot(
    sweep: Sweep, rows: list[dict[str, Any]], done: list[dict[str, Any]], front: list[dict[str, Any]], path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_name, y_name = (sweep.figures + ["trial"])[:2] if len(sweep.figures) == 1 else sweep.figures[:2]
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    pruned = [r for r in rows if r["state"] == "pruned" and r.get(x_name) is not None and r.get(y_name) is not None]
    if pruned:
        ax.scatter([r[x_name] for r in pruned], [r[y_name] for r in pruned], s=20, c="0.7", marker="x")
        ax.scatter([], [], c="0.7", marker="x", label=f"pruned ({len(pruned)} trials)")
    if sweep.replicates > 1:
        seeds = [r for r in rows if r["state"] == "complete" and r.get(x_name) is not None]
        ax.scatter([r[x_name] for r in seeds], [r[y_name] for r in seeds], s=8, c="0.8", label="one seed")
    for r in done:
        err = {}
        if sweep.replicates > 1 and f"{x_name} low" in r:
            err["xerr"] = [[r[x_name] - r[f"{x_name} low"]], [r[f"{x_name} high"] - r[x_name]]]
        if sweep.replicates > 1 and f"{y_name} low" in r:
            err["yerr"] = [[r[y_name] - r[f"{y_name} low"]], [r[f"{y_name} high"] - r[y_name]]]
        ax.errorbar(r[x_name], r[y_name], fmt="o", c="0.45", ms=5, capsize=2, lw=0.8, **err)
    if done:
        ax.scatter([], [], c="0.45", label=f"finished ({len(done)} points)")
    if front:
        ordered = sorted(front, key=lambda r: r[x_name])
        ax.plot(
            [r[x_name] for r in ordered], [r[y_name] for r in ordered], "-o", c="tab:red", ms=6, label="Pareto front"
        )
    for r in done:
        ax.annotate(r["point"], (r[x_name], r[y_name]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(x_name + (" (mean, 95% CI)" if sweep.replicates > 1 else ""))
    ax.set_ylabel(y_name + (" (mean, 95% CI)" if sweep.replicates > 1 else ""))
    seeds = f" × {sweep.replicates} seeds" if sweep.replicates > 1 else ""
    ax.set_title(f"{sweep.name}: {len(done)} points{seeds}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def save_png(fig: Any, path: Path) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def format_front(out: Path) -> str:
    return (out / "pareto.md").read_text()
