"""Answers that follow their evidence: what ``counterfactual_cot`` does for written steps, for
documents and tool results.

Each step, the evidence of a ``fraction`` of the batch gets a counterfactual value
(``task.counterfactual_evidence``: the supporting document's value, or the tool's returned
value, replaced; the rest untouched), and the answer is trained to be the one that evidence
gives:

    term = CE(M(x with the evidence replaced), the answer it then gives)   (first answer token)

A model that answers from memory (a parametric shortcut, arithmetic it can do itself) is wrong
on every such input, so the term makes the answer depend causally on the evidence, not on
what was memorised. The counterfactual rows run as one variant of the engine, beside the
step's own forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from faithful_train.errors import ConfigError
from faithful_train.functional.losses import answer_loss
from faithful_train.intervene.engine import run_variants
from faithful_train.objectives.base import Objective, StepContext
from faithful_train.tasks.base import Task, take
from faithful_train.tasks.batch import answer_mask


class CounterfactualContextObjective(Objective):
    name = "counterfactual_context"
    supports_activation_checkpointing = True

    def __init__(self, fraction: float = 0.5, **kwargs: Any):
        super().__init__(**kwargs)
        if not 0 < fraction <= 1:
            raise ConfigError(f"objective {self.label!r}: fraction must be in (0, 1], got {fraction}")
        self.fraction = float(fraction)

    def bind(self, model: nn.Module, task: Task, run_seed: int = 0) -> None:
        if "counterfactual_evidence" not in task.provides:
            raise ConfigError(
                f"objective {self.label!r} needs a task with counterfactual evidence (kv_retrieval, tool_use, or text)"
                f"{task.column_hint('counterfactual_evidence')}; {task.name!r} has none"
            )

    def term(self, ctx: StepContext) -> Tensor:
        batch = ctx.batch
        B = batch["input_ids"].shape[0]
        n = max(1, round(self.fraction * B))
        rows = take(batch, torch.randperm(B, generator=ctx.generator)[:n].to(batch["input_ids"].device))
        ids, answers = ctx.task.counterfactual_evidence(rows, ctx.generator)
        logits = run_variants(ctx.model, rows, 1, {}, input_ids=ids)
        return answer_loss(logits[:, :1], answers[:, None], answer_mask(rows)[:, :1])
