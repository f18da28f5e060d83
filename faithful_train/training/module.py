"""FaithfulModule: the LightningModule that sums the answer loss and the objectives' terms.

Training step (DESIGN.md §3)::

    record the sites the objectives need (with their step edits, if any)  ->  answer loss
    for objective in the trainer's Objective callbacks:
        loss += weight(step) * objective.term(ctx)

Every loss beyond the answer's is an objective (a tool call, a language-model loss, a
faithfulness term), logged under ``train/objective/<label>``. The step's one forward unembeds
the positions something reads: the answer's and each objective's ``reads``, or every position
when an objective ``needs_token_logits``. The objectives' extra (patched) forwards run inside this
step, so under DDP/FSDP their gradients are reduced like any other.

Validation logs the answer's loss and accuracy, on text rows with a rationale (``steps``) the
accuracy of the answer the model writes after a rationale it generates from the prompt alone
(``val/gen_acc``, greedy; ``trainer.val_generation: false`` skips it), the task's own figures
(``Task.validation_metrics``), each objective's (``Objective.validation_metrics``), the KL to
the starting model when there is one (``val/kl_to_start``) and, at the end, the perplexity of
the task's held-out text (``val/ppl``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torchmetrics import MeanMetric, SumMetric

from faithful_train.errors import TrainingDiverged, note
from faithful_train.functional.cot import generated_rationales, generation_length
from faithful_train.functional.generation import Sampling
from faithful_train.functional.losses import answer_loss, exact_match, token_kl_from_states, token_nll_from_states
from faithful_train.intervene.sites import run_with
from faithful_train.modeling.interface import final_states, per_token_logits, unembed
from faithful_train.modeling.lora import has_adapters
from faithful_train.modeling.sharding import average_gradients, is_sharded, local, meta_replica, shard_model
from faithful_train.objectives.base import Objective, StepContext
from faithful_train.tasks.base import Batch, Task, batch_seed
from faithful_train.tasks.batch import answer_mask, answer_positions, answer_targets, attention_mask, gather_positions
from faithful_train.tasks.reasoning import rationale_as_text
from faithful_train.training.config import LossSection, OptimSection, TrainerSection
from faithful_train.training.optim import clip_own_groups, lr_factor, parameter_groups


def task_loss(answer_logits: Tensor, batch: Batch) -> Tensor:
    """Mean cross-entropy over the answer's tokens (teacher forcing); one token for generated tasks."""
    return answer_loss(answer_logits, answer_targets(batch), answer_mask(batch))


def generated_accuracy(model: nn.Module, task: Task, batch: Batch) -> Tensor:
    """The share of rows whose prompt alone, continued greedily, writes a rationale, the
    conclusion and then the right answer (as many new tokens as the batch's longest rationale
    and conclusion, plus one)."""
    sampling = Sampling(temperature=0.0, max_new_tokens=generation_length(batch))
    answers, _ = generated_rationales(model, batch, sampling, task.filler_token)
    return (answers == batch["labels"]).float().mean()


def read_positions(batch: Batch, objectives: list[Objective]) -> tuple[Tensor, dict[str, slice]]:
    """The positions a forward reads ``(B, P)``: the answer's, then each objective's ``reads``; and
    where each objective's positions sit among them."""
    pieces, spans = [answer_positions(batch)], {}
    start = pieces[0].shape[1]
    for objective in objectives:
        extra = objective.reads(batch)
        if extra is not None:
            pieces.append(extra)
            spans[objective.label] = slice(start, start + extra.shape[1])
            start += extra.shape[1]
    return (pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1)), spans


@dataclass
class StepLoss:
    loss: Tensor  # answer_weight * answer loss + sum of weight * term
    terms: dict[str, Tensor]  # train/task_loss and each train/objective/<label>, unweighted
    answers: Tensor  # (B, A, vocab) at the answer positions


def step_loss(
    model: nn.Module,
    task: Task,
    active: list[tuple[Objective, float]],
    batch: Batch,
    step: int,
    seed: int,
    reference: Any = None,
    answer_weight: float = 1.0,
) -> StepLoss:
    """The training loss of one step, without Lightning (``FaithfulModule.training_step`` logs it):
    one forward that records the sites ``active`` objectives declare, with their step edits, and
    unembeds the positions something reads (every position when a term ``needs_token_logits``; a
    model that answers only where it reads, a concept bottleneck, answers there); then the
    answer loss and each term. ``seed`` seeds the terms' generator."""
    sites = sorted({site for obj, _ in active for site in obj.sites()})
    mask = attention_mask(batch)
    read, spans = read_positions(batch, [obj for obj, _ in active])
    every = per_token_logits(model) and any(obj.needs_token_logits for obj, _ in active)
    edits: dict[str, list] = {}  # what objectives change in the step's own forward (CAFT's ablation)
    for obj, _ in active:
        for name, fn in obj.step_edits(model, task, step, batch).items():
            edits.setdefault(name, []).append(fn)
    logits, cache = run_with(
        model,
        batch["input_ids"],
        record=sites,
        edits=edits,
        attention_mask=mask,
        positions=None if every else read,
        narrow=False,
    )
    picked = gather_positions(logits, read) if every else logits
    answers = picked[:, : answer_positions(batch).shape[1]]
    answer = task_loss(answers, batch)
    terms = {"train/task_loss": answer}
    loss = answer_weight * answer
    if active:
        ctx = StepContext(
            batch,
            logits,
            cache,
            model,
            task,
            step,
            torch.Generator().manual_seed(seed),
            reference=reference,
            answer_logits=answers,
            read_logits={label: picked[:, where] for label, where in spans.items()},
        )
        for objective, weight in active:
            term = objective.term(ctx)
            terms[f"train/objective/{objective.label}"] = term
            loss = loss + weight * term
    return StepLoss(loss, terms, answers)


class FaithfulModule(LightningModule):
    """``model`` trained on ``task`` with the run's config sections: ``optim`` (learning rate,
    schedule, weight decay), ``loss`` (the answer loss's weight) and ``trainer`` (what a non-finite
    step does)."""

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        optim: Any = None,
        loss: Any = None,
        trainer: Any = None,
        seed: int = 0,
        objective_modules: dict[str, nn.Module] | None = None,
        reference: Any = None,
    ):
        super().__init__()
        self.model, self.task, self.seed = model, task, seed
        self.optim = optim if optim is not None else OptimSection()
        self.answer_weight = float((loss if loss is not None else LossSection()).answer)
        trainer = trainer if trainer is not None else TrainerSection()
        self.on_nonfinite, self.max_skipped_steps = trainer.on_nonfinite, trainer.max_skipped_steps
        self.val_generation = bool(trainer.val_generation) and rationale_as_text(task)
        # the decay spans optim.schedule_steps, else the first start's trainer.max_steps, kept on
        # resume (trainer.max_steps may have grown)
        self.total_steps = self.optim.schedule_steps or trainer.max_steps
        self.keep_schedule = self.optim.schedule_steps is None
        # objectives' own parameters (DAS bases, SAEs), keyed by objective label
        self.objective_modules = nn.ModuleDict(objective_modules or {})
        # the starting model (capability preservation): not a submodule, so neither the
        # optimizer, nor checkpoints, nor DDP see it (modeling.reference)
        self.__dict__["reference"] = reference
        self.skipped_in_row = self.skipped_steps = 0
        # a LoRA run's checkpoints hold the trainable weights only (checked by ``run.fitting_weights``)
        self.strict_loading = not has_adapters(model)
        self.train_acc, self.val_acc = MeanMetric(), MeanMetric()

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

    # -- the step -------------------------------------------------------------------------------

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        step = self.global_step
        weights = [obj.weight_at(step) for obj in self.objectives]
        active = [(obj, w) for obj, w in zip(self.objectives, weights) if w > 0]
        seed = batch_seed(self.seed + 12_345, step * self.trainer.world_size + self.global_rank)
        out = step_loss(self.model, self.task, active, batch, step, seed, self.reference, self.answer_weight)
        size = batch["labels"].shape[0]
        self.train_acc(exact_match(out.answers, answer_targets(batch), answer_mask(batch)))
        self.log("train/task_loss", out.terms["train/task_loss"], prog_bar=True, batch_size=size)
        self.log("train/task_acc", self.train_acc, batch_size=size)
        for objective, _ in active:
            self.log(
                f"train/objective/{objective.label}",
                out.terms[f"train/objective/{objective.label}"],
                prog_bar=True,
                batch_size=size,
            )
            for part, value in objective.parts.items():
                self.log(f"train/objective/{objective.label}/{part}", value, batch_size=size)
        loss = out.loss
        idle = [obj.label for obj, w in zip(self.objectives, weights) if w <= 0 and obj.label in self.objective_modules]
        if idle:  # DDP expects every parameter to get a gradient each step: give idle ones a zero
            loss = loss + 0.0 * sum(p.sum() for label in idle for p in self.objective_modules[label].parameters())
        self.log("train/loss", loss, batch_size=size)
        terms = {**out.terms, "train/loss": loss}
        return loss if self._finite(terms, step) else None  # None: Lightning skips backward and the update

    # -- validation -----------------------------------------------------------------------------

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        mask = attention_mask(batch)
        size = batch["labels"].shape[0]
        read, spans = read_positions(batch, self.objectives)
        compare = self.reference is not None and per_token_logits(self.model)
        logits, cache = run_with(
            self.model,
            batch["input_ids"],
            record=["final"] if compare else [],
            attention_mask=mask,
            positions=read,
            narrow=not compare,
        )
        answers = logits[:, : answer_positions(batch).shape[1]]
        figures = {"task_loss": task_loss(answers, batch)}
        if compare:  # how far the model has moved from where it started, every token's distribution
            reference = self.reference.final_states(batch["input_ids"], mask)
            figures["kl_to_start"] = token_kl_from_states(
                cache["final"], reference, mask, partial(unembed, self.model), self.reference.unembed
            )
        figures |= self.task.validation_metrics(answers, batch)
        if self.val_generation:
            figures["gen_acc"] = generated_accuracy(self.model, self.task, batch)
        ctx = StepContext(
            batch,
            logits,
            cache,
            self.model,
            self.task,
            self.global_step,
            torch.Generator(),
            reference=self.reference,
            answer_logits=answers,
            read_logits={label: logits[:, where] for label, where in spans.items()},
        )
        for objective in self.objectives:
            figures |= objective.validation_metrics(ctx)
        for name, value in figures.items():
            self.log(f"val/{name}", value.float(), sync_dist=True, batch_size=size)
        self.val_acc(exact_match(answers, answer_targets(batch), answer_mask(batch)))
        self.log("val/task_acc", self.val_acc, prog_bar=True, batch_size=size)

    def on_validation_epoch_end(self) -> None:
        """``val/ppl``: the perplexity of the task's held-out text, this rank's share of its
        batches, summed over ranks (a full vocabulary's logits unembedded a chunk at a time)."""
        text = (
            self.task.perplexity_batches(self.trainer.datamodule.val_batch_size) if self._trainer is not None else None
        )
        if not text or not per_token_logits(self.model):
            return
        nll, tokens = SumMetric().to(self.device), SumMetric().to(self.device)
        rank, world = self.global_rank, self.trainer.world_size
        with torch.no_grad():
            for batch in text[rank::world]:
                ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
                total, count = token_nll_from_states(
                    final_states(self.model, ids, mask), ids, mask, partial(unembed, self.model)
                )
                nll.update(total)
                tokens.update(count)
        self.log("val/ppl", torch.exp(nll.compute() / tokens.compute().clamp_min(1)), sync_dist=False)

    # -- non-finite steps -----------------------------------------------------------------------

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
                f"{what}, the {self.skipped_in_row}th non-finite step in a row "
                f"(trainer.max_skipped_steps={self.max_skipped_steps})"
            )

    def _world_size(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    # -- checkpoints ----------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["faithful_train"] = {
            "schedule_steps": self.total_steps,
            "skipped_steps": self.skipped_steps,
            "skipped_in_row": self.skipped_in_row,
        }
        if has_adapters(self.model):  # the frozen base stays where it came from; the checkpoint names it
            for name, _ in self.model.named_parameters():
                if "lora_" not in name:
                    checkpoint["state_dict"].pop(f"model.{name}", None)
            checkpoint["faithful_train"]["base"] = self.model.__dict__["lora_base_hash"]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("faithful_train", {})
        self.skipped_steps = int(saved.get("skipped_steps", 0))
        self.skipped_in_row = int(saved.get("skipped_in_row", 0))
        started = int(saved.get("schedule_steps", self.total_steps))
        if self.keep_schedule and started != self.total_steps:
            if self.optim.decay != "none":
                note(
                    f"trainer.max_steps is {self.total_steps}, the run started with {started}: "
                    f"the {self.optim.decay} schedule keeps its {started} steps (the lr stays at its floor after "
                    "them); set optim.schedule_steps to stretch it"
                )
            self.total_steps = started

    # -- optimisation ---------------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        groups = parameter_groups(self.model, self.objective_modules, self.optim.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=self.optim.lr, betas=tuple(self.optim.betas))
        if not self.optim.warmup_steps and self.optim.decay == "none":
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_factor(self, step: int) -> float:
        """The learning rate's factor at ``step`` (``optim.lr_factor``)."""
        return lr_factor(step, self.optim.warmup_steps, self.optim.decay, self.total_steps, self.optim.min_lr_ratio)

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """Clip as Lightning does, except that a group with its own learning rate (an SAE trained
        beside the model) is clipped by its own norm, and a sharded model's norm counts every
        rank's shards (``training.optim.clip_own_groups``)."""
        sharded = "replica" in self.__dict__
        if gradient_clip_val is None or not (sharded or any(g.get("own") for g in optimizer.param_groups)):
            self.clip_gradients(
                optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm
            )
            return
        clip_own_groups(optimizer, gradient_clip_val, value=gradient_clip_algorithm == "value", sharded=sharded)

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
