"""An objective planted to go non-finite at one step (``at``) and be zero otherwise: a divergence
at a known step, to test that the run names it and stops, or skips that one update. With
``gradient: true`` the term stays finite (0) there but its gradient does not (sqrt at 0)."""

import torch

from faithful_train.objectives.base import Objective, StepContext


class NanAt(Objective):
    name = "nan_at"

    def __init__(self, at: int = 5, gradient: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.at, self.gradient = at, gradient

    def term(self, ctx: StepContext) -> torch.Tensor:
        zero = 0.0 * ctx.logits.float().mean()  # in the graph, no gradient
        if ctx.step != self.at:
            return zero
        return torch.sqrt(zero) if self.gradient else zero + float("nan")
