"""Interchange-intervention training (IIT; Geiger et al. 2022, "Inducing causal structure for
interpretable neural networks"), with learned alignments (DAS; Geiger et al. 2023) and the
strict term (SIIT; Gupta et al. 2024, "InterpBench").

For each aligned variable ``v`` and in-batch source ``s = batch[perm]``:

    L_v      = CE( M(b | site_v <- site_v(s)),  C(b | v <- v(s)) )
    L_strict = CE( M(b | n <- n(s') for every non-aligned site n),  C(b) )
    term     = mean_v L_v + strict_weight * L_strict

over the variables used this step (all, or one sampled per step). ``subspace: learned`` swaps
``site_v`` only along a learned orthonormal basis (DAS); its parameters live on the
LightningModule (``module()``), so the optimizer, checkpoints and DDP see them.
``update_model: false`` sends the term's gradient to the basis only: a DAS search on the model
as it trains, without changing it.

Sources: other rows of the batch (``task.interchange_pairs``), or, for a file with explicit
counterfactual pairs (``source.<v>`` columns), the rows it names, which cost one extra forward.
Multi-token answers are teacher-forced: each variant reads its own counterfactual answer.

Cost: in-batch sources' activations come from the step's recorded forward; every swap of the
step (all variables and the strict resample) shares ONE batched forward, and that forward
resumes at the first block it changes (the engine).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from faithful_train.errors import ConfigError, UnknownNameError
from faithful_train.functional.interchange import (
    Swap,
    counterfactual_targets,
    interchange_loss,
    parse_alignment,
    parse_sites,
    swap_forward,
    swap_positions,
    teacher_forced,
    variable_swaps,
)
from faithful_train.intervene.engine import ResumePlan, frozen_parameters, plan_resume
from faithful_train.intervene.hypotheses import Hypothesis
from faithful_train.intervene.rotation import SiteBases, rotated_sites, variable_bases
from faithful_train.intervene.sites import run_with
from faithful_train.objectives.base import Objective, StepContext
from faithful_train.tasks.base import Pairs, Task, take
from faithful_train.tasks.batch import answer_mask, answer_targets, tile

SUBSPACES = ("fixed", "learned")


def site_widths(model: nn.Module, task: Task, names: list[str]) -> dict[str, int]:
    """The last-dimension width of each site, from one example."""
    with torch.no_grad():
        device = next(model.parameters()).device
        sample = {k: v.to(device) for k, v in task.sample(1, 0).items()}
        _, cache = run_with(model, sample["input_ids"], record=names, attention_mask=sample.get("attention_mask"))
    return {name: cache[name].shape[-1] for name in names}


class InterchangeObjective(Objective):
    name = "interchange"
    supports_activation_checkpointing = True
    VARIABLE_MODES = ("all", "sample")

    def __init__(
        self,
        alignment: dict[str, Any],
        variables: str = "all",
        subspace: str = "fixed",
        detach_source: bool = False,
        update_model: bool = True,
        strict: list[Any] | None = None,
        strict_weight: float = 1.0,
        resume: bool = True,
        weight: float = 1.0,
        schedule: Any = None,
        label: str | None = None,
    ):
        super().__init__(weight, schedule, label)
        if variables not in self.VARIABLE_MODES:
            raise UnknownNameError("interchange variables mode", variables, self.VARIABLE_MODES)
        if subspace not in SUBSPACES:
            raise UnknownNameError("interchange subspace", subspace, SUBSPACES)
        if strict_weight < 0:
            raise ConfigError(f"strict_weight must be >= 0, got {strict_weight}")
        self.alignment = parse_alignment(alignment)
        self.variables_mode, self.subspace = variables, subspace
        self.detach_source, self.update_model = detach_source, update_model
        self.strict = parse_sites(strict)
        self.strict_weight, self.resume = float(strict_weight), resume
        if subspace == "learned":
            rotated_sites(self.alignment)  # every variable names its rotated coordinates
        self.bases: SiteBases | None = None
        self.plan: ResumePlan | None = None

    def bind(self, model: nn.Module, task: Task, run_seed: int = 0) -> None:
        parse_alignment({v: ref.to_dict() for v, ref in self.alignment.items()}, model, task)
        parse_sites([ref.to_dict() for ref in self.strict], model, task)
        patched = sorted({ref.name for ref in self.alignment.values()} | {ref.name for ref in self.strict})
        self.plan = plan_resume(model, patched) if self.resume else None
        if self.subspace == "learned":
            ranks = rotated_sites(self.alignment)
            widths = site_widths(model, task, sorted(ranks))
            for name, rank in ranks.items():
                if rank > widths[name]:
                    raise ConfigError(f"rotated dims up to {rank} exceed the width {widths[name]} of site {name}")
            self.bases = SiteBases(ranks, widths, seed=run_seed)

    def module(self) -> nn.Module | None:
        return self.bases

    def hypothesis(self) -> Hypothesis:
        """The alignment, with the learned rotation of each site (DAS) when the subspace is learned."""
        rotations = (
            {f"rotation/{name}": basis.detach() for name, basis in self.bases().items()}
            if self.bases is not None
            else {}
        )
        return Hypothesis(
            kind="alignment",
            label=self.label,
            alignment={v: ref.to_dict() for v, ref in self.alignment.items()},
            featurizer="rotation" if rotations else "identity",
            tensors=rotations,
        )

    def sites(self) -> list[str]:
        names = {ref.name for ref in self.alignment.values()} | {ref.name for ref in self.strict}
        if self.plan is not None:
            names.add(self.plan.site)
        return sorted(names)

    def term(self, ctx: StepContext) -> Tensor:
        names = list(self.alignment)
        if self.variables_mode == "sample":
            names = [names[int(torch.randint(len(names), (1,), generator=ctx.generator))]]
        batch = ctx.batch
        B = batch["input_ids"].shape[0]
        pairs = ctx.task.interchange_pairs(batch, names, ctx.generator)
        cache = ctx.cache if self.update_model else {k: v.detach() for k, v in ctx.cache.items()}
        activations = self._source_activations(ctx, pairs, names, cache)
        if self.detach_source:
            activations = {v: {n: a.detach() for n, a in acts.items()} for v, acts in activations.items()}
        bases = variable_bases(self.alignment, self.bases()) if self.bases is not None else None
        groups = variable_swaps(self.alignment, names, batch, pairs.sources, activations, bases)
        if self.strict:
            resample = torch.randperm(B, generator=ctx.generator).to(batch["input_ids"].device)
            resampled = take(batch, resample)
            groups.append(
                [
                    Swap(ref, cache[ref.name][resample], None, *swap_positions(ref, batch, resampled))
                    for ref in self.strict
                ]
            )
        targets, masks = counterfactual_targets(pairs, names)
        if self.strict:
            targets = torch.cat([targets, answer_targets(batch)])
            masks = torch.cat([masks, answer_mask(batch)])
        variant_ids = None
        if targets.shape[1] > 1:  # multi-token answers: each variant reads its own answer's tokens
            variant_ids = teacher_forced(tile(batch, len(groups), ("input_ids", "answer_pos", "answer_mask")), targets)
        with nullcontext() if self.update_model else frozen_parameters(ctx.model):
            answers = swap_forward(ctx.model, batch, groups, cache, variant_ids, resume=self.resume)
        iit = interchange_loss(answers[: len(names) * B], targets[: len(names) * B], masks[: len(names) * B])
        if not self.strict:
            return iit
        strict = interchange_loss(answers[len(names) * B :], targets[len(names) * B :], masks[len(names) * B :])
        self.parts = {"iit": iit.detach(), "strict": strict.detach()}
        return iit + self.strict_weight * strict

    def _source_activations(
        self, ctx: StepContext, pairs: Pairs, names: list[str], cache: dict[str, Tensor]
    ) -> dict[str, dict[str, Tensor]]:
        """Each variable's source activations at its site: the step's own, reordered, for
        in-batch sources; one extra forward of the given rows for explicit pairs."""
        sites = sorted({self.alignment[v].name for v in names})
        if pairs.permutation is not None:
            reordered = {name: cache[name][pairs.permutation] for name in sites}
            return {v: reordered for v in names}
        out = {}
        for v in names:
            source = pairs.sources[v]
            with nullcontext() if self.update_model else torch.no_grad():
                _, acts = run_with(
                    ctx.model,
                    source["input_ids"],
                    record=[self.alignment[v].name],
                    attention_mask=source.get("attention_mask"),
                )
            out[v] = acts
        return out
