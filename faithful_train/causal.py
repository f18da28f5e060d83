"""Interchange interventions against a causal model: shared by the interchange objective and audit.

An *alignment* maps each high-level variable of a task's causal model to a (narrowed) site.
An interchange intervention on variable ``v`` runs the model on a base input with the
aligned site set to its value on a source input; the causal model predicts the output as
``task.counterfactual_labels(base, source, [v])``. Interchange-intervention accuracy (IIA,
Geiger et al. 2021/2022) is the fraction of (base, source) pairs where they agree.

All variables' interventions run in ONE batched forward: block ``k`` of a ``V * B`` batch
carries the intervention on variable ``k``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from faithful_train.errors import ConfigError
from faithful_train.interventions import interchange
from faithful_train.sites import SiteRef, run_with, validate_sites
from faithful_train.tasks.base import Batch, Task, take

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


def interchange_forward(
    model: nn.Module,
    base_ids: Tensor,
    source_activations: Mapping[str, Tensor],
    alignment: Alignment,
    variables: Sequence[str],
    rotations: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """Logits ``(V * B, T, vocab)`` of the base inputs with each variable's site interchanged.

    ``source_activations[site]`` is the full activation of the *source* inputs at that site,
    row-aligned with ``base_ids`` (source of base row ``i`` is row ``i``).
    """
    B = base_ids.shape[0]
    edits: dict[str, list] = defaultdict(list)
    for k, var in enumerate(variables):
        ref = alignment[var]
        source = source_activations[ref.name]
        rotation = (rotations or {}).get(var)

        def edit(t: Tensor, ref=ref, source=source, rotation=rotation, rows=slice(k * B, (k + 1) * B)) -> Tensor:
            return interchange(t, source, ref.mask(t.shape, t.device), rotation, rows)

        edits[ref.name].append(edit)
    logits, _ = run_with(model, base_ids.repeat(len(variables), 1), edits=edits)
    return logits


def counterfactual_targets(task: Task, base: Batch, source: Batch, variables: Sequence[str]) -> Tensor:
    """``(V * B,)`` causal-model labels, in the block order of ``interchange_forward``."""
    return torch.cat([task.counterfactual_labels(base, source, [v]) for v in variables])


def interchange_loss(answer_logits: Tensor, counterfactual_labels: Tensor) -> Tensor:
    """IIT loss (Geiger et al. 2022): ``CE(M(base | site <- site(source)), C(base | var <- var(source)))``."""
    return F.cross_entropy(answer_logits.float(), counterfactual_labels)


def interchange_hits(answer_logits: Tensor, counterfactual_labels: Tensor) -> Tensor:
    """Per-pair IIA indicator: 1 where the intervened model's answer is the causal model's."""
    return (answer_logits.argmax(dim=-1) == counterfactual_labels).float()


def interchange_batch(
    model: nn.Module,
    task: Task,
    batch: Batch,
    cache: Mapping[str, Tensor],
    permutation: Tensor,
    alignment: Alignment,
    variables: Sequence[str],
    detach_source: bool = False,
    rotations: Mapping[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """In-batch interchange: sources are ``batch[permutation]``, whose activations come from
    ``cache`` (the clean forward already recorded), so no source forward is run.

    Returns ``(answer_logits (V*B, vocab), counterfactual_labels (V*B,))``.
    """
    sources = {ref.name: cache[ref.name][permutation] for ref in alignment.values()}
    if detach_source:
        sources = {name: act.detach() for name, act in sources.items()}
    logits = interchange_forward(model, batch["input_ids"], sources, alignment, variables, rotations)
    targets = counterfactual_targets(task, batch, take(batch, permutation), variables)
    return logits[:, -1], targets
