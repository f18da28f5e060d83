"""The ``graphs`` audit: attribution graphs over the run's transcoders for a fixed set of prompts,
every N steps, with their claims checked by intervention on the real model.

    objectives:
      - name: sae                   # transcoders at every layer, trained beside the model
        label: transcoders
        site: blocks.{i}.mlp.in
        target: blocks.{i}.mlp.out
        layers: all
    audits:
      - name: graphs
        transcoders: transcoders    # the sae objective's label (read live), or
        # path: saes/transcoders    # a folder of layer<i>/ SAELens transcoders (run-dir relative)
        every_n_steps: 500
        n_examples: 4               # prompts: the task's examples up to the answer position
        max_n_logits: 10            # logit targets: the top ones up to desired_logit_prob
        desired_logit_prob: 0.95
        node_threshold: 0.8         # circuit-tracer's pruning
        edge_threshold: 0.98
        max_sources: 1024           # entries kept per row (the adjacency is never dense)
        top_k: 8                    # features whose claims are checked
        scale: 0.0                  # the intervention: 0 zeroes a feature, 2 doubles it
        trust: {spearman: 0.5, sign_agreement: 0.8}

Figures, means over the prompts (``functional.attribution_graphs``, ``functional.graph_pruning``):

- ``replacement_score``: ``I(tokens) / (I(tokens) + I(errors))``, the share of the influence on
  the output that reaches the tokens through features rather than error nodes;
  ``completeness``: the share of every node's input that is not error, influence-weighted
  (circuit-tracer's ``compute_graph_scores``);
- ``nodes_at_0.8``: the fewest nodes that carry 80% of the influence; ``pruned_nodes``,
  ``pruned_edges``: what the pruning keeps; ``features``: active features per prompt;
- ``intervention_agreement``: Spearman's ρ between the change in the top logit (minus the mean
  logit) the graph predicts when each of its ``top_k`` most influential features is scaled by
  ``scale`` (total effect through the linearised replacement model) and the change measured on
  the real model; ``intervention_sign_agreement``: the share of signs that match; ``trusted``:
  the share of prompts whose graph reaches both ``trust`` bars (the summary warns otherwise);
  ``intervention_agreement_frozen_attention``: the same ρ with every attention pattern of the
  real model held at the prompt's, as the graph assumes (where it is higher, the graph misses
  effects through queries and keys).

Files, per prompt and audit step: ``<run dir>/graphs/<label>/step<N>_prompt<j>.json`` in the
format circuit-tracer's frontend and Neuronpedia read, and ``step<N>_prompt<j>.png`` (the
pruned graph, layers by positions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from faithful_train.audits.base import Audit
from faithful_train.errors import ConfigError
from faithful_train.functional.attribution_graphs import AttributionGraph, graph_json, traced
from faithful_train.intervene.replacement import check_transcoders
from faithful_train.intervene.transcoders import Transcoders, load_transcoders
from faithful_train.io.files import atomic_write_json, atomic_write_png
from faithful_train.modeling.interface import hidden_size, n_layers
from faithful_train.tasks.base import Batch, Task
from faithful_train.tasks.batch import answer_positions

FIGURES = (
    "replacement_score",
    "completeness",
    "nodes_at_0.8",
    "pruned_nodes",
    "pruned_edges",
    "features",
    "intervention_agreement",
    "intervention_sign_agreement",
    "intervention_agreement_frozen_attention",
    "trusted",
)


class GraphsAudit(Audit):
    name = "graphs"

    def __init__(
        self,
        transcoders: str | None = None,
        path: str | None = None,
        max_n_logits: int = 10,
        desired_logit_prob: float = 0.95,
        node_threshold: float = 0.8,
        edge_threshold: float = 0.98,
        max_sources: int | None = 1024,
        top_k: int = 8,
        scale: float = 0.0,
        trust: dict[str, float] | None = None,
        **kwargs: Any,
    ):
        kwargs.setdefault("n_examples", 4)
        kwargs.setdefault("batch_size", 4)
        super().__init__(**kwargs)
        where = f"audit {self.label!r}"
        if (transcoders is None) == (path is None):
            raise ConfigError(f"{where}: give transcoders (an sae objective's label) or path (a transcoder folder)")
        for name, value in (
            ("desired_logit_prob", desired_logit_prob),
            ("node_threshold", node_threshold),
            ("edge_threshold", edge_threshold),
        ):
            if not 0 < value <= 1:
                raise ConfigError(f"{where}: {name} must be in (0, 1], got {value}")
        if max_n_logits < 1 or top_k < 1 or (max_sources is not None and max_sources < 1):
            raise ConfigError(
                f"{where}: max_n_logits, top_k and max_sources must be >= 1, got {max_n_logits}, {top_k}, {max_sources}"
            )
        trust = dict(trust or {})
        unknown = set(trust) - {"spearman", "sign_agreement"}
        if unknown:
            raise ConfigError(f"{where}: trust.{sorted(unknown)[0]} is not spearman or sign_agreement")
        self.objective_label, self.path = transcoders, path
        self.max_n_logits, self.desired_logit_prob = int(max_n_logits), float(desired_logit_prob)
        self.node_threshold, self.edge_threshold = float(node_threshold), float(edge_threshold)
        self.max_sources, self.top_k, self.scale = max_sources, int(top_k), float(scale)
        self.trust = {"spearman": 0.5, "sign_agreement": 0.8} | {k: float(v) for k, v in trust.items()}
        self.transcoders: Transcoders | None = None
        self._run_dir: Path | None = None
        self._graphs: list[AttributionGraph] = []

    def metric_names(self, task: Task) -> list[str]:
        return list(FIGURES)

    def bind(self, model: nn.Module, task: Task, run_seed: int = 0) -> None:
        from faithful_train.intervene.edges import parts_of

        parts_of(model)  # a model the replacement can be built on, or a one-line error now
        self._width, self._depth = hidden_size(model), n_layers(model)
        super().bind(model, task, run_seed)

    def use_hypotheses(self, files: Any) -> None:
        self._run_dir = files.run_dir

    def attach(self, pl_module: Any) -> None:
        where = f"audit {self.label!r}"
        if self.objective_label is not None:
            module = (
                pl_module.objective_modules[self.objective_label]
                if self.objective_label in pl_module.objective_modules
                else None
            )
            if not isinstance(module, Transcoders):
                names = sorted(k for k, m in pl_module.objective_modules.items() if isinstance(m, Transcoders))
                raise ConfigError(
                    f"{where}: no sae objective with layers labelled {self.objective_label!r} (transcoders at every "
                    f"layer); such objectives: {names or 'none'}"
                )
            self.transcoders = module
        elif self.transcoders is None:
            folder = Path(self.path)
            if not folder.exists() and self._run_dir is not None:
                folder = self._run_dir / folder
            self.transcoders = load_transcoders(folder, self._width, self._depth)
            self.transcoders.to(next(pl_module.model.parameters()).device)
        check_transcoders(pl_module.model, self.transcoders, where)

    @staticmethod
    def prompts(batch: Batch) -> list[Tensor]:
        """Each example's real tokens up to its (first) answer position: ``(1, T)`` each."""
        read = answer_positions(batch)[:, 0]
        mask = batch.get("attention_mask")
        out = []
        for i in range(batch["input_ids"].shape[0]):
            ids = batch["input_ids"][i, : int(read[i]) + 1]
            if mask is not None:
                ids = ids[mask[i, : int(read[i]) + 1].bool()]
            out.append(ids[None])
        return out

    def evaluate(self, model: nn.Module, task: Task, rank: int = 0, world_size: int = 1) -> dict[str, float]:
        """The base class's: this rank's share of the prompts, figures averaged over all ranks'
        (rank zero writes the files of its own prompts)."""
        self._graphs = []
        return super().evaluate(model, task, rank, world_size)

    def measure(self, model: nn.Module, task: Task, batch: Batch) -> dict[str, Any]:
        """One graph per prompt of the chunk; a figure that is undefined for a prompt (ρ over
        fewer than two features) weighs nothing."""
        rows: dict[str, list[float]] = {k: [] for k in FIGURES}
        for ids in self.prompts(batch):
            graph = traced(
                model,
                self.transcoders,
                ids,
                self.max_n_logits,
                self.desired_logit_prob,
                self.max_sources,
                self.node_threshold,
                self.edge_threshold,
                self.top_k,
                self.scale,
            )
            self._graphs.append(graph)
            claims = graph.extra["claims"]
            trusted = (
                claims.spearman >= self.trust["spearman"] and claims.sign_agreement >= self.trust["sign_agreement"]
            )
            for key, value in (
                ("replacement_score", graph.replacement_score),
                ("completeness", graph.completeness),
                ("nodes_at_0.8", graph.nodes_for(0.8)),
                ("pruned_nodes", int(graph.pruned.node_mask.sum())),
                ("pruned_edges", int(graph.pruned.edge_mask.sum())),
                ("features", graph.n_features),
                ("intervention_agreement", claims.spearman),
                ("intervention_sign_agreement", claims.sign_agreement),
                ("intervention_agreement_frozen_attention", claims.spearman_frozen_attention),
                ("trusted", float(trusted)),
            ):
                rows[key].append(float(value))
        device = batch["input_ids"].device
        out: dict[str, Any] = {}
        for key, values in rows.items():
            value = torch.tensor(values, device=device)
            defined = ~value.isnan()
            out[key] = (torch.where(defined, value, torch.zeros_like(value)), defined.float())
        return out

    def warnings(self) -> list[str]:
        if self.latest and self.latest.get("trusted", 1.0) < 1.0:
            return [
                f"audit {self.label!r}: the graphs' claims do not all hold under intervention (intervention_agreement "
                f"{self.latest.get('intervention_agreement', float('nan')):.2f}, sign agreement "
                f"{self.latest.get('intervention_sign_agreement', float('nan')):.2f}); trusted on "
                f"{self.latest['trusted']:.0%} of the prompts"
            ]
        return []

    def write_artifacts(self, model: nn.Module, task: Task, run_dir: Path, step: int, loggers: list[Any]) -> None:
        folder = run_dir / "graphs" / self.label
        for j, graph in enumerate(self._graphs):
            names = [task.token_name(t) for t in graph.input_ids]
            claims = graph.extra.get("claims")
            info = {
                "step": step,
                "prompt_index": j,
                "intervention_agreement": None if claims is None else claims.spearman,
                "intervention_sign_agreement": None if claims is None else claims.sign_agreement,
            }
            slug = f"{self.label}-step{step}-prompt{j}"
            data = graph_json(graph, names, slug, info=info, decode=task.token_name, prompt=" ".join(names))
            atomic_write_json(folder / f"step{step:06d}_prompt{j}.json", data)
            plot_attribution_graph(graph, names, folder / f"step{step:06d}_prompt{j}.png", f"{slug}")
        for logger in loggers:
            if hasattr(logger, "log_image") and self._graphs:
                logger.log_image(
                    key=f"audit/{self.label}/graph", images=[str(folder / f"step{step:06d}_prompt0.png")], step=step
                )


def plot_attribution_graph(graph: AttributionGraph, tokens: list[str], path: Path, title: str) -> None:
    """The pruned graph as layers (rows: embeddings, each layer, logits) by positions (columns):
    features as dots sized by influence, error nodes as squares, links coloured by sign."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pruned = graph.pruned or graph.prune()
    L, T = graph.n_layers, graph.n_pos
    kept = pruned.node_mask.nonzero()[:, 0].tolist()
    cells: dict[tuple[int, int], list[int]] = {}
    for index in kept:  # each (row, position) cell's nodes, spread around its centre
        kind, layer, pos, _ = graph.describe(index)
        cells.setdefault(({"token": 0, "logit": L + 1}.get(kind, layer + 1), pos), []).append(index)
    where: dict[int, tuple[float, float]] = {}
    for (row, pos), members in cells.items():
        step = min(0.12, 0.8 / len(members))
        for rank, index in enumerate(members):
            where[index] = (pos + step * (rank - (len(members) - 1) / 2), row)
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * T + 2), 1.3 * (L + 2) + 1))
    edges = pruned.edge_mask.nonzero()[:, 0]
    if len(edges):
        strongest = float(graph.weights[edges].abs().max())
        for e in edges.tolist():
            t, s, w = int(graph.rows[e]), int(graph.cols[e]), float(graph.weights[e])
            if s in where and t in where:
                (x0, y0), (x1, y1) = where[s], where[t]
                ax.plot(
                    [x0, x1],
                    [y0, y1],
                    color="tab:blue" if w > 0 else "tab:red",
                    alpha=0.15 + 0.6 * abs(w) / strongest,
                    lw=0.8,
                )
    for index, (x, y) in where.items():
        kind = graph.describe(index)[0]
        marker = {"feature": "o", "error": "s", "token": "^", "logit": "D"}[kind]
        size = 20 + 200 * float(graph.node_influence[index] / graph.node_influence.max().clamp_min(1e-12))
        ax.scatter(
            [x],
            [y],
            s=size if kind in ("feature", "error") else 60,
            marker=marker,
            color="k" if kind != "error" else "0.6",
            zorder=3,
        )
    ax.set_yticks(range(L + 2), ["tokens", *(f"layer {i}" for i in range(L)), "logits"])
    ax.set_xticks(range(T), [t[:8] for t in tokens], rotation=60, fontsize=7)
    ax.set_title(
        f"{title}\n{len(where)} nodes, {len(edges)} edges; replacement {graph.replacement_score:.2f}, "
        f"completeness {graph.completeness:.2f}",
        fontsize=9,
    )
    fig.tight_layout()
    atomic_write_png(fig, path)
    plt.close(fig)
