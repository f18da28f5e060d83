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

Cost: the sources are other rows of the batch, so their activations come from the step's
recorded forward; every swap of the step (all variables and the strict resample) shares ONE
batched forward, and that forward resumes at the first block it changes (``partial``).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from faithful_train.causal import (
    Swap,
    counterfactual_targets,
    interchange_loss,
    parse_alignment,
    parse_sites,
    swap_forward,
    variable_swaps,
)
from faithful_train.das import SiteBases, rotated_sites, variable_bases
from faithful_train.errors import ConfigError, UnknownNameError
from faithful_train.objectives.base import Objective, StepContext
from faithful_train.partial import ResumePlan, frozen_parameters, plan_resume
from faithful_train.sites import run_with
from faithful_train.tasks.base import Task, take

SUBSPACES = ("fixed", "learned")


def site_widths(model: nn.Module, task: Task, names: list[str]) -> dict[str, int]:
    """The last-dimension width of each site, from one example."""
    with torch.no_grad():
        device = next(model.parameters()).device
        _, cache = run_with(model, task.sample(1, 0)["input_ids"].to(device), record=names)
    return {name: cache[name].shape[-1] for name in names}


class InterchangeObjective(Objective):
    name = "interchange"
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
        parse_sites([ref.to_dict() for ref in self.strict], model)
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

    def sites(self) -> list[str]:
        names = {ref.name for ref in self.alignment.values()} | {ref.name for ref in self.strict}
        if self.plan is not None:
            names.add(self.plan.site)
        return sorted(names)

    def term(self, ctx: StepContext) -> Tensor:
        names = list(self.alignment)
        if self.variables_mode == "sample":
            names = [names[int(torch.randint(len(names), (1,), generator=ctx.generator))]]
        ids = ctx.batch["input_ids"]
        B = ids.shape[0]
        permutation = torch.randperm(B, generator=ctx.generator).to(ids.device)
        cache = ctx.cache if self.update_model else {k: v.detach() for k, v in ctx.cache.items()}
        sources = {ref.name: cache[ref.name][permutation] for ref in self.alignment.values()}
        if self.detach_source:
            sources = {name: act.detach() for name, act in sources.items()}
        bases = variable_bases(self.alignment, self.bases()) if self.bases is not None else None
        groups = variable_swaps(self.alignment, names, sources, bases)
        if self.strict:
            resample = torch.randperm(B, generator=ctx.generator).to(ids.device)
            groups.append([Swap(ref, cache[ref.name][resample]) for ref in self.strict])
        with nullcontext() if self.update_model else frozen_parameters(ctx.model):
            answers = swap_forward(ctx.model, ids, groups, cache, self.plan)
        targets = counterfactual_targets(ctx.task, ctx.batch, take(ctx.batch, permutation), names)
        iit = interchange_loss(answers[: len(names) * B], targets)
        if not self.strict:
            return iit
        strict = interchange_loss(answers[len(names) * B :], ctx.batch["labels"])
        self.parts = {"iit": iit.detach(), "strict": strict.detach()}
        return iit + self.strict_weight * strict
