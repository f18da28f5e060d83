"""FaithfulModule: the LightningModule that sums the task loss and the objectives' terms.

Training step (DESIGN.md §3)::

    record the sites the objectives need  ->  task loss
    for objective in the trainer's Objective callbacks:
        loss += weight(step) * objective.term(ctx)

The objectives' extra (patched) forwards run inside this step, so under DDP/FSDP their
gradients are reduced like any other.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from faithful_train.data import batch_seed
from faithful_train.objectives.base import Objective, StepContext
from faithful_train.sites import run_with
from faithful_train.tasks.base import Batch, Task


def task_loss(answer_logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of the answer token, predicted at the last position."""
    return F.cross_entropy(answer_logits.float(), labels)


class FaithfulModule(LightningModule):
    def __init__(
        self,
        model: nn.Module,
        task: Task,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.98),
        warmup_steps: int = 0,
        seed: int = 0,
        decay: str = "none",
        total_steps: int = 0,
        min_lr_ratio: float = 0.1,
        objective_modules: dict[str, nn.Module] | None = None,
    ):
        super().__init__()
        self.model, self.task = model, task
        # objectives' own parameters (DAS bases...), keyed by objective label
        self.objective_modules = nn.ModuleDict(objective_modules or {})
        self.lr, self.weight_decay, self.betas, self.warmup_steps = lr, weight_decay, tuple(betas), warmup_steps
        self.seed = seed
        self.decay, self.total_steps, self.min_lr_ratio = decay, total_steps, min_lr_ratio
        self.train_acc = MulticlassAccuracy(task.vocab_size, average="micro")
        self.val_acc = MulticlassAccuracy(task.vocab_size, average="micro")

    @property
    def objectives(self) -> list[Objective]:
        if self._trainer is None:
            return []
        return [cb for cb in self.trainer.callbacks if isinstance(cb, Objective)]

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        step = self.global_step
        weights = [obj.weight_at(step) for obj in self.objectives]
        active = [(obj, w) for obj, w in zip(self.objectives, weights) if w > 0]
        sites = sorted({site for obj, _ in active for site in obj.sites()})
        logits, cache = run_with(self.model, batch["input_ids"], record=sites)
        answer = logits[:, -1]
        loss = task_loss(answer, batch["labels"])
        self.train_acc(answer, batch["labels"])
        size = batch["labels"].shape[0]
        self.log("train/task_loss", loss, prog_bar=True, batch_size=size)
        self.log("train/task_acc", self.train_acc, batch_size=size)
        if active:
            seed = batch_seed(self.seed + 12_345, step * self.trainer.world_size + self.global_rank)
            ctx = StepContext(batch, logits, cache, self.model, self.task, step, torch.Generator().manual_seed(seed))
            for objective, weight in active:
                term = objective.term(ctx)
                self.log(f"train/objective/{objective.label}", term, prog_bar=True, batch_size=size)
                for part, value in objective.parts.items():
                    self.log(f"train/objective/{objective.label}/{part}", value, batch_size=size)
                loss = loss + weight * term
        idle = [obj.label for obj, w in zip(self.objectives, weights) if w <= 0 and obj.label in self.objective_modules]
        if idle:  # DDP expects every parameter to get a gradient each step: give idle ones a zero
            loss = loss + 0.0 * sum(p.sum() for label in idle for p in self.objective_modules[label].parameters())
        self.log("train/loss", loss, batch_size=size)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        answer = self.model(batch["input_ids"])[:, -1]
        size = batch["labels"].shape[0]
        self.val_acc(answer, batch["labels"])
        self.log("val/task_loss", task_loss(answer, batch["labels"]), sync_dist=True, batch_size=size)
        self.log("val/task_acc", self.val_acc, prog_bar=True, batch_size=size)

    def configure_optimizers(self) -> Any:
        # weight decay on the model's matrices only: not on biases, norms or objectives' parameters
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2] + [p for p in self.objective_modules.parameters() if p.requires_grad]
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas)
        if not self.warmup_steps and self.decay == "none":
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_factor(self, step: int) -> float:
        """Linear warm-up over ``warmup_steps``, then constant or cosine decay to ``min_lr_ratio``."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.decay == "none" or self.total_steps <= self.warmup_steps:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
