"""Counterfactual chain-of-thought training: the answer must follow the written steps.

Each step, a ``fraction`` of the batch has one written step corrupted (a wrong value, the chain
continued correctly from it, ``ReasoningTask.corrupt``); the term trains the answer to follow:

    term = CE( M(x with step j corrupted)[answer],  answer implied by the corrupted chain )

A model that reaches the answer by a hidden shortcut (ignoring the steps) pays this loss; one
that reads the steps does not. Measured by the ``cot`` audit's corrupted-step follow rate.

On text (a ``text`` task whose rows carry ``steps`` and counterfactual rationales:
``counterfactual.step``, ``counterfactual.steps``, ``counterfactual.answer``, as ``faithful-train
data arithmetic`` writes them), the corrupted chain is the row's counterfactual rationale,
teacher-forced, and the target the answer it implies (``task.counterfactual_evidence``);
``steps`` (which step is corrupted) is then the file's choice. Without those columns, the task's
``label_fn`` writes them: a mistake in one step's result, and the answer (or the continued
rationale) the function says it implies (``tasks.text.mistakes``).
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn

from faithful_train.errors import ConfigError, UnknownNameError
from faithful_train.functional.cot import STEP_CHOICES, corrupted_steps, follow_loss
from faithful_train.functional.losses import answer_forward
from faithful_train.objectives.base import Objective, StepContext
from faithful_train.tasks.base import Task
from faithful_train.tasks.batch import first_answer_logits
from faithful_train.tasks.reasoning import ReasoningTask, require_reasoning_task


class CounterfactualCotObjective(Objective):
    name = "counterfactual_cot"
    supports_activation_checkpointing = True

    def __init__(
        self,
        fraction: float = 1.0,
        steps: str = "any",
        weight: float = 1.0,
        schedule: Any = None,
        label: str | None = None,
    ):
        super().__init__(weight, schedule, label)
        if not 0 < fraction <= 1:
            raise ConfigError(f"fraction must be in (0, 1], got {fraction}")
        if steps not in STEP_CHOICES:
            raise UnknownNameError("corrupted step choice", steps, STEP_CHOICES)
        self.fraction, self.steps = float(fraction), steps

    def bind(self, model: nn.Module, task: Task, run_seed: int = 0) -> None:
        if "counterfactual_steps" in task.provides:
            return
        if "steps" in task.provides:
            raise ConfigError(
                f"objective {self.label!r}: the text rows have steps but no counterfactual rationales "
                "(columns counterfactual.step, counterfactual.steps, counterfactual.answer, as "
                "faithful-train data arithmetic writes them; or task.label_fn to write them)"
            )
        require_reasoning_task(task, f"objective {self.label!r}")

    def term(self, ctx: StepContext) -> Tensor:
        task: ReasoningTask = ctx.task
        ids = ctx.batch["input_ids"]
        n = max(1, math.ceil(self.fraction * ids.shape[0]))  # batch rows are i.i.d.: the first n
        rows = {k: v[:n] for k, v in ctx.batch.items()}
        if "counterfactual_steps" in task.provides:  # text: the rows' own counterfactual rationales
            corrupted, follow = task.counterfactual_evidence(rows, ctx.generator)
            return follow_loss(first_answer_logits(answer_forward(ctx.model, rows, corrupted)), follow)
        step = corrupted_steps(n, task.n_steps, self.steps, ctx.generator).to(ids.device)
        corrupted, follow = task.corrupt(rows, step, ctx.generator)
        return follow_loss(first_answer_logits(answer_forward(ctx.model, rows, corrupted)), follow)
