"""Necessity and sufficiency of a declared circuit: the field's central causal test.

For a circuit ``C`` (nodes: heads, MLPs, any narrowed site) chosen from a universe (every head
and MLP), every variant below runs batched through the engine, on a fixed held-out set:

- ``full``: the metric of the model M; ``empty``: with the whole universe ablated (∅);
- ``sufficiency``: with C's complement ablated, m(C); ``necessity``: with C ablated, m(M \\ C);
  ``necessity_normalised`` = (m(M) - m(M \\ C)) / (m(M) - m(∅)): 1 when ablating C alone
  costs all that ablating everything costs;
- ``faithfulness`` = (m(C) - m(∅)) / (m(M) - m(∅)) (MIB, Mueller et al. 2025), with a bootstrap
  confidence interval (``_low``, ``_high``) for it and for necessity and sufficiency;
- ``cpr`` and ``cmd``: the area under f(C_k) and under |1 - f(C_k)| over circuits C_k of the
  top k nodes by their single-node ablation effect ``effect/<node>`` = m(M) - m(M \\ {node});
- ``completeness`` = max over sampled subsets K of C of |m(C \\ K) - m(M \\ K)| (Wang et al.
  2022; ``completeness_mean``: their mean); ``minimality/<node>`` = |m(C) - m(C \\ {node})|.

Ablations: zero, mean (over the audit set), mean per position, resample (another example's
activation). Metrics: logit difference, answer probability, accuracy, KL (see ``circuits``).

The bootstrap is Poisson (each example weighted by a seeded Poisson(1) draw per replicate), so
its sums add over chunks and processes like every other figure.

Each run writes ``<run dir>/hypotheses/<label>.json``: the circuit, how it was tested, the
hashes of the weights and data, and the figures, for ``faithful-train verify``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from faithful_train.audits.base import Audit, Total
from faithful_train.errors import ConfigError
from faithful_train.functional.circuits import (
    ABLATIONS,
    METRICS,
    AblationValues,
    Knockout,
    answer_metric,
    check_choice,
    circuits_by_score,
    components,
    curve_area,
    curve_sizes,
    faithfulness,
    knockout_logits,
    node_label,
    parse_nodes,
)
from faithful_train.functional.interchange import check_positions
from faithful_train.functional.mib_graph import write_eap_graph
from faithful_train.intervene.hypotheses import Hypothesis
from faithful_train.intervene.sites import SiteRef, run_with, validate_sites
from faithful_train.io.files import atomic_write_text
from faithful_train.modeling.interface import hidden_size, n_heads, n_layers
from faithful_train.tasks.base import Batch, Task, take
from faithful_train.tasks.batch import trim_padding

_MAIN = ("full", "empty", "sufficiency", "necessity")


class AblationAudit(Audit):
    name = "ablation"

    def __init__(
        self,
        circuit: list[Any] | None = None,
        hypothesis: str | None = None,
        granularity: str = "heads",
        ablation: str = "mean",
        metric: str = "logit_diff",
        curve: bool = True,
        subsets: int = 8,
        bootstrap: int = 1000,
        confidence: float = 0.95,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if (circuit is None) == (hypothesis is None):
            raise ConfigError(f"audit {self.label!r}: give either 'circuit' (a list of nodes) or 'hypothesis' (a file)")
        self.hypothesis_path = hypothesis
        if hypothesis is not None:
            found = Hypothesis.load(hypothesis, kind="circuit")
            if found.edges and not found.nodes:
                raise ConfigError(
                    f"audit {self.label!r}: hypothesis {hypothesis} is an edge circuit; test it with the edges audit"
                )
            circuit, granularity = found.nodes, found.granularity or granularity
            ablation, metric = found.ablation or ablation, found.metric or metric
        self.nodes = parse_nodes(circuit, f"audit {self.label!r}")
        self.granularity, self.curve = granularity, bool(curve)
        self.ablation = check_choice("ablation", ablation, ABLATIONS)
        self.metric = check_choice("circuit metric", metric, METRICS)
        if subsets < 0 or bootstrap < 0 or not 0 < confidence < 1:
            raise ConfigError(f"audit {self.label!r}: subsets >= 0, bootstrap >= 0 and 0 < confidence < 1 required")
        self.subsets, self.bootstrap, self.confidence = int(subsets), int(bootstrap), float(confidence)
        self.universe: list[SiteRef] = []
        self._values: AblationValues | None = None
        self._ranking: list[float] | None = None
        self._effects: dict[str, float] = {}
        self._subsets: list[tuple[SiteRef, ...]] = []
        self._data_hash = ""

    # -- set-up ---------------------------------------------------------------------------------

    def bind(self, model: nn.Module, task: Task, run_seed: int = 0) -> None:
        self.universe = components(model, self.granularity)
        validate_sites(model, {ref.name for ref in self.nodes})
        for ref in self.nodes:
            check_positions(ref, task)
        super().bind(model, task, run_seed)
        generator = torch.Generator().manual_seed(int(self.seed) + 7)
        size = min(len(self.nodes) - 1, max(1, len(self.nodes) // 2))
        self._subsets = []
        if size >= 1:
            for _ in range(self.subsets):
                pick = torch.randperm(len(self.nodes), generator=generator)[:size].sort().values
                self._subsets.append(tuple(self.nodes[int(i)] for i in pick))

    def metric_names(self, task: Task) -> list[str]:
        names = ["task_acc", *_MAIN, "faithfulness", "necessity_normalised"]
        if self.bootstrap:
            names += [f"{m}_{end}" for m in ("faithfulness", "sufficiency", "necessity") for end in ("low", "high")]
        if self.curve:
            names += ["cpr", "cmd", *(f"effect/{node_label(r)}" for r in self.universe)]
        if self._subsets or (self.subsets and len(self.nodes) > 1):
            names += ["completeness", "completeness_mean"]
        return names + [f"minimality/{node_label(r)}" for r in self.nodes]

    def build_data(self, task: Task, seed: int) -> Batch:
        data = dict(task.sample(self.n_examples, seed))
        if self.bootstrap:
            generator = torch.Generator().manual_seed(seed + 3)
            rates = torch.ones(self.n_examples, self.bootstrap)
            data["bootstrap_weights"] = torch.poisson(rates, generator=generator)
        return data

    def knockouts(self) -> list[Knockout]:
        """The variants of each batch: M, ∅, C, M \\ C, the curve's circuits, completeness
        pairs (C \\ K, M \\ K) and C without each of its nodes."""
        universe, nodes = tuple(self.universe), self.nodes
        out = [Knockout(), Knockout(universe), Knockout(universe, nodes), Knockout(nodes)]
        if self.curve and self._ranking is not None:
            sizes = curve_sizes(len(universe))
            out += [Knockout(universe, kept) for kept in circuits_by_score(universe, self._ranking, sizes)]
        for subset in self._subsets:
            rest = tuple(r for r in nodes if r not in subset)
            out += [Knockout(universe, rest), Knockout(subset)]
        out += [Knockout(universe, tuple(r for r in nodes if r != node)) for node in nodes]
        return out

    # -- measuring ------------------------------------------------------------------------------

    def _clean(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        """The batch's clean activations at the universe's sites (what resample draws from)."""
        if not self._values.needs_clean():
            return {}
        sites = {ref.name for ref in (*self.universe, *self.nodes)}
        _, cache = run_with(model, batch["input_ids"], record=sites, attention_mask=batch.get("attention_mask"))
        return cache

    def _metric(self, model: nn.Module, task: Task, batch: Batch, knockouts: list[Knockout]) -> tuple[Tensor, Tensor]:
        """``(V, B)`` metric values of the knockouts (the first must be the full model) and
        ``(B,)`` the full model's accuracy."""
        logits = knockout_logits(model, batch, knockouts, self._values, self._clean(model, batch))
        acc = answer_metric("acc", logits[:1], batch["labels"], None, task.answer_tokens)[0]
        return answer_metric(self.metric, logits, batch["labels"], logits[0], task.answer_tokens), acc

    def _chunks(self, data: Batch, device: torch.device):
        for chunk in torch.arange(self.n_examples).split(self.batch_size):
            yield {k: v.to(device) for k, v in trim_padding(take(data, chunk)).items()}

    def _prepare(self, model: nn.Module, task: Task) -> None:
        """Reference means over the whole audit set, then (for the curve) every node's
        single-node ablation effect, which ranks the nodes. Every process computes the same."""
        data = self.data(task)
        device = next(model.parameters()).device
        sites = sorted({ref.name for ref in (*self.universe, *self.nodes)})
        if self.ablation in ("mean", "mean_per_position"):
            acts: dict[str, list[Tensor]] = {s: [] for s in sites}
            masks = []
            for batch in self._chunks({k: v for k, v in data.items() if k != "bootstrap_weights"}, device):
                _, cache = run_with(model, batch["input_ids"], record=sites, attention_mask=batch.get("attention_mask"))
                for s in sites:
                    acts[s].append(cache[s])
                masks.append(batch.get("attention_mask"))
            T = max(a.shape[1] for a in acts[sites[0]])
            stacked = {s: torch.cat([_pad_positions(a, T) for a in acts[s]]) for s in sites}
            mask = None if masks[0] is None else torch.cat([_pad_positions(m, T) for m in masks])
            self._values = AblationValues.from_reference(self.ablation, stacked, mask)
        else:
            self._values = AblationValues(self.ablation)
        self._ranking = None
        if not self.curve:
            return
        singles = [Knockout()] + [Knockout((ref,)) for ref in self.universe]
        total, count = torch.zeros(len(singles), device=device, dtype=torch.float64), 0
        for batch in self._chunks(data, device):
            total += self._metric(model, task, batch, singles)[0].double().sum(1)
            count += batch["input_ids"].shape[0]
        means = total / max(count, 1)
        effects = (means[0] - means[1:]).tolist()
        self._ranking = effects
        self._effects = {f"effect/{node_label(r)}": e for r, e in zip(self.universe, effects)}

    def evaluate(self, model: nn.Module, task: Task, rank: int = 0, world_size: int = 1) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                self._prepare(model, task)
        finally:
            model.train(was_training)
        raw = super().evaluate(model, task, rank, world_size)
        return dict(sorted(self._figures(raw).items()))

    def measure(self, model: nn.Module, task: Task, batch: Batch) -> dict[str, Any]:
        knockouts = self.knockouts()
        m, acc = self._metric(model, task, batch, knockouts)  # (V, B), (B,)
        out: dict[str, Any] = {f"m/{i}": m[i] for i in range(len(knockouts))}
        out["task_acc"] = acc
        if self.bootstrap:
            w = batch["bootstrap_weights"].double()  # (B, R)
            out["boot/sum"] = Total(w.T @ m[: len(_MAIN)].double().T)  # (R, 4)
            out["boot/count"] = Total(w.sum(0))  # (R,)
        return out

    def summarise(self, totals: dict[str, Tensor], task: Task) -> dict[str, float]:
        if not self.bootstrap:
            return {}
        means = totals["boot/sum"] / totals["boot/count"].clamp_min(1)[:, None]  # (R, 4)
        full, empty, circuit, without = means.unbind(1)
        lo, hi = (1 - self.confidence) / 2, 1 - (1 - self.confidence) / 2
        out = {}
        for name, values in (
            ("faithfulness", faithfulness(circuit, empty, full)),
            ("sufficiency", circuit),
            ("necessity", without),
        ):
            values = values[~values.isnan()]
            if len(values):
                out[f"{name}_low"], out[f"{name}_high"] = float(values.quantile(lo)), float(values.quantile(hi))
        return out

    def _figures(self, raw: dict[str, float]) -> dict[str, float]:
        knockouts = self.knockouts()
        m = [raw[f"m/{i}"] for i in range(len(knockouts))]
        full, empty, circuit, without = m[:4]
        figures = {k: v for k, v in raw.items() if not k.startswith("m/")}
        figures |= {"full": full, "empty": empty, "sufficiency": circuit, "necessity": without}
        figures["faithfulness"] = float(faithfulness(circuit, empty, full))
        figures["necessity_normalised"] = float(faithfulness(full - without + empty, empty, full))
        i = 4
        if self.curve and self._ranking is not None:
            sizes = curve_sizes(len(self.universe))
            f = [float(faithfulness(v, empty, full)) for v in m[i : i + len(sizes)]]
            x = [k / len(self.universe) for k in sizes]
            figures["cpr"], figures["cmd"] = curve_area(x, f), curve_area(x, [abs(1 - v) for v in f])
            self.curve_points = list(zip(sizes, x, f))
            figures |= self._effects
            i += len(sizes)
        if self._subsets:
            gaps = [abs(m[i + 2 * s] - m[i + 2 * s + 1]) for s in range(len(self._subsets))]
            figures["completeness"], figures["completeness_mean"] = max(gaps), sum(gaps) / len(gaps)
            i += 2 * len(self._subsets)
        for node, value in zip(self.nodes, m[i:]):
            figures[f"minimality/{node_label(node)}"] = abs(circuit - value)
        return figures

    # -- files ----------------------------------------------------------------------------------

    def hypothesis(self, model: nn.Module, task: Task, step: int) -> Hypothesis:
        """The circuit as tested, with today's figures."""
        return Hypothesis.circuit(
            self.label,
            self.nodes,
            self.granularity,
            self.ablation,
            self.metric,
            **self.measured_on(model, task, step),
        )

    def write_artifacts(self, model: nn.Module, task: Task, run_dir: Path, step: int, loggers: list[Any]) -> None:
        """The hypothesis with today's figures; with the curve, its points (CSV) and the circuit
        with every node's effect as an EAP-IG / MIB graph JSON."""
        self.hypothesis(model, task, step).save(run_dir / "hypotheses" / f"{self.label}.json")
        if not (self.curve and self._effects):
            return
        folder = run_dir / self.label
        rows = "".join(f"{k},{x:.6f},{f:.6f}\n" for k, x, f in getattr(self, "curve_points", []))
        atomic_write_text(folder / f"curve_step{step:06d}.csv", "size,fraction,faithfulness\n" + rows)
        layers, heads, width = n_layers(model), n_heads(model), hidden_size(model)
        if self.granularity == "heads" and None not in (layers, heads, width):
            scores = {key.removeprefix("effect/"): value for key, value in self._effects.items()}
            members = {node_label(u) for u in self.universe if _covers(self.nodes, u)}
            write_eap_graph(folder / f"graph_step{step:06d}.json", layers, heads, width, scores, members)


def _covers(nodes: tuple[SiteRef, ...], unit: SiteRef) -> bool:
    """Whether ``nodes`` hold the whole universe node ``unit`` (all positions and dims of it)."""
    return any(
        n.name == unit.name
        and n.positions is None
        and n.dims is None
        and (n.heads is None or set(unit.heads or ()) <= set(n.heads))
        for n in nodes
    )


def _pad_positions(values: Tensor | None, length: int) -> Tensor | None:
    """``(N, T, ...)`` right-padded with zeros to ``length`` positions (chunks differ in length)."""
    if values is None or values.shape[1] == length:
        return values
    pad = torch.zeros(
        values.shape[0], length - values.shape[1], *values.shape[2:], dtype=values.dtype, device=values.device
    )
    return torch.cat([values, pad], 1)
