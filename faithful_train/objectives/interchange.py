"""Interchange-intervention training (IIT; Geiger et al. 2022, "Inducing causal structure for
interpretable neural networks").

Term, for each aligned variable ``v`` and in-batch source ``s = batch[perm]``:

    L_v = CE( M(b | site_v <- site_v(s)),  C(b | v <- v(s)) )

averaged over the variables used this step (all of them, or one sampled per step). The
sources are other examples of the same batch, so their activations come from the step's
recorded forward; all variables' patched runs share one batched forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from faithful_train.causal import interchange_batch, interchange_loss, parse_alignment
from faithful_train.errors import UnknownNameError
from faithful_train.objectives.base import Objective, StepContext
from faithful_train.tasks.base import Task


class InterchangeObjective(Objective):
    name = "interchange"
    VARIABLE_MODES = ("all", "sample")

    def __init__(
        self,
        alignment: dict[str, Any],
        variables: str = "all",
        detach_source: bool = False,
        weight: float = 1.0,
        schedule: Any = None,
        label: str | None = None,
    ):
        super().__init__(weight, schedule, label)
        if variables not in self.VARIABLE_MODES:
            raise UnknownNameError("interchange variables mode", variables, self.VARIABLE_MODES)
        self.alignment = parse_alignment(alignment)
        self.variables_mode = variables
        self.detach_source = detach_source

    def bind(self, model: nn.Module, task: Task, run_seed: int = 0) -> None:
        parse_alignment({v: ref.to_dict() for v, ref in self.alignment.items()}, model, task)

    def sites(self) -> list[str]:
        return sorted({ref.name for ref in self.alignment.values()})

    def term(self, ctx: StepContext) -> Tensor:
        names = list(self.alignment)
        if self.variables_mode == "sample":
            names = [names[int(torch.randint(len(names), (1,), generator=ctx.generator))]]
        permutation = torch.randperm(ctx.batch["input_ids"].shape[0], generator=ctx.generator)
        permutation = permutation.to(ctx.batch["input_ids"].device)
        logits, targets = interchange_batch(
            ctx.model, ctx.task, ctx.batch, ctx.cache, permutation, self.alignment, names, self.detach_source
        )
        return interchange_loss(logits, targets)
