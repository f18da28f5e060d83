"""The ``preserve`` objective: keep a pretrained model's ability while a faithfulness term
fine-tunes it.

    term = mean_t KL( p_θ(· | x_<t) || p_0(· | x_<t) )

over the real (non-padding) tokens ``t`` of the step's batch, or of a held-out plain-text file
(``text``), where ``p_0`` is the model at the start of the run (its weights from ``model.path``,
or its initialisation): with LoRA the same model with its adapters off, otherwise a frozen copy
kept off the optimizer, checkpoints and DDP (``modeling.reference``). This is the KL anchor of
RLHF-style fine-tuning (Ziegler et al. 2019; Ouyang et al. 2022) and of "learning without
forgetting" (Li & Hoiem 2017), applied to every position's next-token distribution.

On the batch it reuses the step's forward (its ``final`` hidden states); only the reference
runs again. Both sides are unembedded in chunks of tokens (``batches.token_kl_from_states``):
every position's logits over a real vocabulary never exist at once.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from faithful_train.errors import ConfigError, DataError
from faithful_train.functional.losses import token_kl_from_states
from faithful_train.modeling.interface import final_states, per_token_logits, unembed
from faithful_train.objectives.base import Objective, StepContext
from faithful_train.tasks.base import Task


class PreserveObjective(Objective):
    name = "preserve"
    supports_activation_checkpointing = True
    needs_reference = True

    def __init__(
        self,
        text: str | None = None,
        batch_size: int = 32,
        weight: float = 1.0,
        schedule: Any = None,
        label: str | None = None,
    ):
        super().__init__(weight, schedule, label)
        if batch_size < 1:
            raise ConfigError(f"objective {self.label!r}: batch_size must be >= 1, got {batch_size}")
        self.text, self.batch_size = text, int(batch_size)
        self._lines: list[list[int]] = []
        self._pad_id = 0

    def bind(self, model: nn.Module, task: Task, run_seed: int = 0) -> None:
        if not per_token_logits(model):
            raise ConfigError(
                f"objective {self.label!r} needs a model with next-token logits at every position "
                "(a concept bottleneck has none)"
            )
        if self.text is None:
            return
        tokenizer = getattr(task, "tokenizer", None)
        if tokenizer is None:
            raise ConfigError(
                f"objective {self.label!r}: text: needs a task with a tokenizer (task: {{name: text, ...}})"
            )
        path = Path(self.text)
        if not path.is_file():
            raise DataError(f"objective {self.label!r}: text file not found: {path}")
        self._lines = [tokenizer(line)["input_ids"] for line in path.read_text().splitlines() if line.strip()]
        if not self._lines:
            raise DataError(f"objective {self.label!r}: {path} has no text")
        self._pad_id = getattr(task, "pad_id", 0)

    def _text_batch(self, step: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Batch ``step`` of the text file, cycling through it (a pure function of the step)."""
        n = len(self._lines)
        rows = [self._lines[(step * self.batch_size + i) % n] for i in range(min(self.batch_size, n))]
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), self._pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.tensor(r)
            mask[b, : len(r)] = 1
        return ids.to(device), mask.to(device)

    def sites(self) -> list[str]:
        return ["final"] if self.text is None else []  # the step's own final states

    def term(self, ctx: StepContext) -> Tensor:
        if ctx.reference is None:
            raise ConfigError(f"objective {self.label!r} needs the frozen starting model")
        if self.text is None:
            ids, mask, states = ctx.batch["input_ids"], ctx.batch.get("attention_mask"), ctx.cache["final"]
        else:
            ids, mask = self._text_batch(ctx.step, ctx.batch["input_ids"].device)
            states = final_states(ctx.model, ids, mask)
        reference = ctx.reference.final_states(ids, mask)
        return token_kl_from_states(states, reference, mask, partial(unembed, ctx.model), ctx.reference.unembed)
