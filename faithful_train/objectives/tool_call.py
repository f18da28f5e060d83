"""The ``tool_call`` objective: the model emits the tool its row calls.

    term = CE( logits at the tool-picking position,  the called tool's token )

A ``tool_use`` task (or a text file with a ``tool_calls`` column) writes ``CALL <tool>`` into each
row: the model must emit the tool's token at the position before it (``span/tool``), as a
language model learns to call a tool (Schick et al. 2023, "Toolformer"). The term reads the
step's own forward at that position (``reads``), so it costs no extra forward. Validation logs
``val/tool_selection_acc``: how often the argmax there is the called tool.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from faithful_train.errors import ConfigError
from faithful_train.objectives.base import Objective, StepContext
from faithful_train.tasks.base import Batch, Task
from faithful_train.tasks.batch import tool_call


class ToolCallObjective(Objective):
    name = "tool_call"
    supports_activation_checkpointing = True

    def __init__(self, weight: float = 1.0, schedule: Any = None, label: str | None = None):
        super().__init__(weight, schedule, label)

    def bind(self, model: nn.Module, task: Task, run_seed: int = 0) -> None:
        if "tool_calls" not in task.provides:
            raise ConfigError(
                f"objective {self.label!r} needs a task whose rows call a tool; "
                f"{task.name!r} has none{task.column_hint('tool_calls')}"
            )

    def reads(self, batch: Batch) -> Tensor | None:
        call = tool_call(batch)
        return None if call is None else call[0][:, None]

    def term(self, ctx: StepContext) -> Tensor:
        return F.cross_entropy(ctx.read_logits[self.label][:, 0].float(), ctx.batch["tool_ids"])

    def validation_metrics(self, ctx: StepContext) -> dict[str, Tensor]:
        picked = ctx.read_logits[self.label][:, 0]
        return {"tool_selection_acc": (picked.argmax(-1) == ctx.batch["tool_ids"]).float().mean()}
