"""Tasks whose inputs carry written reasoning steps (a chain of thought) before the answer.

The faithfulness question (Lanham et al. 2023, "Measuring faithfulness in chain-of-thought
reasoning") is whether the answer follows the steps as written or a hidden shortcut. A
``ReasoningTask`` says where its steps are written, how to corrupt one (and what answer the
corrupted chain then implies), and has a filler token to hide steps with.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import Tensor

from faithful_train.errors import ConfigError
from faithful_train.tasks.base import Batch, Task


class ReasoningTask(Task):
    """A task with ``n_steps`` written steps at ``step_positions`` of every input."""

    @property
    @abstractmethod
    def step_positions(self) -> tuple[int, ...]:
        """Positions of the written steps, in order."""

    @property
    @abstractmethod
    def filler_token(self) -> int:
        """The token that hides a step (early answering, filler control)."""

    @abstractmethod
    def corrupt(self, batch: Batch, step: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Write a wrong value at step ``step[i]`` (0-based) of each example, continue the chain
        correctly from it, and return ``(corrupted input_ids, answer the corrupted chain implies)``.
        The implied answer differs from the clean one for every example."""

    @property
    def n_steps(self) -> int:
        return len(self.step_positions)

    def hide_steps(self, input_ids: Tensor, keep: int) -> Tensor:
        """The inputs with every step after the first ``keep`` replaced by the filler token."""
        hidden = input_ids.clone()
        positions = list(self.step_positions[keep:])
        if positions:
            hidden[:, positions] = self.filler_token
        return hidden


def require_reasoning_task(task: Task, who: str) -> ReasoningTask:
    """``task`` if it writes reasoning steps, else a one-line error naming the tasks that do."""
    if not isinstance(task, ReasoningTask):
        from faithful_train.registry import TASKS, resolve_class

        valid = [name for name in TASKS if issubclass(resolve_class("task", name, TASKS, Task), ReasoningTask)]
        raise ConfigError(
            f"{who} needs a task with written reasoning steps (a ReasoningTask); {task.name!r} is not one; "
            f"valid: {', '.join(valid)}, or your own ReasoningTask"
        )
    return task


def rationale_as_text(task: Task) -> bool:
    """A task whose rows carry a written rationale as text (a text task's ``steps`` column), not
    a generated ``ReasoningTask``'s fixed step positions."""
    return "steps" in task.provides and not isinstance(task, ReasoningTask)
