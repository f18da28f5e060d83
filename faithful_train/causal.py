"""Interchange interventions against a causal model: shared by the interchange objective and audit.

An *alignment* maps each high-level variable of a task's causal model to a (narrowed) site.
An interchange intervention on variable ``v`` runs the model on a base input with the
aligned site set to its value on a source input; the causal model predicts the output as
``task.counterfactual_labels(base, source, [v])``. Interchange-intervention accuracy (IIA,
Geiger et al. 2021/2022) is the fraction of (base, source) pairs where they agree.

Many interventions run in ONE batched forward: block ``k`` of a ``K * B`` batch carries the
``k``-th group of swaps (one variable, or all the strict resamples), and the forward resumes
at the first block any of them touches (``partial.run_patched``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from faithful_train.errors import ConfigError
from faithful_train.interventions import interchange
from faithful_train.partial import ResumePlan, run_patched
from faithful_train.sites import Edit, SiteRef, validate_sites
from faithful_train.tasks.base import Batch, Task

Alignment = dict[str, SiteRef]


def parse_alignment(spec: Mapping[str, Any], model: nn.Module | None = None, task: Task | None = None) -> Alignment:
    """``{variable: site name or {site, positions, heads, dims}}`` -> ``{variable: SiteRef}``, checked."""
    if not spec:
        raise ConfigError("alignment must map at least one variable to a site")
    alignment = {str(var): SiteRef.parse(ref) for var, ref in spec.items()}
    if task is not None:
        task.check_variables(list(alignment))
    if model is not None:
        validate_sites(model, (ref.name for ref in alignment.values()))
    return alignment


def parse_sites(specs: Sequence[Any] | None, model: nn.Module | None = None) -> list[SiteRef]:
    """A list of site specs (names or mappings) -> refs, checked against ``model``."""
    refs = [SiteRef.parse(spec) for spec in specs or ()]
    if model is not None:
        validate_sites(model, (ref.name for ref in refs))
    return refs


@dataclass(frozen=True)
class Swap:
    """One interchange: ``ref``'s part of the base activation takes the source's, optionally only
    along the columns of ``basis`` (then ``ref.dims`` name basis columns, already applied)."""

    ref: SiteRef
    source: Tensor  # the source's whole activation at ref.name, row-aligned with the base batch
    basis: Tensor | None = None

    def apply(self, base: Tensor) -> Tensor:
        ref = self.ref if self.basis is None else replace(self.ref, dims=None)
        return interchange(base, self.source, cached_mask(ref, base.shape, base.device), self.basis)


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
    base_ids: Tensor,
    groups: Sequence[Sequence[Swap]],
    base_cache: Mapping[str, Tensor] | None = None,
    plan: ResumePlan | None = None,
) -> Tensor:
    """Answer logits ``(len(groups) * B, vocab)`` (last position): block ``k`` is the base with
    group ``k``'s swaps. Each site gets one edit that rebuilds its activation once."""
    B, K = base_ids.shape[0], len(groups)
    by_site: dict[str, dict[int, list[Swap]]] = defaultdict(lambda: defaultdict(list))
    for k, group in enumerate(groups):
        for swap in group:
            by_site[swap.ref.name][k].append(swap)

    def site_edit(blocks: Mapping[int, list[Swap]]) -> Edit:
        def apply(t: Tensor) -> Tensor:
            pieces = []
            for k in range(K):
                part = t[k * B : (k + 1) * B]
                for swap in blocks.get(k, ()):
                    part = swap.apply(part)
                pieces.append(part)
            return torch.cat(pieces)

        return apply

    edits = {name: [site_edit(blocks)] for name, blocks in by_site.items()}
    return run_patched(model, base_ids, K, edits, base_cache, plan, last_only=True)[:, -1]


def variable_swaps(
    alignment: Alignment,
    variables: Sequence[str],
    source_activations: Mapping[str, Tensor],
    bases: Mapping[str, Tensor] | None = None,
) -> list[list[Swap]]:
    """One group per variable: its aligned site from the source (in its basis, if any)."""
    bases = bases or {}
    return [[Swap(alignment[v], source_activations[alignment[v].name], bases.get(v))] for v in variables]


def counterfactual_targets(task: Task, base: Batch, source: Batch, variables: Sequence[str]) -> Tensor:
    """``(V * B,)`` causal-model labels, in the block order of ``variable_swaps``."""
    return torch.cat([task.counterfactual_labels(base, source, [v]) for v in variables])


def interchange_loss(answer_logits: Tensor, counterfactual_labels: Tensor) -> Tensor:
    """IIT loss (Geiger et al. 2022): ``CE(M(base | site <- site(source)), C(base | var <- var(source)))``.

    With ``counterfactual_labels`` the base labels and the swapped sites the ones *not* aligned
    to any variable, this is the strict term of SIIT (Gupta et al. 2024, InterpBench): those
    sites must not matter.
    """
    return F.cross_entropy(answer_logits.float(), counterfactual_labels)


def answer_predictions(answer_logits: Tensor, task: Task) -> Tensor:
    """Argmax over the task's possible answers (``task.answer_tokens``), else the whole vocabulary,
    so a model that knows nothing scores chance, not zero."""
    tokens = task.answer_tokens
    if tokens is None:
        return answer_logits.argmax(dim=-1)
    tokens = torch.as_tensor(tokens, device=answer_logits.device)
    return tokens[answer_logits[..., tokens].argmax(dim=-1)]


def interchange_hits(answer_logits: Tensor, counterfactual_labels: Tensor, task: Task | None = None) -> Tensor:
    """Per-pair IIA indicator: 1 where the intervened model's answer is the causal model's."""
    predictions = answer_logits.argmax(dim=-1) if task is None else answer_predictions(answer_logits, task)
    return (predictions == counterfactual_labels).float()
