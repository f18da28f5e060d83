"""Activation patching and attribution patching (AtP): which places in a model carry the difference
between a clean input and a corrupted one? Pure tensor functions; the ``patching`` audit runs them.

A *cell* is one place to patch: a component of block ``i`` at one position (or the tokens of a
span), ``resid_pre``, ``attn.out``, ``mlp.out``, or one head ``h`` of ``attn.heads`` (the per-head
outputs before the output projection, TransformerLens's ``hook_z``). Positions are ints (counted
from each row's first real token; negative ones back from the end of its prompt) or per-example
``PositionSpec``s (a span, the answer position and an offset), resolved on each batch, so clean
and corrupted rows may be padded differently.

Exact patching (Meng et al. 2022; Wang et al. 2022; TransformerLens's ``patching`` module) runs a
*base* input with the cell's entries replaced by their values on a *source* input:

    denoising (default)  base = corrupted, source = clean     which cells restore the clean answer
    noising              base = clean,     source = corrupted which cells break it

The cells of each block are the variants of one engine call (``engine.run_variants``: stacked,
resumed at that block from the base run, chunked to a memory budget), so a sweep makes one call
per block, not one forward per cell, and a cell of block ``i`` runs only blocks ``i`` and up.
The metric ``m`` is per example and scores the clean answer (``circuits.answer_metric``:
``logit_diff``, ``prob``, ``acc``, ``kl`` to the clean run's distribution). The normalised score
(TransformerLens's tutorials; Wang et al. 2022), on the metric averaged over the examples:

    score(c) = (m(patched_c) - m(corrupted)) / (m(clean) - m(corrupted))

denoising: 1 the cell alone restores the clean behaviour, 0 no effect; noising: 1 no effect, 0
the cell alone breaks it. NaN where clean and corrupted agree (nothing to explain).

AtP (Nanda 2023, "Attribution patching"; Kramár et al. 2024, "AtP*") estimates every cell's
effect at once from one forward of each input and one backward of the metric on the base run,
to first order:

    m(patched_c) - m(base) ≈ Σ_{e in c} (a_source[e] - a_base[e]) · ∂m/∂a[e] |_base

It is exact where ``m`` is linear in the patched activation, and misses where attention
saturates; with ``kl`` under noising the gradient at the clean run is 0 (KL's minimum), so
every estimate is 0. Cells are ranked by the magnitude of their effect, ``|m(patched) - m(base)|``
(exact or estimated), never by its sign.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from faithful_train.errors import ConfigError, UnknownNameError
from faithful_train.functional.circuits import (
    AblationValues,
    Knockout,
    answer_metric,
    check_choice,
    circuits_by_score,
    curve_area,
    faithfulness,
    knockout_logits,
)
from faithful_train.functional.ranking import spearman, top_k_members
from faithful_train.intervene.engine import VariantEdit, plan_resume, run_variants
from faithful_train.intervene.sites import PositionSpec, SiteRef, hooked, resolve_positions, run_with
from faithful_train.modeling.interface import n_heads, n_layers
from faithful_train.tasks.batch import answer_positions, first_answer_logits, gather_positions

COMPONENTS = ("resid_pre", "attn.out", "mlp.out", "heads")
DIRECTIONS = ("denoising", "noising")
_SITE = {"resid_pre": "resid_pre", "attn.out": "attn.out", "mlp.out": "mlp.out", "heads": "attn.heads"}

Position = int | PositionSpec
Batch = Mapping[str, Tensor]
# (V, B, vocab) first-answer logits of V runs, the clean run's (B, vocab) -> (V, B) per example
MetricFn = Callable[[Tensor, Tensor], Tensor]


def corrupted_sources(task: Any, data: Batch, variables: Sequence[str], seed: int, owner: str) -> Batch:
    """The corrupted input of each row of ``data``: the sources of the task's interchange pairs
    for ``variables`` (seeded), which must be one input for all of them."""
    pairs = task.interchange_pairs(data, variables, torch.Generator().manual_seed(seed + 1))
    sources = list({id(s): s for s in pairs.sources.values()}.values())
    if len(sources) != 1:
        raise ConfigError(
            f"{owner}: task {task.name!r} gives different source inputs for "
            f"{', '.join(variables)}; name one variable (corrupt: [<variable>])"
        )
    return sources[0]


def position_label(position: Position) -> str:
    """``3``, ``-1``, ``answer``, ``answer-1``, ``<span>.<first|last|all>``."""
    if isinstance(position, PositionSpec):
        spec = position.to_spec()
        return spec if isinstance(spec, str) else f"{spec['span']}.{spec['token']}"
    return str(position)


@dataclass(frozen=True)
class Cell:
    """One place to patch: ``component`` of block ``layer`` at ``position`` (one head of ``heads``)."""

    component: str
    layer: int
    position: Position
    head: int | None = None

    @property
    def site(self) -> str:
        return f"blocks.{self.layer}.{_SITE[self.component]}"

    @property
    def ref(self) -> SiteRef:
        positions = self.position if isinstance(self.position, PositionSpec) else (self.position,)
        return SiteRef(self.site, positions, None if self.head is None else (self.head,))

    @property
    def name(self) -> str:
        """``<component>/layer<i>/pos<p>[/head<h>]`` (figure names)."""
        name = f"{self.component}/layer{self.layer}/pos{position_label(self.position)}"
        return name if self.head is None else f"{name}/head{self.head}"


def parse_positions(specs: Sequence[Any], owner: str = "patching") -> tuple[Position, ...]:
    """Config positions -> ints and ``PositionSpec``s (``answer``, ``answer-1``, ``{span, token}``)."""
    if isinstance(specs, (str, int, Mapping)):
        specs = [specs]
    out: list[Position] = []
    for spec in specs:
        if isinstance(spec, PositionSpec) or (isinstance(spec, int) and not isinstance(spec, bool)):
            out.append(spec)
        elif isinstance(spec, (str, Mapping)):
            out.append(PositionSpec.parse(spec))
        else:
            raise ConfigError(
                f"{owner}: position {spec!r} is not an int, 'answer', 'answer-<k>' or "
                f"{{span: <name>, token: first|last|all}}"
            )
    if not out:
        raise ConfigError(f"{owner}: positions is empty; give at least one position")
    return tuple(dict.fromkeys(out))


def check_components(components: Sequence[str] | str) -> tuple[str, ...]:
    """Component names (one, or a list), each one of ``COMPONENTS``, without repeats."""
    components = (components,) if isinstance(components, str) else tuple(components)
    if not components:
        raise ConfigError(f"patching: components is empty; choose from {', '.join(COMPONENTS)}")
    for component in components:
        if component not in COMPONENTS:
            raise UnknownNameError("patching component", component, COMPONENTS)
    return tuple(dict.fromkeys(components))


def patching_cells(model: nn.Module, components: Sequence[str] | str, positions: Sequence[Any]) -> list[Cell]:
    """The cells of a sweep: component × layer × position (× head for ``heads``), in that order."""
    components = check_components(components)
    layers, heads = n_layers(model), n_heads(model)
    if layers is None:
        raise ConfigError("patching needs a model that names its blocks (n_layers)")
    if "heads" in components and heads is None:
        raise ConfigError("patching component 'heads' needs a model that says its number of heads (n_heads)")
    positions = parse_positions(positions)
    cells = []
    for component in components:
        for layer in range(layers):
            for position in positions:
                if component == "heads":
                    cells += [Cell(component, layer, position, h) for h in range(heads)]
                else:
                    cells.append(Cell(component, layer, position))
    return cells


def cell_positions(position: Position, batch: Batch) -> tuple[Tensor, Tensor]:
    """``(positions (B, P), valid (B, P))`` of ``position`` in each row: valid where the position
    lies inside the row and on a real token (not padding); invalid entries are clamped in range
    and never patched."""
    ref = SiteRef("", position if isinstance(position, PositionSpec) else (position,))
    positions = resolve_positions(ref, batch)
    T = batch["input_ids"].shape[1]
    valid = (positions >= 0) & (positions < T)
    positions = positions.clamp(0, T - 1)
    mask = batch.get("attention_mask")
    if mask is not None:
        valid = valid & mask.gather(1, positions).bool()
    return positions, valid


def answer_metric_fn(kind: str, labels: Tensor, answer_tokens: Sequence[int] | None = None) -> MetricFn:
    """``circuits.answer_metric`` of ``kind`` for the clean answer ``labels (B,)`` (``kl``: to the
    clean run's distribution)."""
    check_choice("patching metric", kind, ("logit_diff", "prob", "acc", "kl"))
    return lambda logits, clean: answer_metric(kind, logits, labels, clean, answer_tokens)


def normalised_score(patched: Tensor | float, clean: Tensor | float, corrupted: Tensor | float) -> Tensor:
    """``(m(patched) - m(corrupted)) / (m(clean) - m(corrupted))``, float64, NaN where clean and
    corrupted agree (TransformerLens tutorials; Wang et al. 2022)."""
    return faithfulness(patched, corrupted, clean)


@dataclass
class PatchResult:
    """Per-example metric values: ``values (K, B)`` of each cell's patched run (AtP: the base
    run's metric plus the cell's estimated effect), ``clean (B,)``, ``corrupted (B,)``."""

    values: Tensor
    clean: Tensor
    corrupted: Tensor
    direction: str = "denoising"

    @property
    def base(self) -> Tensor:
        """The metric of the run that is patched (corrupted when denoising)."""
        return self.corrupted if self.direction == "denoising" else self.clean

    def effects(self) -> Tensor:
        """``(K, B)`` ``m(patched) - m(base)``."""
        return self.values - self.base[None]

    def scores(self) -> Tensor:
        """``(K,)`` normalised scores of the example-averaged metric."""
        return normalised_score(
            self.values.double().mean(1), self.clean.double().mean(), self.corrupted.double().mean()
        )


def _check_direction(direction: str) -> str:
    if direction not in DIRECTIONS:
        raise UnknownNameError("patching direction", direction, DIRECTIONS)
    return direction


def _forward(
    model: nn.Module, batch: Batch, sites: Sequence[str], edits: Mapping | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """``(first-answer logits (B, vocab), recorded activations)`` of one full forward."""
    with hooked(model, record=sites, edits=edits) as cache:
        logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))
    return first_answer_logits(gather_positions(logits, answer_positions(batch))), cache


def _roles(clean: Batch, corrupted: Batch, direction: str) -> tuple[Batch, Batch]:
    """``(base, source)``: the batch that is patched and the one its values come from."""
    return (corrupted, clean) if _check_direction(direction) == "denoising" else (clean, corrupted)


def patch_edits(
    cells: Sequence[Cell], base: Batch, source: Batch, source_cache: Mapping[str, Tensor]
) -> dict[str, VariantEdit]:
    """Engine edits: variant ``k`` takes cell ``k``'s entries from ``source_cache`` (positions
    resolved per row in ``source``) into the base rows (positions resolved in ``base``)."""
    B = base["input_ids"].shape[0]
    where: dict[Position, tuple[Tensor, Tensor, Tensor]] = {}
    by_site: dict[str, list[tuple[int, Cell]]] = defaultdict(list)
    for k, cell in enumerate(cells):
        by_site[cell.site].append((k, cell))
        if cell.position not in where:
            to, ok_to = cell_positions(cell.position, base)
            frm, ok_from = cell_positions(cell.position, source)
            if to.shape != frm.shape:
                raise ConfigError(
                    f"positions {position_label(cell.position)!r}: {to.shape[1]} tokens in the base rows, "
                    f"{frm.shape[1]} in the source rows"
                )
            where[cell.position] = (to, frm, ok_to & ok_from)
    edits = {}
    for site, members in by_site.items():
        variants, rows, positions, heads, values = [], [], [], [], []
        entries: dict[Position, tuple[Tensor, Tensor, Tensor]] = {}
        for k, cell in members:
            if cell.position not in entries:
                to, frm, ok = where[cell.position]
                row, slot = ok.nonzero(as_tuple=True)  # the (row, position) pairs this cell patches
                entries[cell.position] = (row, to[row, slot], gather_positions(source_cache[site], frm)[row, slot])
            row, at, taken = entries[cell.position]  # taken: (n, ...) the source's entries
            if cell.head is not None:
                taken = taken[:, cell.head]
            variants.append(torch.full_like(row, k))
            rows.append(row)
            positions.append(at)
            heads.append(torch.full_like(row, -1 if cell.head is None else cell.head))
            values.append(taken)
        edits[site] = _replace_entries(
            torch.cat(variants), torch.cat(rows), torch.cat(positions), torch.cat(heads), torch.cat(values), B
        )
    return edits


def _replace_entries(
    variant: Tensor, row: Tensor, position: Tensor, head: Tensor, values: Tensor, B: int
) -> VariantEdit:
    """A ``VariantEdit`` writing ``values[e]`` at ``(row[e], position[e][, head[e]])`` of variant
    ``variant[e]``'s rows, for every entry ``e`` whose variant is in the chunk."""
    variant_cpu = variant.cpu()
    per_head = bool((head >= 0).any())

    def apply(t: Tensor, variants: range) -> Tensor:
        chosen = ((variant_cpu >= variants.start) & (variant_cpu < variants.stop)).nonzero(as_tuple=True)[0]
        if not len(chosen):
            return t
        chosen = chosen.to(variant.device)
        index = ((variant[chosen] - variants.start) * B + row[chosen], position[chosen])
        if per_head:
            index += (head[chosen],)
        return t.index_put(index, values[chosen].to(t.dtype))

    return apply


def activation_patching(
    model: nn.Module,
    clean_batch: Batch,
    corrupted_batch: Batch,
    cells: Sequence[Cell],
    metric_fn: MetricFn,
    direction: str = "denoising",
    memory_budget: int | None = None,
) -> PatchResult:
    """Exact patching of every cell (see the module doc), batched through the engine: the cells
    of each block are the variants of one ``run_variants`` call, resumed at that block from the
    base run. A cell past ``resid_pre`` of the last block at positions the metric does not read
    changes nothing (those entries only reach their own position's logits: the premise of the
    engine's narrowed last block) and is not run. Runs with or without gradients, as the
    caller's context says."""
    base, source = _roles(clean_batch, corrupted_batch, direction)
    sites = sorted({cell.site for cell in cells})
    layers = n_layers(model)
    starts = sorted({cell.layer for cell in cells})
    record = sites + [f"blocks.{i}.resid_pre" for i in starts if f"blocks.{i}.resid_pre" not in sites]
    clean_logits, clean_cache = _forward(model, clean_batch, record)
    corrupted_logits, corrupted_cache = _forward(model, corrupted_batch, record)
    base_cache, source_cache = (
        (corrupted_cache, clean_cache) if base is corrupted_batch else (clean_cache, corrupted_cache)
    )
    reference = clean_logits.detach()
    base_logits = corrupted_logits if base is corrupted_batch else clean_logits
    read = answer_positions(base)[:, :1]
    base_metric = metric_fn(base_logits[None], reference)[0]
    values = base_metric.expand(len(cells), -1).clone()
    for layer in starts:
        group = [k for k, cell in enumerate(cells) if cell.layer == layer]
        if layers is not None and layer == layers - 1:
            group = [k for k in group if cells[k].component == "resid_pre" or _reads(cells[k], base, read)]
        if not group:
            continue
        edits = patch_edits([cells[k] for k in group], base, source, source_cache)
        logits = run_variants(model, base, len(group), edits, read=read, cache=base_cache, memory_budget=memory_budget)
        values[group] = metric_fn(first_answer_logits(logits).reshape(len(group), read.shape[0], -1), reference).to(
            values.dtype
        )
    clean = metric_fn(clean_logits[None], reference)[0]
    corrupted = metric_fn(corrupted_logits[None], reference)[0]
    return PatchResult(values, clean, corrupted, direction)


def _reads(cell: Cell, base: Batch, read: Tensor) -> bool:
    """Whether the cell lies, in some row, at a position the metric reads."""
    positions, valid = cell_positions(cell.position, base)
    return bool((valid & (positions[:, :, None] == read[:, None, :]).any(-1)).any())


def _leaf(t: Tensor) -> Tensor:
    """An activation the gradient can be taken at even when the weights are frozen."""
    return t if t.requires_grad else t.detach().requires_grad_()


def attribution_patching(
    model: nn.Module,
    clean_batch: Batch,
    corrupted_batch: Batch,
    cells: Sequence[Cell],
    metric_fn: MetricFn,
    direction: str = "denoising",
) -> PatchResult:
    """AtP estimates of every cell (see the module doc): one forward of each input and one
    backward of ``Σ_b m_b`` on the base run. ``values`` are ``m(base) + estimate``, detached;
    nothing accumulates in the weights' ``.grad``."""
    base, source = _roles(clean_batch, corrupted_batch, direction)
    sites = sorted({cell.site for cell in cells})
    with torch.no_grad():
        source_logits, source_cache = _forward(model, source, sites)
    with torch.enable_grad():
        base_logits, base_cache = _forward(model, base, sites, edits={site: _leaf for site in sites})
        reference = (base_logits if base is clean_batch else source_logits).detach()
        metric = metric_fn(base_logits[None], reference)[0]
        grads = torch.autograd.grad(metric.sum(), [base_cache[site] for site in sites], allow_unused=True)
    grads = {site: torch.zeros_like(base_cache[site]) if g is None else g for site, g in zip(sites, grads)}
    metric = metric.detach()
    contribution: dict[tuple[str, Position], Tensor] = {}  # (B,) or (B, H) per site and position
    estimates = []
    for cell in cells:
        key = (cell.site, cell.position)
        if key not in contribution:
            to, ok_to = cell_positions(cell.position, base)
            frm, ok_from = cell_positions(cell.position, source)
            delta = gather_positions(source_cache[cell.site].detach(), frm) - gather_positions(
                base_cache[cell.site].detach(), to
            )
            product = (delta * gather_positions(grads[cell.site], to)).sum(-1)  # (B, P) or (B, P, H)
            valid = (ok_to & ok_from).view(*ok_to.shape, *([1] * (product.dim() - 2)))
            contribution[key] = (product * valid).sum(1)
        value = contribution[key]
        estimates.append(value if cell.head is None else value[:, cell.head])
    B = base["input_ids"].shape[0]
    effects = torch.stack(estimates) if estimates else torch.zeros(0, B, device=metric.device)
    other = metric_fn(source_logits[None], reference)[0]
    clean, corrupted = (metric, other) if base is clean_batch else (other, metric)
    return PatchResult(metric[None] + effects.to(metric.dtype), clean, corrupted, direction)


# --- ranking and verification ---


def top_cells(effects: Tensor, k: int) -> list[int]:
    """Indices of the ``k`` cells with the largest ``|effect|`` (ties: the earlier cell first)."""
    order = torch.sort(effects.abs(), descending=True, stable=True).indices
    return order[:k].tolist()


def missed_share(exact: Tensor, estimated: Tensor, k: int) -> float:
    """The share of the exact top-``k`` cells (by ``|effect|``) that the estimate's top-``k`` misses."""
    k = min(k, exact.numel())
    if k < 1:
        return float("nan")
    ours = top_k_members(estimated.abs()[None], k)[0]
    truth = top_k_members(exact.abs()[None], k)[0]
    return float((truth & ~ours).sum()) / k


def rank_agreement(exact: Tensor, estimated: Tensor) -> float:
    """Spearman between the signed effects of the same cells (``ranking.spearman``; 0 if constant)."""
    if exact.numel() < 2:
        return float("nan")
    return float(spearman(exact.double()[None], estimated.double()[None])[0])


# --- circuits from AtP node scores ---


def node_effects(cells: Sequence[Cell], effects: Tensor, universe: Sequence[SiteRef]) -> Tensor:
    """``(N,)`` per node of a circuit universe (``circuits.components``: heads and MLPs), the sum of
    the estimated effects of its cells over positions: AtP of patching the node at all of them."""
    index = {
        (ref.name, None if ref.heads is None else ref.heads[0]): i
        for i, ref in enumerate(universe)
        if ref.heads is None or len(ref.heads) == 1
    }
    out = torch.zeros(len(universe), dtype=torch.float64)
    for cell, effect in zip(cells, effects.tolist()):
        i = index.get((cell.site, cell.head))
        if i is not None:
            out[i] += effect
    return out


def circuit_knockouts(universe: Sequence[SiteRef], scores: Sequence[float], sizes: Sequence[int]) -> list[Knockout]:
    """For each size ``k``: the top-``k`` nodes by ``scores`` kept, the rest of the universe ablated
    (size 0 is the empty circuit, size N the full model)."""
    return [Knockout(tuple(universe), keep=circuit) for circuit in circuits_by_score(universe, scores, sizes)]


def circuit_metric(
    model: nn.Module,
    batch: Batch,
    knockouts: Sequence[Knockout],
    ablation: str,
    metric_fn: MetricFn,
    memory_budget: int | None = None,
) -> Tensor:
    """``(V, B)`` metric of each knockout on ``batch`` (mean ablations: means over the batch's real
    tokens; ``kl`` to the full model's distribution), one engine call."""
    sites = sorted({ref.name for k in knockouts for ref in (*k.ablate, *k.keep)})
    plan = plan_resume(model, sites)
    logits, cache = run_with(
        model,
        batch["input_ids"],
        record=sites + ([plan.site] if plan else []),
        attention_mask=batch.get("attention_mask"),
    )
    clean = first_answer_logits(gather_positions(logits, answer_positions(batch))).detach()
    values = AblationValues.from_reference(ablation, {s: cache[s] for s in sites}, batch.get("attention_mask"))
    return metric_fn(knockout_logits(model, batch, knockouts, values, clean=cache, memory_budget=memory_budget), clean)


def cpr_cmd(sizes: Sequence[int], n_nodes: int, means: Sequence[float]) -> tuple[float, float]:
    """MIB's CPR ``∫ f(C_k) dk`` and CMD ``∫ |1 - f(C_k)| dk`` over the circuit fraction (Mueller
    et al. 2025; ``circuits.faithfulness``, trapezoid rule), from the example-averaged metric of
    circuits of ``sizes`` (the first size 0, the last the whole universe)."""
    if sizes[0] != 0 or sizes[-1] != n_nodes:
        raise ValueError(f"circuit sizes must run from 0 to {n_nodes}, got {list(sizes)}")
    f = faithfulness(torch.as_tensor(means, dtype=torch.float64), means[0], means[-1])
    fractions = [k / n_nodes for k in sizes]
    return curve_area(fractions, f.tolist()), curve_area(fractions, (1 - f).abs().tolist())
