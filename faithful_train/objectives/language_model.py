"""The ``language_model`` objective: next-token prediction on every real token.

    term = mean_t CE( p(x_t | x_<t), x_t )        over the real (non-padding) tokens of the step's
                                                   rows, prompts included
         ( + the same on a batch of the task's plain text, averaged with it, when it has some )

The language-model loss of pretraining (Radford et al. 2019). Beside the answer loss it makes a
model learn its inputs too, e.g. to pretrain the IOI model (``configs/ioi-pretrain.yaml``), where
the text task's ``lm_text`` file adds plain sentences to every batch (``lm_text/...`` rows). It
reads every position's logits of the step's own forward (``needs_token_logits``); the plain text
costs one more forward.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from faithful_train.errors import ConfigError
from faithful_train.functional.losses import language_model_loss
from faithful_train.modeling.interface import per_token_logits
from faithful_train.objectives.base import Objective, StepContext
from faithful_train.tasks.base import Task
from faithful_train.tasks.batch import attention_mask, unprefixed


class LanguageModelObjective(Objective):
    name = "language_model"
    supports_activation_checkpointing = True
    needs_token_logits = True

    def __init__(self, weight: float = 1.0, schedule: Any = None, label: str | None = None):
        super().__init__(weight, schedule, label)

    def bind(self, model: nn.Module, task: Task, run_seed: int = 0) -> None:
        if not per_token_logits(model):
            raise ConfigError(
                f"objective {self.label!r} needs a model with next-token logits at every position "
                "(a concept bottleneck has none)"
            )

    def term(self, ctx: StepContext) -> Tensor:
        batch = ctx.batch
        lm = language_model_loss(ctx.logits, batch["input_ids"], attention_mask(batch))
        text = unprefixed(batch, "lm_text")
        if not text:
            return lm
        text_lm = language_model_loss(
            ctx.model(text["input_ids"], attention_mask=text["attention_mask"]),
            text["input_ids"],
            text["attention_mask"],
        )
        self.parts = {"rows": lm.detach(), "text": text_lm.detach()}
        return (lm + text_lm) / 2
