"""The sweep's results: ``trials.csv``, the Pareto front as ``pareto.csv``, ``pareto.md`` and
``pareto.png``, and ``summary.json``."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from faithful_train.commands.sweep.spec import Sweep
from faithful_train.functional.pareto import front_mask, hypervolume, orient
from faithful_train.io.files import atomic_write_json, atomic_write_text


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
    columns = [
        "trial",
        "state",
        *(p.name for p in sweep.params),
        *sweep.figures,
        *sweep.report,
        "steps",
        "pruned_at",
        "seconds",
        "run_dir",
        "error",
    ]
    atomic_write_text(out / "trials.csv", _csv(rows, columns))
    done = [r for r in rows if r["state"] == "complete"]
    points = (
        orient([[r[f] for f in sweep.figures] for r in done], sweep.directions)
        if done
        else np.zeros((0, len(sweep.figures)))
    )
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
    head = (
        [p.name for p in sweep.params]
        + [f"{f} ({d[:3]})" for f, d in zip(sweep.figures, sweep.directions)]
        + sweep.report
    )
    table = ["| trial | " + " | ".join(head) + " | steps | seconds |", "|" + "---|" * (len(head) + 3)]
    for r in front:
        keys = ["trial", *(p.name for p in sweep.params), *sweep.figures, *sweep.report, "steps", "seconds"]
        table.append("| " + " | ".join(_cell(r[k]) for k in keys) + " |")
    lines = [
        f"# Pareto front of {sweep.name}",
        "",
        f"{len(front)} of {states['complete']} finished trials on the front; "
        f"{states['pruned']} pruned, {states['fail']} failed; "
        f"{steps} training steps in all.",
        "",
        *table,
        "",
        f"Hypervolume {volume:.6g} against the reference point "
        + ", ".join(f"{f} = {_cell(v)}" for f, v in zip(sweep.figures, reference or []))
        + ("" if sweep.reference else " (the finished trials' nadir)"),
    ]
    atomic_write_text(out / "pareto.md", "\n".join(lines) + "\n")
    _plot(sweep, rows, front, out / "pareto.png")
    summary = {
        "trials": len(rows),
        **states,
        "front": [r["trial"] for r in front],
        "hypervolume": volume,
        "reference_point": reference,
        "steps": steps,
    }
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
            ax.scatter(
                [r[x_name] for r in chosen],
                [r[y_name] for r in chosen],
                s=28,
                label=f"{state} ({len(chosen)})",
                **style,
            )
    if front:
        ordered = sorted(front, key=lambda r: r[x_name])
        ax.plot(
            [r[x_name] for r in ordered], [r[y_name] for r in ordered], "-o", c="tab:red", ms=6, label="Pareto front"
        )
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


def format_front(out: Path) -> str:
    return (out / "pareto.md").read_text()
