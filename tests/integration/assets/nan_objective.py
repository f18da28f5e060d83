"""An objective whose term is NaN at one step (``at``) and zero otherwise: a divergence planted
at a known step, to test that the run names it and stops, or skips that one update."""

import torch

from faithful_train.objectives.base import Objective, StepContext


class NanAt(Objective):
    name = "nan_at"

    def __init__(self, at: int = 5, **kwargs):
        super().__init__(**kwargs)
        self.at = at

    def term(self, ctx: StepContext) -> torch.Tensor:
        zero = 0.0 * ctx.logits.float().mean()  # in the graph, no gradient
        return zero + (float("nan") if ctx.step == self.at else 0.0)


class NanGradAt(Objective):
    """A term that is finite (0) at step ``at`` but whose gradient is not: sqrt at 0."""

    name = "nan_grad_at"

    def __init__(self, at: int = 5, **kwargs):
        super().__init__(**kwargs)
        self.at = at

    def term(self, ctx: StepContext) -> torch.Tensor:
        zero = 0.0 * ctx.logits.float().mean()
        return torch.sqrt(zero) if ctx.step == self.at else zero
