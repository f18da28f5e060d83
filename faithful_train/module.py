"""FaithfulModule: the LightningModule that sums the task loss and the objectives' terms.

Training step (DESIGN.md §3)::

    record the sites the objectives need (with their step edits, if any)  ->  task loss
    for objective in the trainer's Objective callbacks:
        loss += weight(step) * objective.term(ctx)

The objectives' extra (patched) forwards run inside this step, so under DDP/FSDP their
gradients are reduced like any other.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torchmetrics import MeanMetric, SumMetric

from faithful_train.batches import (
    answer_forward,
    answer_loss,
    answer_mask,
    answer_positions,
    answer_targets,
    attention_mask,
    exact_match,
    first_answer_logits,
    gather_positions,
    language_model_loss,
    token_kl_from_states,
    tool_call,
)
from faithful_train.errors import TrainingDiverged, note
from faithful_train.modeling.interface import per_token_logits, unembed
from faithful_train.modeling.lora import has_adapters
from faithful_train.modeling.sharding import average_gradients, clip_grad_norm, is_sharded, local, meta_replica, shard_model
from faithful_train.objectives.base import Objective, StepContext
from faithful_train.sites import run_with
from faithful_train.tasks.base import Batch, Task, batch_seed


def task_loss(answer_logits: Tensor, batch: Batch) -> Tensor:
    """Mean cross-entropy over the answer's tokens (teacher forcing); one token for generated tasks."""
    return answer_loss(answer_logits, answer_targets(batch), answer_mask(batch))


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
        answer_weight: float = 1.0,
        lm_weight: float = 0.0,
        reference: nn.Module | None = None,
        on_nonfinite: str = "stop",
        max_skipped_steps: int = 10,
        keep_schedule: bool = False,
    ):
        super().__init__()
        self.model, self.task = model, task
        # objectives' own parameters (DAS bases...), keyed by objective label
        self.objective_modules = nn.ModuleDict(objective_modules or {})
        self.lr, self.weight_decay, self.betas, self.warmup_steps = lr, weight_decay, tuple(betas), warmup_steps
        self.seed = seed
        self.decay, self.total_steps, self.min_lr_ratio = decay, total_steps, min_lr_ratio
        self.answer_weight, self.lm_weight = answer_weight, lm_weight
        # the frozen starting model (capability preservation): not a submodule, so neither the
        # optimizer, nor checkpoints, nor DDP see it
        self.__dict__["reference"] = reference
        self.on_nonfinite, self.max_skipped_steps = on_nonfinite, max_skipped_steps
        self.skipped_in_row = self.skipped_steps = 0
        # on resume, keep the decay schedule the run started with (trainer.max_steps may have grown)
        self.keep_schedule = keep_schedule
        # a LoRA run's checkpoints hold the trainable weights only (checked by ``run.fitting_weights``)
        self.strict_loading = not has_adapters(model)
        self.train_acc, self.val_acc = MeanMetric(), MeanMetric()
        self.val_nll, self.val_tokens = SumMetric(), SumMetric()

    @property
    def objectives(self) -> list[Objective]:
        if self._trainer is None:
            return []
        return [cb for cb in self.trainer.callbacks if isinstance(cb, Objective)]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.model(input_ids, attention_mask=attention_mask)

    def on_fit_start(self) -> None:
        if self.reference is not None:
            self.reference.to(self.device)

    on_validation_start = on_fit_start

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        step = self.global_step
        weights = [obj.weight_at(step) for obj in self.objectives]
        active = [(obj, w) for obj, w in zip(self.objectives, weights) if w > 0]
        sites = sorted({site for obj, _ in active for site in obj.sites()})
        mask = attention_mask(batch)
        call = tool_call(batch)
        # the positions the step reads: the answer's, and the one that picks the tool
        read = answer_positions(batch) if call is None else torch.cat([answer_positions(batch), call[0][:, None]], 1)
        answered = answer_positions(batch).shape[1]
        # every position's logits only when something reads them (the LM loss, an objective that
        # declares needs_token_logits); else the unembedding runs at the read positions alone (at a
        # real vocabulary it is a third of a step). A model that answers only where it reads (a
        # concept bottleneck) answers there.
        every = per_token_logits(self.model) and (self.lm_weight > 0 or any(obj.needs_token_logits for obj, _ in active))
        edits: dict[str, list] = {}  # what objectives change in the step's own forward (CAFT's ablation)
        for obj, _ in active:
            for name, fn in obj.step_edits(self.model, self.task, step, batch).items():
                edits.setdefault(name, []).append(fn)
        logits, cache = run_with(
            self.model, batch["input_ids"], record=sites, edits=edits, attention_mask=mask,
            positions=None if every else read, narrow=False,
        )  # fmt: skip
        picked = gather_positions(logits, read) if every else logits
        answers = picked[:, :answered]
        loss = task_loss(answers, batch)
        terms = {"train/task_loss": loss}
        self.train_acc(exact_match(answers, answer_targets(batch), answer_mask(batch)))
        size = batch["labels"].shape[0]
        self.log("train/task_loss", loss, prog_bar=True, batch_size=size)
        self.log("train/task_acc", self.train_acc, batch_size=size)
        if call is not None:  # the tool the row calls is emitted by the model: trained with the answer
            tool = F.cross_entropy(picked[:, answered].float(), call[1])
            self.log("train/tool_loss", tool, batch_size=size)
            terms["train/tool_loss"] = tool
            loss = loss + tool
        loss = self.answer_weight * loss
        if self.lm_weight > 0:
            lm = language_model_loss(logits, batch["input_ids"], mask)
            self.log("train/lm_loss", lm, batch_size=size)
            terms["train/lm_loss"] = lm
            if "lm_text/input_ids" in batch:  # the task's plain text, beside the examples
                text_mask = batch["lm_text/attention_mask"]
                text_lm = language_model_loss(
                    self.model(batch["lm_text/input_ids"], attention_mask=text_mask),
                    batch["lm_text/input_ids"],
                    text_mask,
                )
                self.log("train/lm_text_loss", text_lm, batch_size=size)
                terms["train/lm_text_loss"] = text_lm
                lm = (lm + text_lm) / 2
            loss = loss + self.lm_weight * lm
        if active:
            seed = batch_seed(self.seed + 12_345, step * self.trainer.world_size + self.global_rank)
            ctx = StepContext(
                batch,
                logits,
                cache,
                self.model,
                self.task,
                step,
                torch.Generator().manual_seed(seed),
                reference=self.reference,
                answer_logits=answers,
            )
            for objective, weight in active:
                term = objective.term(ctx)
                self.log(f"train/objective/{objective.label}", term, prog_bar=True, batch_size=size)
                terms[f"train/objective/{objective.label}"] = term
                for part, value in objective.parts.items():
                    self.log(f"train/objective/{objective.label}/{part}", value, batch_size=size)
                loss = loss + weight * term
        idle = [obj.label for obj, w in zip(self.objectives, weights) if w <= 0 and obj.label in self.objective_modules]
        if idle:  # DDP expects every parameter to get a gradient each step: give idle ones a zero
            loss = loss + 0.0 * sum(p.sum() for label in idle for p in self.objective_modules[label].parameters())
        self.log("train/loss", loss, batch_size=size)
        terms["train/loss"] = loss
        return loss if self._finite(terms, step) else None  # None: Lightning skips backward and the update

    def _finite(self, terms: dict[str, Tensor], step: int) -> bool:
        """Whether every term of this step is finite (on every process); if not, ``_nonfinite``."""
        values = torch.stack([t.detach().float().reshape(()) for t in terms.values()])
        finite = bool(values.isfinite().all())
        if self._world_size() > 1:
            finite = not self.trainer.strategy.reduce_boolean_decision(not finite, all=False)
        if finite:
            self.skipped_in_row = 0
            return True
        bad = [(name, float(v)) for name, v in zip(terms, values.tolist()) if not math.isfinite(v)]
        name, value = bad[0] if bad else ("a term on another process", math.nan)
        self._nonfinite(f"{name} is {value} at step {step}")
        return False

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """A finite loss can still give non-finite gradients: stop, or (skip) drop them so the
        update leaves every parameter as it was (AdamW skips a parameter without a gradient)."""
        if str(self.trainer.precision).startswith("16"):  # fp16's grad scaler skips overflowing steps itself
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if "replica" in self.__dict__:  # sharded: each rank sees its shards; all must agree
            finite = all(bool(torch.isfinite(local(g)).all()) for g in grads)
            if not self.trainer.strategy.reduce_boolean_decision(not finite, all=False):
                return
        elif not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)).all()):
            return
        self._nonfinite(f"the gradient is non-finite at step {self.global_step}")
        optimizer.zero_grad(set_to_none=True)

    def _nonfinite(self, what: str) -> None:
        """A non-finite step: stop the run (``TrainingDiverged`` saying ``what``), or, with
        ``on_nonfinite="skip"``, count it and let the caller skip the update, up to
        ``max_skipped_steps`` in a row."""
        self.skipped_in_row += 1
        self.skipped_steps += 1
        self.log("train/skipped_steps", float(self.skipped_steps), batch_size=1)
        if self.on_nonfinite == "stop":
            raise TrainingDiverged(what)
        if self._world_size() > 1:  # the config check refuses this; a device count of "auto" can still get here
            raise TrainingDiverged(f"{what} (skip is impossible with {self._world_size()} processes)")
        if self.skipped_in_row > self.max_skipped_steps:
            raise TrainingDiverged(
                f"{what}, the {self.skipped_in_row}th non-finite step in a row (trainer.max_skipped_steps={self.max_skipped_steps})"
            )

    def _world_size(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["faithful_train"] = {
            "schedule_steps": self.total_steps,
            "skipped_steps": self.skipped_steps,
            "skipped_in_row": self.skipped_in_row,
        }
        if has_adapters(self.model):  # the frozen base stays where it came from; the checkpoint names it
            for name, parameter in self.model.named_parameters():
                if "lora_" not in name:
                    checkpoint["state_dict"].pop(f"model.{name}", None)
            checkpoint["faithful_train"]["base"] = self.model.__dict__["lora_base_hash"]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("faithful_train", {})
        self.skipped_steps = int(saved.get("skipped_steps", 0))
        self.skipped_in_row = int(saved.get("skipped_in_row", 0))
        started = int(saved.get("schedule_steps", self.total_steps))
        if self.keep_schedule and started != self.total_steps:
            if self.decay != "none":
                note(
                    f"trainer.max_steps is {self.total_steps}, the run started with {started}: the {self.decay} schedule keeps "
                    f"its {started} steps (the lr stays at its floor after them); set optim.schedule_steps to stretch it"
                )
            self.total_steps = started

    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        mask = attention_mask(batch)
        if dataloader_idx == 1:  # held-out plain text: perplexity
            logits = self.model(batch["input_ids"], attention_mask=mask)
            keep = (mask[:, 1:] * mask[:, :-1]) if mask is not None else torch.ones_like(batch["input_ids"][:, 1:])
            self.val_nll.update(language_model_loss(logits, batch["input_ids"], mask) * keep.sum())
            self.val_tokens.update(keep.sum())
            return
        size = batch["labels"].shape[0]
        call = tool_call(batch)
        # the positions read: the answer's, and the one that picks the tool (one forward for both)
        read = answer_positions(batch) if call is None else torch.cat([answer_positions(batch), call[0][:, None]], 1)
        if self.reference is not None and per_token_logits(self.model):
            answers, cache = run_with(self.model, batch["input_ids"], record=["final"], attention_mask=mask, positions=read, narrow=False)
            reference = self.reference.final_states(batch["input_ids"], mask)
            kl = token_kl_from_states(cache["final"], reference, mask, partial(unembed, self.model), self.reference.unembed)
            self.log("val/kl_to_start", kl, sync_dist=True, batch_size=size, add_dataloader_idx=False)
        elif call is None:
            answers = answer_forward(self.model, batch)
        else:
            answers = self.model(batch["input_ids"], attention_mask=mask, positions=read, narrow=True)
        if call is not None:
            answers, picked = answers[:, :-1], answers[:, -1]
            right = (picked.argmax(-1) == call[1]).float().mean()
            self.log("val/tool_selection_acc", right, sync_dist=True, batch_size=size, add_dataloader_idx=False)
        self.val_acc(exact_match(answers, answer_targets(batch), answer_mask(batch)))
        if "foil_ids" in batch:  # two-answer tasks (IOI: IO against S)
            first = first_answer_logits(answers)
            diff = first.gather(1, batch["labels"][:, None]) - first.gather(1, batch["foil_ids"][:, None])
            self.log("val/logit_diff", diff.float().mean(), sync_dist=True, batch_size=size, add_dataloader_idx=False)
        self.log("val/task_loss", task_loss(answers, batch), sync_dist=True, batch_size=size, add_dataloader_idx=False)
        self.log("val/task_acc", self.val_acc, prog_bar=True, batch_size=size, add_dataloader_idx=False)

    def on_validation_epoch_end(self) -> None:
        if self.val_tokens.update_count:
            nll, tokens = self.val_nll.compute(), self.val_tokens.compute()
            self.log("val/ppl", torch.exp(nll / tokens.clamp_min(1)), add_dataloader_idx=False)
            self.val_nll.reset()
            self.val_tokens.reset()

    def configure_optimizers(self) -> Any:
        # weight decay on the model's matrices only: not on biases, norms or objectives' parameters
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        # an objective's module may carry its own learning rate (``lr``, e.g. an SAE's)
        own_lr = {label: getattr(m, "lr", None) for label, m in self.objective_modules.items()}
        no_decay = [p for p in params if p.dim() < 2] + [
            p for label, m in self.objective_modules.items() if own_lr[label] is None for p in m.parameters() if p.requires_grad
        ]
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        groups += [
            {"params": [p for p in self.objective_modules[label].parameters() if p.requires_grad], "weight_decay": 0.0, "lr": lr, "own": True}
            for label, lr in own_lr.items() if lr is not None
        ]  # fmt: skip
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas)
        if not self.warmup_steps and self.decay == "none":
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- sharded training (trainer.strategy: fsdp; modeling.sharding) ----------------------------

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (``trainer.strategy: fsdp``): keep a meta replica for
        audits, then shard the model (blocks, their adapters apart, the root)."""
        mesh = self.device_mesh
        if mesh is None or is_sharded(self.model):
            return
        self.__dict__["replica"] = meta_replica(self.model)
        shard_model(self.model, mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh)

    def on_after_backward(self) -> None:
        if "replica" in self.__dict__:  # sharded model: the objectives' own modules are replicated
            average_gradients(self.objective_modules.parameters())

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None) -> None:
        """Clip as Lightning does, except that a group with its own learning rate (an SAE trained
        beside the model) is clipped by its own norm: its gradients never scale the model's. A
        sharded model's norm counts every rank's shards (``sharding.clip_grad_norm``)."""
        own = [g for g in optimizer.param_groups if g.get("own")]
        sharded = "replica" in self.__dict__
        if gradient_clip_val is not None and sharded and gradient_clip_algorithm != "value":
            for params in [[p for g in optimizer.param_groups if not g.get("own") for p in g["params"]], *(g["params"] for g in own)]:
                clip_grad_norm(params, gradient_clip_val)
            return
        if not own or gradient_clip_val is None:
            self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm)
            return
        clip = torch.nn.utils.clip_grad_value_ if gradient_clip_algorithm == "value" else torch.nn.utils.clip_grad_norm_
        shared = [p for g in optimizer.param_groups if not g.get("own") for p in g["params"]]
        for params in [shared, *(g["params"] for g in own)]:
            clip(params, gradient_clip_val)

    def lr_factor(self, step: int) -> float:
        """Linear warm-up over ``warmup_steps``, then constant or cosine decay to ``min_lr_ratio``."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.decay == "none" or self.total_steps <= self.warmup_steps:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
