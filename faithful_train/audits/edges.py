"""The ``edges`` audit: edge attribution (EAP, EAP-IG), exact edge patching and MIB's CPR/CMD over
edge circuits, every N steps, so a run shows when its circuit's edges form.

On a fixed held-out set (clean inputs; corrupted inputs from the task's interchange pairs, or the
mean / zero ablation), two passes:

1. **scores**: every edge's attribution score (``method``: ``eap``, ``eap-ig-inputs`` (default),
   ``eap-ig-activations``, with ``steps``, MIB's 5), and with ``exact`` every edge's exact
   single-edge knockout effect ``m(M \\ {e}) − m(M)``, all edges as variants of batched runs;
   the metric on the model (``clean``) and with every edge corrupted (``corrupted``);
2. **curves**: circuits of the top ``⌈p·N⌉`` edges by ``|score|`` at MIB's fractions ``p``,
   pruned, run exactly: faithfulness per fraction (``faithfulness_at/<p>``), ``cpr``, ``cmd``,
   ``fraction_at_0.8`` (the smallest fraction reaching faithfulness 0.8), and the same from the
   exact scores (``exact/...``); ``verify_top: k`` re-runs the top-``k`` attributed edges exactly
   (``verify/spearman``, ``verify/sign_agreement``; free when ``exact`` already ran them); a
   declared ``circuit`` (edge names, or a ``hypothesis`` file) gets ``circuit/faithfulness``.

See ``functional.edges`` for the definitions. Each run writes ``<run dir>/<label>/``
``graph_step<N>.json`` (every edge's score and ``in_graph`` in EAP-IG's / MIB's format: the
smallest curve circuit reaching 0.8, else the largest), ``circuit_step<N>.png`` (that circuit
as a layered graph), ``curve_step<N>.csv``, and ``<run dir>/hypotheses/<label>.json`` (the
circuit's edges with the figures) for ``faithful-train verify``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from faithful_train.audits.base import Audit, Total
from faithful_train.errors import ConfigError
from faithful_train.functional.circuits import METRICS, answer_metric, check_choice
from faithful_train.functional.edges import (
    ABLATIONS,
    METHODS,
    MIB_FRACTIONS,
    circuit_logits,
    circuit_missing,
    corrupt_record,
    curve_circuits,
    edge_scores,
    knockouts,
    mib_measures,
    record,
)
from faithful_train.functional.patching import corrupted_sources
from faithful_train.functional.ranking import spearman
from faithful_train.intervene.edges import model_graph, parts_of
from faithful_train.intervene.graph import Graph
from faithful_train.intervene.hypotheses import Hypothesis, HypothesisFiles
from faithful_train.io.files import atomic_write_png, atomic_write_text
from faithful_train.modeling.interface import hidden_size
from faithful_train.tasks.base import Batch, Task
from faithful_train.tasks.batch import prefixed, unprefixed

CORRUPT = "corrupt"


class EdgesAudit(Audit):
    name = "edges"

    def __init__(
        self,
        method: str = "eap-ig-inputs",
        steps: int = 5,
        ablation: str = "patch",
        corrupt: list[str] | str | None = None,
        metric: str = "logit_diff",
        exact: bool = True,
        verify_top: int | None = 20,
        top: int = 10,
        circuit: list[str] | None = None,
        hypothesis: str | None = None,
        fractions: list[float] | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        owner = f"audit {self.label!r}"
        self.method = check_choice("edge attribution method", method, METHODS)
        self.ablation = check_choice("edge ablation", ablation, ABLATIONS)
        self.metric = check_choice("circuit metric", metric, METRICS)
        if self.metric == "acc":
            raise ConfigError(f"{owner}: metric 'acc' has no gradient for edge attribution; use logit_diff, prob or kl")
        if self.method == "eap-ig-inputs" and self.ablation != "patch":
            raise ConfigError(f"{owner}: eap-ig-inputs interpolates from corrupted inputs; use ablation: patch")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"{owner}: steps must be an int >= 1, got {steps!r}")
        for name, value in (("verify_top", verify_top), ("top", top)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"{owner}: {name} must be an int >= 0 (or null), got {value!r}")
        if circuit is not None and hypothesis is not None:
            raise ConfigError(f"{owner}: give 'circuit' (edge names) or 'hypothesis' (a file), not both")
        self.fractions = tuple(float(p) for p in (fractions or MIB_FRACTIONS))
        if any(not 0 < p <= 1 for p in self.fractions) or list(self.fractions) != sorted(self.fractions):
            raise ConfigError(f"{owner}: fractions must rise within (0, 1], got {list(self.fractions)}")
        self.steps, self.exact, self.top = steps, bool(exact), int(top or 0)
        self.verify_top = int(verify_top or 0)
        self.corrupt = None if corrupt is None else ((corrupt,) if isinstance(corrupt, str) else tuple(corrupt))
        self.circuit_spec, self.hypothesis_path = circuit, hypothesis
        self.graph: Graph | None = None
        self.declared: Tensor | None = None
        self.variables: tuple[str, ...] = ()
        self._phase = "scores"
        self._state: dict[str, Any] = {}
        self._files = HypothesisFiles()

    # -- set-up ---------------------------------------------------------------------------------

    def bind(self, model: nn.Module, task: Task, run_seed: int = 0) -> None:
        owner = f"audit {self.label!r}"
        self.graph = model_graph(model)
        if self.circuit_spec is not None:
            self.declared = self.graph.parse_circuit(self.circuit_spec, f"{owner}: circuit")
        if self.ablation == "patch":
            variables = task.variables if self.corrupt is None else self.corrupt
            if not variables:
                raise ConfigError(
                    f"{owner}: task {task.name!r} has no causal variables whose interchange pairs give corrupted "
                    "inputs; use ablation: mean or zero"
                )
            task.check_variables(variables)
            self.variables = tuple(variables)
        self.verify_top = min(self.verify_top, self.graph.n_edges)
        super().bind(model, task, run_seed)

    def use_hypotheses(self, files: HypothesisFiles) -> None:
        self._files = files
        if self.hypothesis_path is not None:
            files.check(self.hypothesis_path, f"audit {self.label!r}")

    def _declared(self) -> Tensor | None:
        if self.hypothesis_path is None:
            return self.declared
        found = self._files.load(self.hypothesis_path, kind="circuit")
        if not found.edges:
            raise ConfigError(f"audit {self.label!r}: hypothesis {self.hypothesis_path} holds no edges")
        return self.graph.parse_circuit(found.edges, f"hypothesis {self.hypothesis_path}")

    def metric_names(self, task: Task) -> list[str]:
        names = ["clean", "corrupted", "cpr", "cmd", "fraction_at_0.8"]
        names += [f"faithfulness_at/{p:g}" for p in self.fractions]
        if self.exact:
            names += ["exact/cpr", "exact/cmd", "exact/fraction_at_0.8"]
        if self.verify_top:
            names += ["verify/spearman", "verify/sign_agreement"]
        if self.circuit_spec is not None or self.hypothesis_path is not None:
            names += ["circuit/faithfulness", "circuit/n_edges"]
        return names

    def build_data(self, task: Task, seed: int) -> Batch:
        data = task.sample(self.n_examples, seed)
        if self.ablation != "patch":
            return data
        return data | prefixed(corrupted_sources(task, data, self.variables, seed, f"audit {self.label!r}"), CORRUPT)

    # -- measuring ------------------------------------------------------------------------------

    def evaluate(self, model: nn.Module, task: Task, rank: int = 0, world_size: int = 1) -> dict[str, float]:
        self._phase, self._state = "scores", {"declared": self._declared()}
        try:
            results = super().evaluate(model, task, rank, world_size)
            self._phase = "curves"
            results |= super().evaluate(model, task, rank, world_size)
        finally:
            self._phase = "scores"
        return dict(sorted(results.items()))

    def _split(self, batch: Batch) -> tuple[Batch, Batch | None]:
        clean = {k: v for k, v in batch.items() if not k.startswith(CORRUPT + "/")}
        return clean, (unprefixed(batch, CORRUPT) if self.ablation == "patch" else None)

    def measure(self, model: nn.Module, task: Task, batch: Batch) -> dict[str, Any]:
        clean, corrupted = self._split(batch)
        labels = clean["labels"]
        graph = self.graph
        with torch.no_grad():
            full_logits, senders = record(model, clean)
            bad = None
            if corrupted is not None:
                bad = record(model, corrupted)[1]
            replaced = corrupt_record(self.ablation, senders, bad, clean.get("attention_mask"))
            corrupt = replaced.wide(parts_of(model))
        full = full_logits[:, 0]

        def metric(logits: Tensor) -> Tensor:
            return answer_metric(self.metric, logits, labels, full, task.answer_tokens)

        n = Total(torch.tensor(float(labels.shape[0]), dtype=torch.float64))
        if self._phase == "scores":
            out: dict[str, Any] = {"count": n}
            scores = edge_scores(
                model, clean, metric, self.method, self.steps, self.ablation, senders=(senders, replaced)
            )
            out["sum/scores"] = Total(scores)
            runs = [torch.zeros(1, graph.n_senders, graph.n_receivers), graph.real.float()[None]]
            if self.exact:
                runs.append(knockouts(graph, graph.edges))
            with torch.no_grad():
                values = metric(circuit_logits(model, clean, torch.cat(runs), corrupt, clean=senders)).double()
            out["sum/full"], out["sum/empty"] = Total(values[0].sum()), Total(values[1].sum())
            if self.exact:
                out["sum/exact"] = Total((values[2:] - values[:1]).sum(1))
            return out
        runs = [circuit_missing(graph, c) for c in self._state["curves"].values()]
        if self._state["verify"]:
            runs.append(knockouts(graph, self._state["verify"]))
        declared = self._state["declared"]
        if declared is not None:
            runs.append(circuit_missing(graph, [declared]))
        with torch.no_grad():
            values = metric(circuit_logits(model, clean, torch.cat(runs), corrupt, clean=senders)).double().sum(1)
        return {"count": n, "sum/runs": Total(values)}

    def summarise(self, totals: dict[str, Tensor], task: Task) -> dict[str, float]:
        count = float(totals["count"].clamp_min(1))
        graph = self.graph
        if self._phase == "scores":
            scores = totals["sum/scores"] / count
            full, empty = float(totals["sum/full"]) / count, float(totals["sum/empty"]) / count
            exact = None
            if self.exact:
                exact = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.float64)
                for (s, r), v in zip(graph.edges, (totals["sum/exact"] / count).tolist()):
                    exact[s, r] = v
            curves = {"attribution": curve_circuits(graph, scores, self.fractions)}
            if exact is not None:
                curves["exact"] = curve_circuits(graph, exact, self.fractions)
            chosen = []
            if self.verify_top:
                order = scores.abs().masked_fill(~graph.real, -1).flatten().argsort(descending=True, stable=True)
                chosen = [divmod(int(i), graph.n_receivers) for i in order[: self.verify_top]]
            self._state |= {"scores": scores, "exact": exact, "full": full, "empty": empty}
            self._state |= {"curves": curves, "verify": [] if exact is not None else chosen, "chosen": chosen}
            return {"clean": full, "corrupted": empty}
        values = (totals["sum/runs"] / count).tolist()
        full, empty, out = self._state["full"], self._state["empty"], {}
        k = len(self.fractions)
        self._state["points"] = {}
        for i, kind in enumerate(self._state["curves"]):
            measures = mib_measures(self.fractions, values[i * k : (i + 1) * k], empty, full)
            prefix = "" if kind == "attribution" else "exact/"
            out |= {f"{prefix}{m}": measures[m] for m in ("cpr", "cmd", "fraction_at_0.8")}
            if kind == "attribution":
                out |= {f"faithfulness_at/{p:g}": f for p, f in zip(self.fractions, measures["faithfulness"])}
            self._state["points"][kind] = measures["faithfulness"]
        rest = values[len(self._state["curves"]) * k :]
        chosen = self._state["chosen"]
        if chosen:
            if self._state["exact"] is not None:
                exact = torch.tensor([float(self._state["exact"][s, r]) for s, r in chosen])
            else:
                exact, rest = torch.tensor(rest[: len(chosen)]) - full, rest[len(chosen) :]
            estimate = torch.tensor([float(self._state["scores"][s, r]) for s, r in chosen])
            out["verify/spearman"] = float(spearman(exact[None], estimate[None])[0])
            out["verify/sign_agreement"] = float((exact.sign() == estimate.sign()).double().mean())
        if self._state["declared"] is not None:
            out["circuit/faithfulness"] = mib_measures([1.0], rest[:1], empty, full)["faithfulness"][0]
            out["circuit/n_edges"] = float(self._state["declared"].sum())
        return out

    # -- files ----------------------------------------------------------------------------------

    def chosen_circuit(self) -> Tensor:
        """The smallest attribution curve circuit reaching faithfulness 0.8, else the largest."""
        circuits = self._state["curves"]["attribution"]
        points = self._state.get("points", {}).get("attribution", [])
        reached = [c for c, f in zip(circuits, points) if math.isfinite(f) and f >= 0.8]
        return reached[0] if reached else circuits[-1]

    def top_edges(self) -> list[dict[str, Any]]:
        scores, graph = self._state["scores"], self.graph
        order = scores.abs().masked_fill(~graph.real, -1).flatten().argsort(descending=True, stable=True)
        return [
            {"edge": graph.edge_name(*divmod(int(i), graph.n_receivers)), "score": float(scores.flatten()[i])}
            for i in order[: self.top]
        ]

    def hypothesis(self, model: nn.Module, task: Task, step: int) -> Hypothesis:
        return Hypothesis(
            kind="circuit",
            label=self.label,
            edges=self.graph.names(self.chosen_circuit()),
            ablation=self.ablation,
            metric=self.metric,
            method=self.method,
            **self.measured_on(model, task, step),
        )

    def remember(self, results: dict[str, float], step: int) -> dict[str, Any]:
        record_ = super().remember(results, step)
        if self._state.get("scores") is not None:
            record_["top_edges"] = self.top_edges()
        return record_

    def write_artifacts(self, model: nn.Module, task: Task, run_dir: Path, step: int, loggers: list[Any]) -> None:
        if self._state.get("scores") is None:
            return
        folder, graph = run_dir / self.label, self.graph
        circuit = self.chosen_circuit()
        graph.write_json(
            folder / f"graph_step{step:06d}.json", self._state["scores"], circuit, hidden_size(model) or 0, self.method
        )
        rows = [",".join(["fraction", *self._state["points"]])]
        for i, p in enumerate(self.fractions):
            rows.append(",".join([f"{p:g}", *(f"{v[i]:.6f}" for v in self._state["points"].values())]))
        atomic_write_text(folder / f"curve_step{step:06d}.csv", "\n".join(rows) + "\n")
        path = folder / f"circuit_step{step:06d}.png"
        title = f"step {step}: {int(circuit.sum())} of {graph.n_edges} edges ({self.method}, {self.metric})"
        plot_edge_circuit(graph, self._state["scores"], circuit, path, title)
        self.hypothesis(model, task, step).save(run_dir / "hypotheses" / f"{self.label}.json")
        for logger in loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key=f"audit/{self.label}/circuit", images=[str(path)], step=step)


def plot_edge_circuit(graph: Graph, scores: Tensor, circuit: Tensor, path: Path, title: str) -> None:
    """The circuit as a layered graph: columns input, each block's heads, its MLP, logits; one
    row per head; an edge drawn from sender to receiver (into a head: a dot marks q, k or v),
    its width by ``|score|``, blue where corrupting it lowers the metric, red where it raises it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    H = graph.n_heads

    def place(name: str) -> tuple[float, float]:
        if name == "input":
            return 0.0, (H - 1) / 2
        if name == "logits":
            return 2.0 * graph.n_layers + 1, (H - 1) / 2
        if name.startswith("m"):
            return 2.0 * int(name[1:]) + 2, (H - 1) / 2
        layer, head = (int(x) for x in name[1:].split(".h"))
        return 2.0 * layer + 1, float(head)

    edges = circuit.nonzero().tolist()
    largest = max([abs(float(scores[s, r])) for s, r in edges] + [1e-12])
    fig, ax = plt.subplots(figsize=(1.6 * graph.n_layers + 3, 0.5 * H + 2), layout="constrained")
    used = set()
    for s, r in edges:
        sender, receiver = graph.senders[s], graph.receivers[r]
        node, _, qkv = receiver.partition("<")
        (x0, y0), (x1, y1) = place(sender), place(node)
        offset = {"q": -0.18, "k": 0.0, "v": 0.18}.get(qkv[:1], 0.0)
        value = float(scores[s, r])
        ax.annotate(
            "",
            xy=(x1 - 0.12, y1 + offset),
            xytext=(x0 + 0.12, y0),
            arrowprops=dict(
                arrowstyle="-|>",
                lw=0.4 + 3.6 * abs(value) / largest,
                color="tab:blue" if value < 0 else "tab:red",
                alpha=0.75,
                connectionstyle="arc3,rad=0.08",
            ),
        )
        used |= {sender, node}
    for name in graph.senders + ["logits"]:
        x, y = place(name)
        on = name in used or name in ("input", "logits")
        ax.scatter([x], [y], s=160 if on else 40, c="black" if on else "lightgrey", zorder=3)
        if on:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(0, 9), ha="center", fontsize=7)
    ax.set_xticks(
        [0] + [2 * i + c for i in range(graph.n_layers) for c in (1, 2)] + [2 * graph.n_layers + 1],
        ["input"] + [f"{k}{i}" for i in range(graph.n_layers) for k in ("attn ", "mlp ")] + ["logits"],
        fontsize=8,
    )
    ax.set_yticks(range(H), [f"h{h}" for h in range(H)], fontsize=7)
    ax.set_ylim(-0.8, H - 0.2)
    ax.set_title(title, fontsize=9)
    atomic_write_png(fig, path)
