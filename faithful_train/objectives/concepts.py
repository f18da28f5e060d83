"""The ``concepts`` objective: train a concept bottleneck's units to mean their concepts.

    term = concept · L_C  +  leakage · KL(side)  +  sparsity · mean(p_binary)  +  intervention · L_int

- ``L_C``: mean over concepts of BCE / cross-entropy of the concept logits (Koh et al. 2020's
  joint bottleneck when added to the task loss).
- ``KL(side)``: ½‖side‖², the KL of the hybrid side channel (its value plus unit training
  noise) to N(0, I), which bounds the information it can carry around the concepts
  (Alemi et al. 2017); ``faithful_train.functional.concepts.gaussian_channel_kl``.
- ``mean(p_binary)``: L1 of the binary concepts' activations (a categorical concept's
  probabilities always sum to 1, so it acts on binary concepts only): few concepts on.
- ``L_int``: random training interventions (Espinosa Zarlenga et al. 2022): each (example,
  concept) is set to its true value with probability ``intervention_prob`` and the task loss
  is taken through the head again, so the head learns to use corrected concepts.

Everything is read from the step's one forward (the ``bottleneck.*`` sites); the
intervention term runs only the bottleneck's head (``ConceptBottleneck.readout``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from faithful_train.errors import ConfigError
from faithful_train.functional.concepts import concept_loss, gaussian_channel_kl, intervene, random_concept_mask
from faithful_train.modeling.bottleneck import bottleneck_of
from faithful_train.objectives.base import Objective, StepContext
from faithful_train.tasks.base import Task


class ConceptsObjective(Objective):
    name = "concepts"
    supports_activation_checkpointing = True

    def __init__(
        self,
        concept: float = 1.0,
        leakage: float = 0.0,
        sparsity: float = 0.0,
        intervention_prob: float = 0.0,
        intervention: float = 1.0,
        weight: float = 1.0,
        schedule: Any = None,
        label: str | None = None,
    ):
        super().__init__(weight, schedule, label)
        self.require_non_negative(concept=concept, leakage=leakage, sparsity=sparsity, intervention=intervention)
        if not 0.0 <= intervention_prob <= 1.0:
            raise ConfigError(f"objective {self.label!r}: intervention_prob must be in [0, 1], got {intervention_prob}")
        self.concept, self.leakage, self.sparsity = concept, leakage, sparsity
        self.intervention_prob, self.intervention = intervention_prob, intervention
        self._sites: list[str] = []

    def bind(self, model: nn.Module, task: Task, run_seed: int = 0) -> None:
        owner = f"objective {self.label!r}"
        model = bottleneck_of(model, owner)
        model.check_task(task, owner)
        if self.leakage and model.bottleneck.mode != "hybrid":
            raise ConfigError(
                f"{owner}: the leakage penalty acts on a hybrid bottleneck's side channel; "
                f"this one is {model.bottleneck.mode!r}"
            )
        if self.sparsity and 2 not in model.layout.n_values:
            raise ConfigError(f"{owner}: sparsity acts on binary concepts, and the bottleneck has none")
        self._sites = sorted(model.bottleneck.site_points())

    def sites(self) -> list[str]:
        return self._sites

    def term(self, ctx: StepContext) -> Tensor:
        model = bottleneck_of(ctx.model, f"objective {self.label!r}")
        layout, cache = model.layout, ctx.cache
        labels = model.concept_labels(ctx.batch)
        concepts = cache["bottleneck.concepts"][:, 0]  # the one position the bottleneck reads
        parts = {"concept": concept_loss(layout, cache["bottleneck.logits"][:, 0], labels)}
        total = self.concept * parts["concept"]
        if "bottleneck.side" in cache:
            parts["leakage"] = gaussian_channel_kl(cache["bottleneck.side"])  # logged even when not penalised
            total = total + self.leakage * parts["leakage"]
        if self.sparsity:
            binary = [s for k, s in enumerate(layout.slices) if layout.n_values[k] == 2]
            parts["sparsity"] = torch.cat([concepts[:, s] for s in binary], dim=1).float().mean()
            total = total + self.sparsity * parts["sparsity"]
        if self.intervention_prob > 0 and self.intervention > 0:
            mask = random_concept_mask(tuple(labels.shape), self.intervention_prob, ctx.generator, labels.device)
            answer = model.readout_from(cache, intervene(layout, concepts, labels, mask))
            parts["intervention"] = F.cross_entropy(answer.float(), ctx.batch["labels"])
            total = total + self.intervention * parts["intervention"]
        self.parts = {k: v.detach() for k, v in parts.items()}
        return total
