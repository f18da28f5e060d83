"""The ``stability`` objective: explanations that stay put and look at the right tokens.

    term = stability · mean_b [1 − cos(attr(x_b)[aligned], attr(x'_b)[aligned])]
         + right_reasons · mean_b Σ_t irrelevant_bt · ‖∂/∂e_bt Σ_k log p_k(x_b)‖²
         + counterfactual · mean_b CE(M(x̃_b), y_b)

- ``attr``: per-token attribution of the answer's ``output`` (its logit by default, as the
  attribution audit measures; ``logprob`` vanishes once the model is confident) at the
  embeddings (``faithful_train.functional.attribution.attribute_tokens``): gradient × input, or integrated
  gradients with ``steps`` points. Computed with ``create_graph`` so the term trains the model
  through the attribution (double backprop).
- ``x'``: the task's meaning-preserving perturbation of ``x`` (``Task.perturb_aligned``), whose
  tokens are aligned to ``x``'s; the cosine runs over the aligned tokens (explanation
  stability, e.g. Yeh et al. 2019's sensitivity; Alvarez-Melis & Jaakkola 2018).
- ``irrelevant``: tokens the task marks as not bearing on the label (noise, decoys); the
  penalty is Ross et al. 2017's "right for the right reasons" term with the task's annotation
  mask: the squared input gradient of the summed log-probabilities at those tokens' embeddings
  ``e``. Input gradients, not gradient × input or integrated gradients from a zero embedding:
  behind a pre-norm transformer's LayerNorm a model can shrink a decoy's embedding and still
  read it, which drives those attributions (and the penalty) to 0 while the decoy decides the
  answer (measured: test accuracy stayed at chance); the gradient grows instead. The summed
  log-probability does not saturate once the model is confident (the target's would).
- ``x̃``: ``x`` with its irrelevant tokens swapped for another example's at the same positions
  (where both are irrelevant), the answer unchanged: the counterfactual-data form of the same
  annotation (counterfactually augmented data, Kaushik et al. 2020; Teney et al. 2020 pair it
  with gradient supervision). An input gradient is local: a model can make it small at the
  tokens it sees and still read them (gradient masking), and on the decoy the input-gradient
  term alone lost the race against the tag in some seeds. The swap is a finite intervention
  on the annotated tokens, so reading them costs task loss whatever the gradient there; it
  needs one extra forward of the swapped rows, no double backprop.

Cost control: the attributions run on a random ``fraction`` of the batch (fresh forwards of
those rows and their perturbations, in one batch), drawn from the step's seeded generator.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from faithful_train.errors import ConfigError, UnknownNameError
from faithful_train.functional.attribution import (
    METHODS,
    OUTPUTS,
    QUADRATURES,
    aligned_cosine,
    attribute_tokens,
    input_gradients,
)
from faithful_train.functional.losses import answer_loss
from faithful_train.intervene.engine import run_variants
from faithful_train.objectives.base import Objective, StepContext
from faithful_train.tasks.base import Task, take
from faithful_train.tasks.batch import (
    answer_mask,
    answer_position,
    answer_targets,
    as_variant,
    pad_columns,
    stack_rows,
)


def swap_irrelevant(input_ids: Tensor, irrelevant: Tensor) -> Tensor:
    """Each row's irrelevant tokens replaced by the next row's (cyclically) at the positions
    where both rows' tokens are irrelevant; everything else kept."""
    donor_ids, donor_irrelevant = input_ids.roll(1, 0), irrelevant.roll(1, 0)
    return torch.where(irrelevant & donor_irrelevant, donor_ids, input_ids)


class StabilityObjective(Objective):
    name = "stability"
    supports_activation_checkpointing = True

    def __init__(
        self,
        stability: float = 1.0,
        right_reasons: float = 0.0,
        method: str = "gradient_x_input",
        steps: int = 8,
        quadrature: str = "gausslegendre",
        output: str = "logit",
        fraction: float = 0.25,
        counterfactual: float = 0.0,
        weight: float = 1.0,
        schedule: Any = None,
        label: str | None = None,
    ):
        super().__init__(weight, schedule, label)
        if method not in METHODS:
            raise UnknownNameError("attribution method", method, METHODS)
        if output not in OUTPUTS:
            raise UnknownNameError("attribution output", output, OUTPUTS)
        if quadrature not in QUADRATURES:
            raise UnknownNameError("quadrature", quadrature, QUADRATURES)
        self.require_non_negative(stability=stability, right_reasons=right_reasons, counterfactual=counterfactual)
        if not 0 < fraction <= 1 or steps < 1:
            raise ConfigError(
                f"objective {self.label!r}: 0 < fraction <= 1 and steps >= 1 required, got {fraction}, {steps}"
            )
        if not stability and not right_reasons and not counterfactual:
            raise ConfigError(f"objective {self.label!r}: set stability, right_reasons or counterfactual (all are 0)")
        self.stability, self.right_reasons, self.counterfactual = stability, right_reasons, counterfactual
        self.method, self.steps, self.quadrature, self.output, self.fraction = (
            method,
            steps,
            quadrature,
            output,
            fraction,
        )

    def bind(self, model: nn.Module, task: Task, run_seed: int = 0) -> None:
        owner = f"objective {self.label!r}"
        if self.stability and "aligned_perturbations" not in task.provides:
            raise ConfigError(
                f"{owner}: stability needs a task with meaning-preserving perturbations; "
                f"{task.name!r} has none{task.column_hint('perturbations')}"
            )
        for name in ("right_reasons", "counterfactual"):
            if getattr(self, name) and "irrelevant" not in task.provides:
                raise ConfigError(
                    f"{owner}: {name} needs a task that marks irrelevant tokens; "
                    f"{task.name!r} does not{task.column_hint('irrelevant')}"
                )

    def term(self, ctx: StepContext) -> Tensor:
        batch = ctx.batch
        n = batch["labels"].shape[0]
        m = max(1, round(self.fraction * n))
        rows = torch.randperm(n, generator=ctx.generator)[:m].to(batch["labels"].device)
        sub = take(batch, rows)
        parts_rows = [sub]
        if self.stability:
            perturbed, source = ctx.task.perturb_aligned(sub, ctx.generator)
            parts_rows.append(as_variant(sub, perturbed))
        stacked = stack_rows(parts_rows)
        target = sub["labels"].repeat(len(parts_rows))
        parts: dict[str, Tensor] = {}
        total = ctx.logits.new_zeros(())
        if self.stability:
            attr = attribute_tokens(
                ctx.model,
                stacked["input_ids"],
                target,
                self.method,
                steps=self.steps,
                quadrature=self.quadrature,
                create_graph=True,
                output=self.output,
                attention_mask=stacked.get("attention_mask"),
                positions=answer_position(stacked),
            ).values
            source = pad_columns(source, attr.shape[1], -1)
            parts["stability"] = (1 - aligned_cosine(attr[:m], attr[m:], source)).mean()
            total = total + self.stability * parts["stability"]
        if self.right_reasons:
            grads = input_gradients(
                ctx.model,
                sub["input_ids"],
                sub["labels"],
                output="sum_logprob",
                attention_mask=sub.get("attention_mask"),
                positions=answer_position(sub),
            )
            parts["right_reasons"] = (grads.pow(2).sum(-1) * sub["irrelevant"]).sum(1).mean()
            total = total + self.right_reasons * parts["right_reasons"]
        if self.counterfactual:
            swapped = swap_irrelevant(sub["input_ids"], sub["irrelevant"].bool())
            logits = run_variants(ctx.model, sub, 1, {}, input_ids=swapped)
            parts["counterfactual"] = answer_loss(logits, answer_targets(sub), answer_mask(sub))
            total = total + self.counterfactual * parts["counterfactual"]
        self.parts = {k: v.detach() for k, v in parts.items()}
        return total
