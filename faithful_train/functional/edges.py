"""Edge-level circuits: exact edge patching, edge attribution (EAP, EAP-IG) and MIB's measures
over edge sets. The graph is ``intervene.graph.Graph``; the edited forward is
``intervene.edges.graph_forward``.

**Exact patching** (EAP-IG's ``evaluate_graph``): a circuit ``C`` runs on the clean input with
every edge outside it carrying the corrupted sender's output,

    input_r = resid_r − Σ_{s→r ∉ C} (a_s − a_s(corrupt))

(``a_s`` the sender's output in the same run). Circuits, or single-edge knockouts, are
variants of one batched run, chunked to a memory budget. ``corrupt`` is the sender's output on
the corrupted input (``patch``), its mean over the batch's real tokens (``mean``), or ``zero``.

**Attribution** estimates each edge's effect ``m(M \\ {s→r}) − m(M)`` to first order:

- EAP (Syed et al. 2023): ``(a_s(corrupt) − a_s(clean)) · ∂m/∂input_r`` at the clean run, one
  forward and one backward;
- EAP-IG, inputs (Hanna et al. 2024): the gradient averaged over ``steps`` runs whose input
  embeddings are ``e(corrupt) + k/steps (e(clean) − e(corrupt))``, ``k = 0 .. steps − 1``
  (EAP-IG's ``get_scores_eap_ig``; MIB's default 5 steps);
- EAP-IG, activations (``get_scores_ig_activations``): for each sender group in turn (the input,
  a block's heads, a block's MLP), its output set to ``α a(clean) + (1 − α) a(corrupt)``,
  ``α = k/steps, k = 1 .. steps``, and the gradient averaged over every group and step.

The interpolation steps (and groups) run as variants of one batched forward and backward. Scores
are accumulated per receiver group as the backward reaches it: the gradient at the group's
inputs ``(B, T, R, D)`` meets each earlier block's sender differences, widened from the
compact per-head form one block at a time, so the ``(B, T, n_senders, D)`` difference tensor
EAP-IG allocates never exists. Scores are means over examples, summed over positions.

**MIB's measures** (Mueller et al. 2025): circuits of the top ``n = ⌈p·N⌉`` edges by ``|score|``
for MIB's fractions ``p`` (0.1% .. 100%), pruned as EAP-IG's ``Graph.prune``; faithfulness
``f = (m(C) − m(∅)) / (m(M) − m(∅))`` (∅: every edge corrupted), CPR = ∫ f dp and
CMD = ∫ |1 − f| dp by the trapezoid rule: the node-level ablation audit's definitions
(``circuits.faithfulness``, ``circuits.curve_area``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from faithful_train.errors import UnknownNameError
from faithful_train.functional.circuits import curve_area, faithfulness
from faithful_train.intervene.edges import Record, graph_forward, head_outputs, parts_of
from faithful_train.intervene.graph import Graph
from faithful_train.modeling.interface import hidden_size
from faithful_train.tasks.batch import answer_positions

METHODS = ("eap", "eap-ig-inputs", "eap-ig-activations")
ABLATIONS = ("patch", "mean", "zero")
MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
MEMORY_BUDGET = 1 << 30
# exact runs: chunks small enough to stay in cache (each variant's update touches every sender
# difference; on a 2-core CPU 32 MiB chunks ran 2.6x faster than 1 GiB ones)
EXACT_BUDGET = 1 << 25

Batch = Mapping[str, Tensor]
# (V, B, vocab) first-answer logits of V runs -> (V, B) metric per example (higher: more like clean)
MetricFn = Callable[[Tensor], Tensor]


def check(kind: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise UnknownNameError(kind, value, choices)
    return value


def _rows(model: nn.Module, batch: Batch, graph: Graph, wide: bool) -> int:
    """Bytes one variant of ``batch`` takes in an edge-level forward (an estimate)."""
    B, T = batch["input_ids"].shape
    width = hidden_size(model) or 1024  # a model that does not say: assume a wide one
    per_layer = 3 * graph.n_heads * 3 + 24  # split inputs, their norms, projections; the rest
    return B * T * width * 4 * (graph.n_layers * per_layer + (graph.n_senders * 3 if wide else 4))


def _chunks(count: int, row_bytes: int, budget: int | None) -> list[range]:
    step = max(1, min(count, (MEMORY_BUDGET if budget is None else budget) // max(1, row_bytes)))
    return [range(first, min(count, first + step)) for first in range(0, count, step)]


def record(model: nn.Module, batch: Batch) -> tuple[Tensor, Record]:
    """``(B, P, vocab)`` logits at the answer positions and the senders of a plain run."""
    logits, kept = graph_forward(
        model, batch["input_ids"], batch.get("attention_mask"), answer_positions(batch), record=True
    )
    return logits, kept


def corrupt_record(kind: str, clean: Record, corrupted: Record | None, attention_mask: Tensor | None) -> Record:
    """The senders' replacement values: the corrupted run's (``patch``), the clean batch's mean
    over real tokens (``mean``, shape ``(1, 1, ...)``), or zeros."""
    check("edge ablation", kind, ABLATIONS)
    if kind == "patch":
        if corrupted is None:
            raise ValueError("patch ablation needs the corrupted run's senders")
        return corrupted
    if kind == "zero":
        return clean.map(lambda t: torch.zeros_like(t[:1, :1]))
    real = torch.ones(clean.input.shape[:2], device=clean.input.device) if attention_mask is None else attention_mask
    real = real.float()

    def mean(t: Tensor) -> Tensor:
        w = real.view(*real.shape, *([1] * (t.dim() - 2)))
        return ((t.float() * w).sum((0, 1)) / w.sum((0, 1)).clamp_min(1)).to(t.dtype)[None, None]

    return clean.map(mean)


def circuit_logits(
    model: nn.Module,
    batch: Batch,
    missing: Tensor,
    corrupt: Tensor,
    memory_budget: int | None = None,
    clean: Record | None = None,
) -> Tensor:
    """``(K, B, vocab)`` first-answer logits of ``K`` circuits: ``missing (K, S, R)`` 1 on the
    edges each leaves out, carrying ``corrupt (1 or B, 1 or T, S, D)``; chunked to the budget.

    Variants are grouped by the first block any of their missing edges enters, and each group
    resumes there from the clean run's senders (``clean``, recorded here if not given): a
    knockout of an edge into block ``L`` runs blocks ``L`` and up only."""
    parts = parts_of(model)
    graph = Graph(parts.n_layers, parts.n_heads)
    B = batch["input_ids"].shape[0]
    read = answer_positions(batch)[:, :1]
    entered = missing.bool().any(1)  # (K, R)
    layers = [graph.receiver_layer(int(r[0])) if len(r) else graph.n_layers for r in map(torch.nonzero, entered)]
    if clean is None and any(layers):
        with torch.no_grad():
            clean = record(model, batch)[1]
    out: list[Tensor | None] = [None] * missing.shape[0]
    for layer in sorted(set(layers)):
        group = [k for k, at in enumerate(layers) if at == layer]
        budget = EXACT_BUDGET if memory_budget is None else memory_budget
        for chunk in _chunks(len(group), _rows(model, batch, graph, wide=True), budget):
            chosen = group[chunk.start : chunk.stop]
            logits, _ = graph_forward(
                model,
                batch["input_ids"],
                batch.get("attention_mask"),
                read,
                missing=missing[chosen].to(corrupt.device),
                corrupt=corrupt,
                variants=len(chosen),
                resume=(layer, clean) if layer > 0 else None,
            )
            for k, rows in zip(chosen, logits[:, 0].view(len(chosen), B, -1)):
                out[k] = rows
    return torch.stack(out)


def knockouts(graph: Graph, edges: Sequence[tuple[int, int]], base: Tensor | None = None) -> Tensor:
    """``(E, S, R)``: ``base`` (default: no edge missing) with each edge of ``edges`` also missing."""
    base = torch.zeros(graph.n_senders, graph.n_receivers) if base is None else base.float()
    out = base.expand(len(edges), *base.shape).clone()
    for i, (s, r) in enumerate(edges):
        out[i, s, r] = 1.0
    return out


def circuit_missing(graph: Graph, circuits: Sequence[Tensor]) -> Tensor:
    """``(K, S, R)`` missing masks of circuits given as edge masks (real edges outside them)."""
    return torch.stack([(graph.real & ~c.bool()).float() for c in circuits])


# -- attribution ---------------------------------------------------------------------------------


class _ScoreAccumulator:
    """Scores ``(S, R)`` accumulated as the backward reaches each receiver group: the summed
    gradient at the group's inputs meets the sender differences of every earlier block."""

    def __init__(self, model: nn.Module, delta: Record, variants: int):
        self.parts = parts_of(model)
        self.graph = Graph(self.parts.n_layers, self.parts.n_heads)
        self.delta, self.variants = delta, variants
        self.scores = torch.zeros(self.graph.n_senders, self.graph.n_receivers, dtype=torch.float64)

    def __call__(self, layer: int, kind: str, inputs: Tensor) -> None:
        if inputs.requires_grad:
            inputs.register_hook(lambda grad, first=0: self._add(layer, kind, grad, first))

    def _add(self, layer: int, kind: str, grad: Tensor, first: int = 0) -> None:
        """Scores of the receivers ``first, first + 1, ...`` of the group from their input gradients."""
        graph, H = self.graph, self.graph.n_heads
        K = self.variants
        grad = grad.detach().float()
        grad = grad.view(K, -1, *grad.shape[1:]).sum(0)  # (B, T, R, D): same differences for every variant
        if kind == "logits":
            start, blocks, own_heads = graph.n_receivers - 1, graph.n_layers, False
        else:
            start = graph.receiver_index(f"a{layer}.h0", "q") + (3 * H if kind == "mlp" else 0)
            blocks, own_heads = layer, kind == "mlp"
        cols = slice(start + first, start + first + grad.shape[2])
        delta = self.delta
        rows = []
        rows.append(torch.einsum("btd,btrd->r", delta.input.float().expand_as(grad[:, :, 0]), grad)[None])
        for j in range(blocks + (1 if own_heads else 0)):
            heads = head_outputs(self.parts, j, delta.z[j].float()).expand(*grad.shape[:2], -1, -1)
            rows.append(torch.einsum("bthd,btrd->hr", heads, grad))
            if j < blocks:
                rows.append(torch.einsum("btd,btrd->r", delta.mlp[j].float().expand_as(grad[:, :, 0]), grad)[None])
        block = torch.cat(rows)
        self.scores[: block.shape[0], cols] += block.double().cpu()


def edge_scores(
    model: nn.Module,
    batch: Batch,
    metric: MetricFn,
    method: str = "eap-ig-inputs",
    steps: int = 5,
    ablation: str = "patch",
    corrupted: Batch | None = None,
    memory_budget: int | None = None,
    senders: tuple[Record, Record] | None = None,
) -> Tensor:
    """``(S, R)`` edge scores summed over ``batch``'s examples (divide by their count for the mean),
    estimating ``m(M \\ {edge}) − m(M)``; non-edges are 0. ``corrupted``: the corrupted inputs
    (``patch``); ``metric`` maps first-answer logits ``(V, B, vocab)`` to ``(V, B)``.
    ``senders``: the clean run's senders and their replacement values (``corrupt_record``), when
    the caller has them already; recorded here otherwise."""
    check("edge attribution method", method, METHODS)
    check("edge ablation", ablation, ABLATIONS)
    if method == "eap-ig-inputs" and ablation != "patch":
        raise ValueError("eap-ig-inputs interpolates between corrupted and clean inputs: ablation must be patch")
    graph = Graph(parts_of(model).n_layers, parts_of(model).n_heads)
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    read = answer_positions(batch)[:, :1]
    if senders is not None:
        clean, bad = senders
    else:
        with torch.no_grad():
            _, clean = record(model, batch)
            bad = None
            if ablation == "patch":
                if corrupted is None:
                    raise ValueError("patch ablation needs corrupted inputs")
                bad = graph_forward(model, corrupted["input_ids"], corrupted.get("attention_mask"), read, record=True)[
                    1
                ]
            bad = corrupt_record(ablation, clean, bad, mask)
    delta = bad.minus(clean)
    if method == "eap":
        groups, alphas = [None], [None]
    elif method == "eap-ig-inputs":
        groups, alphas = ["input"] * steps, [k / steps for k in range(steps)]
    else:
        slots = ["input"] + [f"{x}{layer}" for layer in range(graph.n_layers) for x in "am"]
        groups = [slot for slot in slots for _ in range(steps)]
        alphas = [k / steps for _ in slots for k in range(1, steps + 1)]
    total = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.float64)
    B = ids.shape[0]
    with torch.enable_grad():
        for chunk in _chunks(len(groups), _rows(model, batch, graph, wide=False) * 2, memory_budget):
            accumulate = _ScoreAccumulator(model, delta, len(chunk))
            edit = _Interpolation([groups[i] for i in chunk], [alphas[i] for i in chunk], clean, bad, B)
            logits, _ = graph_forward(
                model, ids, mask, read, edit_sender=edit.apply, on_receivers=accumulate, variants=len(chunk)
            )
            value = metric(logits[:, 0].view(len(chunk), B, -1)).sum()
            torch.autograd.grad(value, [edit.leaf])
            total += accumulate.scores
    return total / len(groups)


class _Interpolation:
    """Sender edits of attribution variants: variant ``v`` sets slot ``groups[v]`` to
    ``α a(clean) + (1 − α) a(corrupt)`` (``α = alphas[v]``); the input is always a leaf the
    backward is asked for, so every receiver's gradient is computed and nothing else."""

    def __init__(self, groups: list, alphas: list, clean: Record, bad: Record, rows: int):
        self.groups, self.alphas, self.clean, self.bad, self.rows = groups, alphas, clean, bad, rows
        self.leaf: Tensor | None = None

    def _values(self, slot: str) -> tuple[Tensor, Tensor]:
        if slot == "input":
            return self.clean.input, self.bad.input
        layer = int(slot[1:])
        pick = (lambda r: r.z[layer]) if slot[0] == "a" else (lambda r: r.mlp[layer])
        return pick(self.clean), pick(self.bad)

    def apply(self, slot: str, out: Tensor) -> Tensor:
        chosen = [v for v, g in enumerate(self.groups) if g == slot]
        if chosen:
            clean, bad = self._values(slot)
            parts = list(out.detach().split(self.rows) if slot == "input" else out.split(self.rows))
            for v in chosen:
                a = self.alphas[v]
                parts[v] = (a * clean + (1 - a) * bad.expand_as(clean)).to(out.dtype)
            out = torch.cat(parts)
        if slot == "input":
            out = out.detach().requires_grad_(True)
            self.leaf = out
        return out


# -- MIB's curve -----------------------------------------------------------------------------------


def curve_circuits(graph: Graph, scores: Tensor, fractions: Sequence[float] = MIB_FRACTIONS) -> list[Tensor]:
    """The pruned circuits of the top ``⌈p·N⌉`` edges by ``|score|``, for each fraction ``p``."""
    return [graph.top(scores, max(1, math.ceil(p * graph.n_edges - 1e-9))) for p in fractions]


def mib_measures(
    fractions: Sequence[float], circuit_values: Sequence[float], empty: float, full: float
) -> dict[str, float | list[float]]:
    """Faithfulness per fraction, CPR, CMD and the smallest fraction reaching 0.8 (NaN if none)."""
    f = [float(faithfulness(v, empty, full)) for v in circuit_values]
    reach = [p for p, v in zip(fractions, f) if v >= 0.8]
    return {
        "faithfulness": f,
        "cpr": curve_area(list(fractions), f),
        "cmd": curve_area(list(fractions), [abs(1 - v) for v in f]),
        "fraction_at_0.8": reach[0] if reach else float("nan"),
    }
