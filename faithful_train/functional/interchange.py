"""Interchange interventions against a causal model: shared by the interchange objective and audit.

An *alignment* maps each high-level variable of a task's causal model to a (narrowed) site.
An interchange intervention on variable ``v`` runs the model on a base input with the
aligned site set to its value on a source input; the causal model predicts the output as
``task.counterfactual_labels(base, source, [v])``. Interchange-intervention accuracy (IIA,
Geiger et al. 2021/2022) is the fraction of (base, source) pairs where they agree.

Many interventions run in ONE batched forward: block ``k`` of a ``K * B`` batch carries the
``k``-th group of swaps (one variable, or all the strict resamples), and the forward resumes
at the first block any of them touches (the engine, ``engine.run_variants``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from faithful_train.errors import ConfigError, UnknownNameError
from faithful_train.functional.losses import answer_loss, exact_match
from faithful_train.intervene.engine import per_variant, run_variants
from faithful_train.intervene.interventions import interchange
from faithful_train.intervene.sites import Edit, SiteRef, resolve_positions, validate_sites
from faithful_train.tasks.base import Batch, Pairs, Task
from faithful_train.tasks.batch import (
    answer_mask,
    answer_positions,
    first_answer_logits,
    gather_positions,
    pad_and_stack,
)

Alignment = dict[str, SiteRef]


def parse_alignment(spec: Mapping[str, Any], model: nn.Module | None = None, task: Task | None = None) -> Alignment:
    """``{variable: site name or {site, positions, heads, dims}}`` -> ``{variable: SiteRef}``, checked."""
    if not spec:
        raise ConfigError("alignment must map at least one variable to a site")
    alignment = {str(var): SiteRef.parse(ref) for var, ref in spec.items()}
    if task is not None:
        task.check_variables(list(alignment))
        for ref in alignment.values():
            check_positions(ref, task)
    if model is not None:
        validate_sites(model, (ref.name for ref in alignment.values()))
    return alignment


def check_positions(ref: SiteRef, task: Task) -> None:
    """Int positions within the task's sequence length; spans the task provides."""
    spec = ref.positions
    if spec is None:
        return
    if ref.per_example:
        if spec.span is not None and spec.span not in task.spans:
            raise UnknownNameError(f"span of task {task.name!r} (positions of site {ref.name})", spec.span, task.spans)
        return
    for k in spec:
        if not -task.seq_len <= k < task.seq_len:
            raise ConfigError(f"site {ref.name}: position {k} is outside the task's sequence length {task.seq_len}")


def parse_sites(specs: Sequence[Any] | None, model: nn.Module | None = None, task: Task | None = None) -> list[SiteRef]:
    """A list of site specs (names or mappings) -> refs, checked against ``model``."""
    refs = [SiteRef.parse(spec) for spec in specs or ()]
    if model is not None:
        validate_sites(model, (ref.name for ref in refs))
    if task is not None:
        for ref in refs:
            check_positions(ref, task)
    return refs


@dataclass(frozen=True)
class Swap:
    """One interchange: ``ref``'s part of the base activation takes the source's, optionally only
    along the columns of ``basis`` (then ``ref.dims`` name basis columns, already applied).

    ``positions`` / ``source_positions`` ``(B, P)``: where ``ref`` lies in each base row and in
    its source row (they differ when positions are per example or rows are padded); ``None``:
    the same fixed positions in every row (``ref.mask``)."""

    ref: SiteRef
    source: Tensor  # the source's whole activation at ref.name, row-aligned with the base batch
    basis: Tensor | None = None
    positions: Tensor | None = None
    source_positions: Tensor | None = None

    def apply(self, base: Tensor) -> Tensor:
        ref = self.ref if self.basis is None else replace(self.ref, dims=None)
        if self.positions is None:
            return interchange(base, self.source, cached_mask(ref, base.shape, base.device), self.basis)
        picked = gather_positions(base, self.positions)  # (B, P, ...)
        taken = gather_positions(self.source, self.source_positions)
        mixed = interchange(
            picked, taken, cached_mask(replace(ref, positions=None), picked.shape, base.device), self.basis
        )
        index = self.positions.view(*self.positions.shape, *([1] * (base.dim() - 2))).expand_as(mixed)
        return base.scatter(1, index, mixed)


def swap_positions(ref: SiteRef, base: Batch, source: Batch) -> tuple[Tensor | None, Tensor | None]:
    """``(base positions, source positions)`` of ``ref`` for ``Swap``; ``(None, None)`` when they
    are the same fixed positions in every row (int positions, no padding) or every position."""
    if ref.positions is None:
        return None, None
    if not ref.per_example and "attention_mask" not in base and "attention_mask" not in source:
        return None, None
    return resolve_positions(ref, base), resolve_positions(ref, source)


_MASKS: dict[tuple, Tensor] = {}


def cached_mask(ref: SiteRef, shape: Sequence[int], device: torch.device) -> Tensor:
    """``ref.mask(shape)``, built once per (ref, shape, device): the step's swaps reuse it."""
    key = (ref, tuple(shape[1:]), str(device))
    if key not in _MASKS:
        if len(_MASKS) > 1024:
            _MASKS.clear()
        _MASKS[key] = ref.mask(shape, device)
    return _MASKS[key]


def swap_forward(
    model: nn.Module,
    batch: Batch,
    groups: Sequence[Sequence[Swap]],
    base_cache: Mapping[str, Tensor] | None = None,
    input_ids: Tensor | None = None,
    resume: bool = True,
) -> Tensor:
    """Answer logits ``(len(groups) * B, A, vocab)``: variant ``k`` is the base batch with group
    ``k``'s swaps, all run by the engine (``run_variants``: one forward, resumed at the first
    swapped block from ``base_cache``). ``input_ids`` ``(K * B, T)``: per-variant inputs
    (counterfactual answers teacher-forced), run in full."""
    B = batch["input_ids"].shape[0]
    by_site: dict[str, dict[int, list[Edit]]] = defaultdict(lambda: defaultdict(list))
    for k, group in enumerate(groups):
        for swap in group:
            by_site[swap.ref.name][k].append(swap.apply)
    edits = {name: per_variant(blocks, B) for name, blocks in by_site.items()}
    return run_variants(model, batch, len(groups), edits, cache=base_cache, input_ids=input_ids, resume=resume)


def variable_swaps(
    alignment: Alignment,
    variables: Sequence[str],
    base: Batch,
    sources: Mapping[str, Batch],
    activations: Mapping[str, Mapping[str, Tensor]],
    bases: Mapping[str, Tensor] | None = None,
) -> list[list[Swap]]:
    """One group per variable: its aligned site from that variable's source rows (``sources[v]``,
    whose activations are ``activations[v]``), in the variable's basis if any."""
    bases = bases or {}
    groups = []
    for v in variables:
        ref = alignment[v]
        positions, source_positions = swap_positions(ref, base, sources[v])
        groups.append([Swap(ref, activations[v][ref.name], bases.get(v), positions, source_positions)])
    return groups


SOURCE = "source."  # the prefix of a paired audit set's source rows (``build_data``)


@dataclass
class PairedRows:
    """An audit chunk's interchange pairs laid out for one recording forward: ``stacked`` holds
    the base rows, then each distinct source set's rows (one for generated tasks, one per
    variable for a file's explicit pairs), then the ``extra`` sets' rows, all padded alike."""

    pairs: Pairs
    base: Batch
    sources: dict[str, Batch]
    stacked: Batch
    offsets: dict[str, int]  # each variable's first row in ``stacked``
    extras: list[Batch]  # the extra sets, padded
    extra_offsets: list[int]

    def rows(self, cache: Mapping[str, Tensor], variable: str) -> dict[str, Tensor]:
        """The recorded activations of ``variable``'s source rows."""
        B, start = self.base["input_ids"].shape[0], self.offsets[variable]
        return {k: a[start : start + B] for k, a in cache.items()}


def paired_rows(
    task: Task, batch: Batch, variables: Sequence[str], extra: Sequence[Batch] = (), other_sets: Sequence[str] = ()
) -> PairedRows:
    """The pairs of a chunk whose source rows carry the ``source.`` prefix (or the file's own
    explicit pairs), padded and stacked with the base rows (``PairedRows``). Keys starting with
    ``source.`` or one of ``other_sets`` are not base rows."""
    base = {k: v for k, v in batch.items() if not k.startswith((SOURCE, *other_sets))}
    pairs = task.explicit_pairs(base, variables)
    if pairs is None:
        pairs = task.pairs_from(
            base, {k.removeprefix(SOURCE): v for k, v in batch.items() if k.startswith(SOURCE)}, variables
        )
    source_sets: list[Batch] = []
    for v in variables:
        if not any(pairs.sources[v] is s for s in source_sets):
            source_sets.append(pairs.sources[v])
    index = {v: next(i for i, s in enumerate(source_sets) if s is pairs.sources[v]) for v in variables}
    padded, stacked = pad_and_stack([base, *source_sets, *extra])
    B = base["input_ids"].shape[0]
    return PairedRows(
        pairs,
        padded[0],
        {v: padded[1 + index[v]] for v in variables},
        stacked,
        {v: B * (1 + index[v]) for v in variables},
        padded[1 + len(source_sets) :],
        [B * (1 + len(source_sets) + j) for j in range(len(extra))],
    )


def counterfactual_targets(pairs: Pairs, variables: Sequence[str]) -> tuple[Tensor, Tensor]:
    """``(V * B, A)`` counterfactual answer ids and masks, in the block order of ``variable_swaps``."""
    return torch.cat([pairs.answers[v][0] for v in variables]), torch.cat([pairs.answers[v][1] for v in variables])


def teacher_forced(batch: Batch, answers: Tensor) -> Tensor:
    """``input_ids`` with answer tokens ``answers`` ``(B, A)`` written where teacher forcing reads
    them (token ``j - 1`` at the position predicting token ``j``): inputs for a multi-token
    counterfactual answer."""
    ids = batch["input_ids"].clone()
    if answers.shape[1] < 2:
        return ids
    positions = answer_positions(batch)[:, 1:]
    keep = answer_mask(batch)[:, 1:]
    written = torch.where(keep, answers[:, :-1], ids.gather(1, positions))
    return ids.scatter(1, positions, written)


def interchange_loss(answer_logits: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
    """IIT loss (Geiger et al. 2022): ``CE(M(base | site <- site(source)), C(base | var <- var(source)))``,
    the mean over the answer's tokens (``(N, A, V)`` logits, ``(N, A)`` targets and mask).

    With ``targets`` the base answers and the swapped sites the ones *not* aligned to any
    variable, this is the strict term of SIIT (Gupta et al. 2024, InterpBench): those sites
    must not matter.
    """
    if answer_logits.dim() == 2:  # one answer token: (N, V) and (N,)
        answer_logits, targets = answer_logits[:, None], targets[:, None]
    return answer_loss(answer_logits, targets, torch.ones_like(targets, dtype=torch.bool) if mask is None else mask)


def answer_predictions(answer_logits: Tensor, task: Task) -> Tensor:
    """Argmax over the task's possible answers (``task.answer_tokens``), else the whole vocabulary,
    so a model that knows nothing scores chance, not zero."""
    tokens = task.answer_tokens
    if tokens is None:
        return answer_logits.argmax(dim=-1)
    tokens = torch.as_tensor(tokens, device=answer_logits.device)
    return tokens[answer_logits[..., tokens].argmax(dim=-1)]


def interchange_hits(
    answer_logits: Tensor, targets: Tensor, mask: Tensor | None = None, task: Task | None = None
) -> Tensor:
    """Per-pair IIA indicator: 1 where the intervened model's answer is the causal model's. A
    one-token answer is the argmax over the task's answer tokens; a longer one counts only
    when every token is the argmax (over the vocabulary). ``(N, A, V)`` logits, ``(N, A)``
    targets and mask (or ``(N, V)`` and ``(N,)`` for one token)."""
    if answer_logits.dim() == 2:
        answer_logits, targets = answer_logits[:, None], targets[:, None]
    if mask is None:
        mask = torch.ones_like(targets, dtype=torch.bool)
    if answer_logits.shape[1] > 1:
        return exact_match(answer_logits, targets, mask)
    first = first_answer_logits(answer_logits)
    predictions = first.argmax(dim=-1) if task is None else answer_predictions(first, task)
    return (predictions == targets[:, 0]).float()
