"""Circuits: sets of model components, their ablation, and the measures of how well they explain.

A *node* is a ``SiteRef``: a site narrowed to heads, positions (ints, a span or the answer
position) and dims. The *universe* is the set of nodes a circuit is chosen from (default: every
attention head and every MLP of every block, at every position). A ``Knockout`` is one variant of
a batch: it ablates some nodes except others, so

    the full model M          Knockout(())
    the empty circuit         Knockout(universe)
    the circuit C alone       Knockout(universe, keep=C)     (its complement ablated)
    M without C               Knockout(C)

and each runs as one variant of the engine (``engine.run_variants``), all in one forward.

Ablation (what an ablated entry becomes): ``zero``; ``mean`` over a reference set's examples
and real tokens; ``mean_per_position``, per position; ``resample``, the clean activation of
another example of the batch (row ``i`` takes row ``i - 1``'s).

Metrics ``m`` per example, higher is better: ``logit_diff`` (the answer's logit minus the best
other answer's; Wang et al. 2022), ``prob`` (the answer's probability), ``acc`` (argmax over the
task's answers), ``kl`` (``-KL(M || variant)`` at the answer position, so ``m(M) = 0``).

Measures (MIB, Mueller et al. 2025; completeness and minimality, Wang et al. 2022):

    faithfulness f(C) = (m(C) - m(∅)) / (m(M) - m(∅))
    CPR = ∫ f(C_k) dk,  CMD = ∫ |1 - f(C_k)| dk   over circuits C_k of size k (as a fraction of
                                                  the universe), by the trapezoid rule
    completeness = max_K |m(C \\ K) - m(M \\ K)|   over sampled subsets K of C
    minimality(v) = |m(C) - m(C \\ {v})|           (Wang et al.'s with K = ∅)

each on the metric averaged over the audit set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from faithful_train.errors import ConfigError, UnknownNameError
from faithful_train.intervene.engine import VariantEdit, run_variants
from faithful_train.intervene.sites import PositionSpec, SiteRef, resolve_positions
from faithful_train.modeling.interface import n_heads, n_layers
from faithful_train.tasks.batch import first_answer_logits

ABLATIONS = ("zero", "mean", "mean_per_position", "resample")
METRICS = ("logit_diff", "prob", "acc", "kl")
GRANULARITIES = ("heads", "sublayers")


def check_choice(kind: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise UnknownNameError(kind, value, choices)
    return value


def components(model: nn.Module, granularity: str = "heads") -> list[SiteRef]:
    """The universe of a circuit on ``model``: per block, each attention head (``heads``) or the
    attention output (``sublayers``), then the MLP output."""
    check_choice("circuit granularity", granularity, GRANULARITIES)
    layers, heads = n_layers(model), n_heads(model)
    if layers is None or (granularity == "heads" and heads is None):
        raise ConfigError("a circuit's universe needs a model that names its blocks and heads (n_layers, n_heads)")
    out: list[SiteRef] = []
    for i in range(layers):
        if granularity == "heads":
            out += [SiteRef(f"blocks.{i}.attn.heads", heads=(h,)) for h in range(heads)]
        else:
            out.append(SiteRef(f"blocks.{i}.attn.out"))
        out.append(SiteRef(f"blocks.{i}.mlp.out"))
    return out


def node_label(ref: SiteRef) -> str:
    """A short, stable name: ``blocks.0.attn.heads.h1``, ``blocks.1.mlp.out@answer``, ``...:d0-4``."""
    label = ref.name
    if ref.heads is not None:
        label += ".h" + "+".join(str(h) for h in ref.heads)
    if ref.positions is not None:
        spec = ref.positions
        if isinstance(spec, PositionSpec):
            where = spec.to_spec()
            label += "@" + (where if isinstance(where, str) else f"{where['span']}.{where['token']}")
        else:
            label += "@" + "+".join(str(p) for p in spec)
    if ref.dims is not None:
        label += f":d{ref.dims[0]}-{ref.dims[1]}"
    return label


@dataclass(frozen=True)
class Knockout:
    """One variant: the nodes ``ablate`` ablated, except where a node of ``keep`` lies."""

    ablate: tuple[SiteRef, ...] = ()
    keep: tuple[SiteRef, ...] = ()


def node_mask(ref: SiteRef, shape: Sequence[int], batch: Mapping[str, Tensor]) -> Tensor:
    """``(1 or B, *shape[1:])`` True where ``ref`` selects in an activation of ``shape``: positions
    resolved per row where they depend on the row (spans, the answer position, padding)."""
    device = batch["input_ids"].device
    if ref.positions is None or (not ref.per_example and "attention_mask" not in batch):
        return ref.mask(shape, device)
    within = replace(ref, positions=None).mask(shape, device)
    positions = resolve_positions(ref, batch)
    rows = torch.zeros(positions.shape[0], shape[1], dtype=torch.bool, device=device).scatter_(1, positions, True)
    return within & rows.view(*rows.shape, *([1] * (len(shape) - 2)))


def knockout_masks(
    knockouts: Sequence[Knockout], site: str, shape: Sequence[int], batch: Mapping[str, Tensor]
) -> Tensor:
    """``(V, 1 or B, *shape[1:])``: where each knockout ablates ``site``."""
    masks = []
    for knockout in knockouts:
        mask = torch.zeros((1, *shape[1:]), dtype=torch.bool, device=batch["input_ids"].device)
        for ref in knockout.ablate:
            if ref.name == site:
                mask = mask | node_mask(ref, shape, batch)
        for ref in knockout.keep:
            if ref.name == site:
                mask = mask & ~node_mask(ref, shape, batch)
        masks.append(mask)
    rows = max(m.shape[0] for m in masks)
    return torch.stack([m.expand(rows, *m.shape[1:]) for m in masks])


class AblationValues:
    """What an ablated entry of each site becomes (``kind`` in ``ABLATIONS``)."""

    def __init__(self, kind: str, means: Mapping[str, Tensor] | None = None):
        self.kind = check_choice("ablation", kind, ABLATIONS)
        self.means = dict(means or {})

    @classmethod
    def from_reference(
        cls, kind: str, activations: Mapping[str, Tensor], attention_mask: Tensor | None = None
    ) -> AblationValues:
        """Means over a reference set's activations ``(N, T, ...)`` (real tokens only)."""
        check_choice("ablation", kind, ABLATIONS)
        if kind not in ("mean", "mean_per_position"):
            return cls(kind)
        means = {}
        for site, acts in activations.items():
            acts = acts.detach().float()
            real = torch.ones(acts.shape[:2], device=acts.device) if attention_mask is None else attention_mask.float()
            weights = real.view(*real.shape, *([1] * (acts.dim() - 2)))
            if kind == "mean":
                means[site] = ((acts * weights).sum((0, 1)) / weights.sum((0, 1)).clamp_min(1))[None, None]
            else:
                means[site] = ((acts * weights).sum(0) / weights.sum(0).clamp_min(1))[None]
        return cls(kind, means)

    def needs_clean(self) -> bool:
        """Whether the values come from the batch's own clean activations (``resample``)."""
        return self.kind == "resample"

    def at(self, site: str, clean: Tensor | None) -> Tensor:
        """The replacement for ablated entries of ``site``: a scalar, ``(1, 1 or T, ...)`` means,
        or ``(B, T, ...)`` resampled rows."""
        if self.kind == "zero":
            return torch.zeros(())
        if self.kind == "resample":
            if clean is None:
                raise ValueError(f"resample ablation of {site} needs its clean activation")
            return clean.detach().roll(1, dims=0)
        if site not in self.means:
            raise ValueError(f"no reference mean for site {site}")
        mean = self.means[site]
        if self.kind == "mean_per_position" and clean is not None:
            T = clean.shape[1]
            if mean.shape[1] < T:
                raise ConfigError(
                    f"mean_per_position ablation of {site}: the reference has {mean.shape[1]} positions, the batch {T}"
                )
            mean = mean[:, :T]
        return mean


def knockout_edits(
    knockouts: Sequence[Knockout],
    values: AblationValues,
    batch: Mapping[str, Tensor],
    clean: Mapping[str, Tensor] | None = None,
) -> dict[str, VariantEdit]:
    """Engine edits running each knockout as a variant (``clean``: the batch's clean activations
    at the ablated sites, needed for ``resample``)."""
    B = batch["input_ids"].shape[0]
    sites = sorted({ref.name for k in knockouts for ref in (*k.ablate, *k.keep)})
    clean = clean or {}
    edits = {}
    for site in sites:
        fill = values.at(site, clean.get(site))
        masks: dict[tuple, Tensor] = {}

        def apply(t: Tensor, variants: range, site: str = site, fill: Tensor = fill, masks: dict = masks) -> Tensor:
            key = tuple(t.shape[1:])
            if key not in masks:
                masks[key] = knockout_masks(knockouts, site, (B, *t.shape[1:]), batch)
            k = len(variants)
            mask = masks[key][variants.start : variants.stop]
            mask = mask.expand(k, B, *mask.shape[2:]).reshape(k * B, *mask.shape[2:])
            new = fill.to(t.device, t.dtype)
            if new.dim() and new.shape[0] == B and B > 1:
                new = new.repeat(k, *([1] * (new.dim() - 1)))
            return torch.where(mask, new, t)

        edits[site] = apply
    return edits


def knockout_logits(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    knockouts: Sequence[Knockout],
    values: AblationValues,
    clean: Mapping[str, Tensor] | None = None,
    memory_budget: int | None = None,
) -> Tensor:
    """``(V, B, vocab)`` first-answer-token logits of each knockout, batched through the engine
    (resumed from ``clean``'s residual where it holds one)."""
    B = batch["input_ids"].shape[0]
    edits = knockout_edits(knockouts, values, batch, clean)
    logits = run_variants(model, batch, len(knockouts), edits, cache=clean, memory_budget=memory_budget)
    return first_answer_logits(logits).reshape(len(knockouts), B, -1)


def answer_metric(
    kind: str,
    logits: Tensor,
    labels: Tensor,
    clean_logits: Tensor | None = None,
    answer_tokens: Sequence[int] | None = None,
) -> Tensor:
    """``(V, B)`` metric ``kind`` of answer logits ``(V, B, vocab)`` against ``labels (B,)``; ``kl``
    compares with ``clean_logits (B, vocab)``, the full model's. Higher is better for every kind."""
    check_choice("circuit metric", kind, METRICS)
    logits = logits.float()
    target = labels.expand(logits.shape[:-1])
    if kind == "kl":
        if clean_logits is None:
            raise ValueError("the kl metric needs the full model's logits")
        p = clean_logits.float().log_softmax(-1)
        return -(p.exp() * (p - logits.log_softmax(-1))).sum(-1)
    if kind == "prob":
        return logits.softmax(-1).gather(-1, target[..., None]).squeeze(-1)
    tokens = (
        torch.arange(logits.shape[-1], device=logits.device)
        if answer_tokens is None
        else torch.as_tensor(answer_tokens, device=logits.device)
    )
    candidates = logits[..., tokens]
    if kind == "acc":
        return (tokens[candidates.argmax(-1)] == target).float()
    correct = logits.gather(-1, target[..., None]).squeeze(-1)
    others = candidates.masked_fill(tokens == target[..., None], float("-inf"))
    return correct - others.max(-1).values


def faithfulness(circuit: Tensor | float, empty: Tensor | float, full: Tensor | float) -> Tensor:
    """MIB faithfulness ``(m(C) - m(∅)) / (m(M) - m(∅))`` (NaN where M and ∅ agree)."""
    circuit, empty, full = (torch.as_tensor(x, dtype=torch.float64) for x in (circuit, empty, full))
    gap = full - empty
    return torch.where(gap.abs() > 1e-12, (circuit - empty) / torch.where(gap == 0, 1.0, gap), torch.nan)


def curve_area(fractions: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoid area under ``values`` over ``fractions`` (sorted, in [0, 1])."""
    total = 0.0
    for (x0, y0), (x1, y1) in zip(zip(fractions, values), zip(fractions[1:], values[1:])):
        total += (x1 - x0) * (y0 + y1) / 2
    return total


def curve_sizes(n_nodes: int, max_points: int = 33) -> list[int]:
    """Circuit sizes for a CPR/CMD curve: every size for a small universe, else MIB's fractions
    (0.1% .. 100%) and an even grid, rounded up to whole nodes."""
    if n_nodes + 1 <= max_points:
        return list(range(n_nodes + 1))
    fractions = [0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
    fractions += [i / (max_points - len(fractions)) for i in range(1, max_points - len(fractions))]
    return sorted({min(n_nodes, int(-(-f * n_nodes // 1))) for f in fractions})


def circuits_by_score(
    universe: Sequence[SiteRef], scores: Sequence[float], sizes: Sequence[int]
) -> list[tuple[SiteRef, ...]]:
    """The top-``k`` nodes of ``universe`` by ``scores`` (highest first), for each ``k`` in ``sizes``."""
    order = sorted(range(len(universe)), key=lambda i: -scores[i])
    return [tuple(universe[i] for i in order[:k]) for k in sizes]


def parse_nodes(specs: Sequence, owner: str) -> tuple[SiteRef, ...]:
    """Circuit nodes from config: site names or ``{site, heads, positions, dims}`` mappings."""
    if not specs:
        raise ConfigError(f"{owner}: a circuit needs at least one node")
    return tuple(SiteRef.parse(spec) for spec in specs)
