"""The ``patching`` audit: a layer × position map of where the model carries the difference
between clean inputs and corrupted ones, exact and by attribution patching, with the estimate
checked against the exact figures and circuits built from it.

Corrupted inputs are the sources of the task's interchange pairs (``task.interchange_pairs``)
for ``corrupt`` (default: every variable of its causal model): an in-batch resample for the
generated tasks, a file's counterfactual rows for text tasks. They are drawn once over the
audit set (seeded), so every run of the audit sees the same pairs. With ``changed_only`` (the
default) only the pairs whose answers differ count (elsewhere there is nothing to restore).
The metric scores the clean answer (``circuits.answer_metric``); see ``faithful_train.functional.patching``
for the cells, the directions, the normalised score and AtP.

Figures (normalised scores, ``patching.normalised_score``, of the metric averaged over the set;
an *effect* is the score when denoising and ``1 - score`` when noising, so high always means
the cell matters):

- ``clean``, ``corrupted``: the metric on the clean and the corrupted inputs (a small gap makes
  every score noise).
- ``max/<component>/layer<i>``: the largest effect over that layer's cells (positions, heads);
  exact when ``exact``, else AtP's. ``log_cells: true`` adds ``cell/<component>/layer<i>/pos<p>[/head<h>]``.
- ``atp/spearman`` (with ``atp`` and ``verify_top: k``): Spearman between AtP's and the exact
  effects of AtP's top-``k`` cells (by ``|effect|``), re-run exactly (one engine call per block;
  taken from the exact sweep when there is one); ``atp/missed``: the share of the exact top-``k``
  that AtP's top-``k`` misses, over all cells when the audit runs the exact sweep, else within
  the verified cells at ``ceil(k/2)`` (the top-``k`` of the verified cells are AtP's by
  construction). ``atp/spearman_all`` (with ``exact``): Spearman over every cell.
- ``circuit/cpr``, ``circuit/cmd`` (with ``atp`` and ``circuit``): MIB's CPR and CMD (Mueller et
  al. 2025; ``patching.cpr_cmd``) of circuits of the nodes (heads and MLPs) with the largest
  ``|AtP effect|``, summed over every position, on the clean inputs, the rest ablated
  (``ablation``; means over the chunk's clean examples).

Beside the figures, each run writes ``<run dir>/<label>/step<N>.csv`` (every cell: component,
layer, position, head, exact and AtP score) and a heatmap ``step<N>.png`` (and a wandb image
and table).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from faithful_train.audits.base import Audit, Total
from faithful_train.errors import ConfigError
from faithful_train.functional.circuits import ABLATIONS, METRICS, check_choice, components, curve_sizes
from faithful_train.functional.interchange import check_positions
from faithful_train.functional.patching import (
    COMPONENTS,
    DIRECTIONS,
    Cell,
    activation_patching,
    answer_metric_fn,
    attribution_patching,
    check_components,
    circuit_knockouts,
    circuit_metric,
    corrupted_sources,
    cpr_cmd,
    missed_share,
    node_effects,
    normalised_score,
    parse_positions,
    patching_cells,
    position_label,
    rank_agreement,
    top_cells,
)
from faithful_train.intervene.sites import validate_sites
from faithful_train.io.files import atomic_write_png, atomic_write_text
from faithful_train.modeling.interface import n_layers
from faithful_train.tasks.base import Batch, Task
from faithful_train.tasks.batch import prefixed, unprefixed

CORRUPT = "corrupt"
COLUMNS = ["component", "layer", "position", "head", "exact", "atp"]


class PatchingAudit(Audit):
    name = "patching"

    def __init__(
        self,
        components: Sequence[str] = COMPONENTS,
        positions: Sequence[Any] | None = None,
        metric: str = "logit_diff",
        direction: str = "denoising",
        corrupt: Sequence[str] | str | None = None,
        changed_only: bool = True,
        atp: bool = True,
        exact: bool = True,
        verify_top: int | None = 10,
        circuit: bool = True,
        ablation: str = "mean",
        log_cells: bool = False,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        owner = f"audit {self.label!r}"
        self.components = check_components(components)
        self.positions = None if positions is None else parse_positions(positions, owner)
        self.metric = check_choice("patching metric", metric, METRICS)
        self.direction = check_choice("patching direction", direction, DIRECTIONS)
        self.corrupt = None if corrupt is None else ((corrupt,) if isinstance(corrupt, str) else tuple(corrupt))
        if not (atp or exact):
            raise ConfigError(f"{owner}: atp and exact are both false: nothing to measure")
        if atp and metric == "acc":
            raise ConfigError(
                f"{owner}: metric 'acc' has no gradient for atp; use logit_diff, prob or kl, or atp: false"
            )
        if atp and metric == "kl" and direction == "noising":
            raise ConfigError(
                f"{owner}: atp with metric 'kl' under noising estimates 0 everywhere "
                "(KL's gradient at the clean run is 0); use denoising, another metric, or atp: false"
            )
        if verify_top is not None and (
            isinstance(verify_top, bool) or not isinstance(verify_top, int) or verify_top < 1
        ):
            raise ConfigError(f"{owner}: verify_top must be an int >= 1 (or null), got {verify_top!r}")
        self.ablation = check_choice("ablation", ablation, ABLATIONS)
        self.changed_only, self.atp, self.exact, self.circuit = (
            bool(changed_only),
            bool(atp),
            bool(exact),
            bool(circuit) and bool(atp),
        )
        self.verify_top, self.log_cells = verify_top if atp else None, bool(log_cells)
        self.cells: list[Cell] = []
        self.atp_cells: list[Cell] = []
        self.universe: list = []
        self.layers, self.verify_k, self.variables = 0, 0, ()
        self._phase = "maps"
        self._state: dict[str, Any] = {}
        self.table: list[dict[str, Any]] = []

    # -- set-up ---------------------------------------------------------------------------------

    def bind(self, model: nn.Module, task: Task, run_seed: int = 0) -> None:
        owner = f"audit {self.label!r}"
        positions = self.positions if self.positions is not None else tuple(range(task.seq_len))
        self.cells = patching_cells(model, self.components, positions)
        for cell in self.cells:
            check_positions(cell.ref, task)
        validate_sites(model, {cell.site for cell in self.cells})
        variables = task.variables if self.corrupt is None else self.corrupt
        if not variables:
            raise ConfigError(
                f"{owner}: task {task.name!r} has no causal variables whose interchange pairs give corrupted inputs"
            )
        task.check_variables(variables)
        self.variables = tuple(variables)
        self.layers = n_layers(model)
        self.atp_cells = list(self.cells) if self.atp else []
        self.universe = components(model, "heads") if self.circuit else []
        if self.circuit:  # the universe's nodes at every position, for their AtP scores
            known = set(self.atp_cells)
            extra = patching_cells(model, ["heads", "mlp.out"], range(task.seq_len))
            self.atp_cells += [cell for cell in extra if cell not in known]
        self.verify_k = min(self.verify_top, len(self.cells)) if self.verify_top else 0
        super().bind(model, task, run_seed)

    def metric_names(self, task: Task) -> list[str]:
        names = ["clean", "corrupted"]
        names += [f"max/{c}/layer{i}" for c in self.components for i in range(self.layers)]
        if self.log_cells:
            names += [f"cell/{cell.name}" for cell in self.cells]
        if self.verify_k:
            names += ["atp/spearman", "atp/missed"]
        if self.atp and self.exact:
            names.append("atp/spearman_all")
        if self.circuit:
            names += ["circuit/cpr", "circuit/cmd"]
        return names

    def build_data(self, task: Task, seed: int) -> Batch:
        data = task.sample(self.n_examples, seed)
        return data | prefixed(corrupted_sources(task, data, self.variables, seed, f"audit {self.label!r}"), CORRUPT)

    # -- measuring ------------------------------------------------------------------------------

    def evaluate(self, model: nn.Module, task: Task, rank: int = 0, world_size: int = 1) -> dict[str, float]:
        """The maps (exact and AtP), then, from AtP's ranking over the whole set, the verified
        cells and the circuit curve: two passes over the set."""
        self._phase, self._state, self.table = "maps", {}, []
        try:
            results = super().evaluate(model, task, rank, world_size)
            if (self.verify_k and not self.exact) or self.circuit:
                self._phase = "follow-up"
                results |= super().evaluate(model, task, rank, world_size)
        finally:
            self._phase = "maps"
        return dict(sorted(results.items()))

    def measure(self, model: nn.Module, task: Task, batch: Batch) -> dict[str, Any]:
        corrupted = unprefixed(batch, CORRUPT)
        clean = {k: v for k, v in batch.items() if not k.startswith(CORRUPT + "/")}
        metric_fn = answer_metric_fn(self.metric, clean["labels"], task.answer_tokens)
        weights = torch.ones_like(clean["labels"], dtype=torch.float64)
        if self.changed_only and "labels" in corrupted:
            weights = (corrupted["labels"] != clean["labels"]).double()

        def total(values: Tensor) -> Total:  # weighted sums over the chunk's examples
            return Total((values.double() * weights).sum(-1))

        out: dict[str, Any] = {"count": Total(weights.sum())}
        if self._phase == "maps":
            results = {}
            if self.exact:
                results["exact"] = activation_patching(model, clean, corrupted, self.cells, metric_fn, self.direction)
            if self.atp:
                results["atp"] = attribution_patching(
                    model, clean, corrupted, self.atp_cells, metric_fn, self.direction
                )
            some = next(iter(results.values()))
            out |= {"sum/clean": total(some.clean), "sum/corrupted": total(some.corrupted)}
            out |= {f"sum/{kind}": total(result.values) for kind, result in results.items()}
            return out
        if self.verify_k and not self.exact:
            verify = [self.cells[i] for i in self._state["verify"]]
            out["sum/verify"] = total(
                activation_patching(model, clean, corrupted, verify, metric_fn, self.direction).values
            )
        if self.circuit:
            values = circuit_metric(model, clean, self._state["knockouts"], self.ablation, metric_fn)
            out |= {
                "circuit/count": Total(torch.tensor(float(values.shape[1]), dtype=torch.float64)),
                "sum/circuit": Total(values.double().sum(-1)),
            }
        return out

    def summarise(self, totals: dict[str, Tensor], task: Task) -> dict[str, float]:
        return self._summarise_maps(totals) if self._phase == "maps" else self._summarise_follow_up(totals)

    def _summarise_maps(self, totals: dict[str, Tensor]) -> dict[str, float]:
        self._state["counted"] = float(totals["count"])
        n = totals["count"].clamp_min(1e-12)
        clean, corrupted = float(totals["sum/clean"] / n), float(totals["sum/corrupted"] / n)
        base = corrupted if self.direction == "denoising" else clean
        K = len(self.cells)
        means = {kind: totals[f"sum/{kind}"] / n for kind in ("exact", "atp") if f"sum/{kind}" in totals}
        scores = {kind: normalised_score(m[:K], clean, corrupted) for kind, m in means.items()}
        effects = {kind: m - base for kind, m in means.items()}  # metric units, every cell AtP ran
        self._state |= {"clean": clean, "corrupted": corrupted, "base": base, "effects": effects}
        out = {"clean": clean, "corrupted": corrupted}
        shown = scores["exact" if self.exact else "atp"]
        effect = shown if self.direction == "denoising" else 1 - shown
        for component in self.components:
            for layer in range(self.layers):
                values = [
                    float(effect[i]) for i, c in enumerate(self.cells) if c.component == component and c.layer == layer
                ]
                finite = [v for v in values if math.isfinite(v)]
                out[f"max/{component}/layer{layer}"] = max(finite) if finite else float("nan")
        if self.log_cells:
            out |= {f"cell/{cell.name}": float(shown[i]) for i, cell in enumerate(self.cells)}
        if self.atp:
            atp = effects["atp"][:K]
            self._state["verify"] = top_cells(atp, self.verify_k) if self.verify_k else []
            if self.exact:
                exact = effects["exact"]
                out["atp/spearman_all"] = rank_agreement(exact, atp)
                if self.verify_k:
                    chosen = self._state["verify"]
                    out["atp/spearman"] = rank_agreement(exact[chosen], atp[chosen])
                    out["atp/missed"] = missed_share(exact, atp, self.verify_k)
            if self.circuit:
                scores_by_node = node_effects(self.atp_cells, effects["atp"], self.universe).abs()
                self._state["sizes"] = curve_sizes(len(self.universe))
                self._state["knockouts"] = circuit_knockouts(
                    self.universe, scores_by_node.tolist(), self._state["sizes"]
                )
        self.table = [
            {
                "component": cell.component,
                "layer": cell.layer,
                "position": position_label(cell.position),
                "head": cell.head,
                **{kind: float(scores[kind][i]) if kind in scores else None for kind in ("exact", "atp")},
            }
            for i, cell in enumerate(self.cells)
        ]
        return out

    def _summarise_follow_up(self, totals: dict[str, Tensor]) -> dict[str, float]:
        out = {}
        if "sum/verify" in totals:
            chosen = self._state["verify"]
            exact = totals["sum/verify"] / totals["count"].clamp_min(1e-12) - self._state["base"]
            atp = self._state["effects"]["atp"][chosen]
            out["atp/spearman"] = rank_agreement(exact, atp)
            out["atp/missed"] = missed_share(exact, atp, math.ceil(len(chosen) / 2))
        if "sum/circuit" in totals:
            means = (totals["sum/circuit"] / totals["circuit/count"].clamp_min(1)).tolist()
            out["circuit/cpr"], out["circuit/cmd"] = cpr_cmd(self._state["sizes"], len(self.universe), means)
        return out

    def warnings(self) -> list[str]:
        if self.latest_step < 0 or self._state.get("counted", 1) > 0:
            return []
        return [
            f"audit/{self.label}: no pair of the audit set changes the answer (changed_only): its figures are empty"
        ]

    # -- artifacts ------------------------------------------------------------------------------

    def write_artifacts(self, model: nn.Module, task: Task, run_dir: Path, step: int, loggers: list[Any]) -> None:
        """Every cell of the latest run as a CSV table and a heatmap PNG (and a wandb image and table)."""
        if not self.table:
            return
        folder = run_dir / self.label
        rows = [[row[c] for c in COLUMNS] for row in self.table]
        text = ",".join(COLUMNS) + "\n" + "".join(",".join(_cell_text(v) for v in row) + "\n" for row in rows)
        atomic_write_text(folder / f"step{step:06d}.csv", text)
        path = folder / f"step{step:06d}.png"
        plot_patching_map(self.table, self.components, path, f"step {step}: {self.direction}, {self.metric}")
        for logger in loggers:
            if hasattr(logger, "log_image"):  # WandbLogger
                logger.log_image(key=f"audit/{self.label}/map", images=[str(path)], step=step)
            if hasattr(logger, "log_table"):
                logger.log_table(key=f"audit/{self.label}/cells", columns=COLUMNS, data=rows, step=step)


def _cell_text(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _row_label(row: dict[str, Any]) -> str:
    return f"L{row['layer']}" + ("" if row["head"] is None else f"H{row['head']}")


def plot_patching_map(table: list[dict[str, Any]], component_names: Sequence[str], path: Path, title: str) -> None:
    """Scores as layer (× head) by position heatmaps, one panel per component and method (exact,
    AtP), diverging around 0; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    kinds = [k for k in ("exact", "atp") if any(row[k] is not None for row in table)]
    shown = list(dict.fromkeys(component_names))
    positions = list(dict.fromkeys(row["position"] for row in table))
    fig, axes = plt.subplots(
        len(kinds),
        len(shown),
        figsize=(3.2 * len(shown) + 1, 2.8 * len(kinds) + 0.4),
        dpi=100,
        squeeze=False,
        layout="constrained",
    )
    values = [row[k] for row in table for k in kinds if isinstance(row[k], float) and math.isfinite(row[k])]
    limit = max([1.0, *(abs(v) for v in values)])
    for r, kind in enumerate(kinds):
        for c, component in enumerate(shown):
            rows = [row for row in table if row["component"] == component]
            labels = list(dict.fromkeys(_row_label(row) for row in rows))
            grid = np.full((len(labels), len(positions)), np.nan)
            for row in rows:
                grid[labels.index(_row_label(row)), positions.index(row["position"])] = row[kind]
            ax = axes[r][c]
            image = ax.imshow(grid, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
            ax.set_title(f"{component} ({kind})", fontsize=9)
            ax.set_xticks(range(len(positions)), positions, fontsize=7)
            ax.set_yticks(range(len(labels)), labels, fontsize=6 if len(labels) > 8 else 8)
            ax.set_xlabel("position", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.8, label="normalised score")
    fig.suptitle(title, fontsize=10)
    atomic_write_png(fig, path)
