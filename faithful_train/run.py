"""Assemble a run from a config (task + model -> FaithfulModule + objectives + audits ->
Trainer, loggers, run directory), then fit it or audit a checkpoint."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from faithful_train.audits.base import Audit
from faithful_train.config import to_plain
from faithful_train.data import TaskDataModule
from faithful_train.errors import ConfigError, FaithfulError
from faithful_train.modeling import build_model, frozen_copy, model_context
from faithful_train.module import FaithfulModule
from faithful_train.objectives.base import Objective
from faithful_train.registry import AUDITS, OBJECTIVES, TASKS, instantiate
from faithful_train.rundir import (
    RunCSVLogger,
    append_jsonl,
    atomic_write_json,
    atomic_write_text,
    build_summary,
    load_checkpoint,
    truncate_jsonl,
)
from faithful_train.tasks.base import Task


@dataclass
class Run:
    cfg: DictConfig
    run_dir: Path
    task: Task
    module: FaithfulModule
    datamodule: TaskDataModule
    objectives: list[Objective] = field(default_factory=list)
    audits: list[Audit] = field(default_factory=list)


def _unique_labels(items: list[Any], kind: str) -> None:
    seen: set[str] = set()
    for item in items:
        if item.label in seen:
            raise ConfigError(f"two {kind} share the label {item.label!r}; give each a distinct 'label'")
        seen.add(item.label)


def _entry(kind: str, index: int, make: Any) -> Any:
    """``make()``, with a user error prefixed by the config entry that holds it (``objectives.0``)."""
    try:
        return make()
    except FaithfulError as e:
        raise ConfigError(f"{kind}.{index}: {e}") from None


def build(cfg: DictConfig, run_dir: str | Path, config_dir: Path | None = None) -> Run:
    """Everything a run needs, with every name checked before any training starts."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    task = instantiate("task", to_plain(cfg.task), TASKS, Task, config_dir)
    model = build_model(cfg.model, task.vocab_size, task.seq_len, seed=cfg.seed, concepts=task.concepts)
    context = model_context(model)
    if context is not None:
        task.check_context(context)
    probe = task.validation_set(1, 0)
    with torch.no_grad():  # in eval mode: no training-time noise drawn
        vocab = model.eval()(probe["input_ids"], attention_mask=probe.get("attention_mask")).shape[-1]
    model.train()
    if vocab < task.vocab_size:
        raise ConfigError(f"model vocabulary ({vocab}) is smaller than task {task.name!r}'s ({task.vocab_size})")
    objectives = [_entry("objectives", i, lambda: instantiate("objective", to_plain(o), OBJECTIVES, Objective, config_dir)) for i, o in enumerate(cfg.objectives)]
    audits = [_entry("audits", i, lambda: instantiate("audit", to_plain(a), AUDITS, Audit, config_dir)) for i, a in enumerate(cfg.audits)]
    _unique_labels(objectives, "objectives")
    _unique_labels(audits, "audits")
    for kind, items in (("objectives", objectives), ("audits", audits)):
        for i, item in enumerate(items):
            _entry(kind, i, lambda: item.bind(model, task, cfg.seed))
    owned = {o.label: o.module() for o in objectives if o.module() is not None}
    for label in owned:
        if "." in label:
            raise ConfigError(f"objective label {label!r} must not contain '.'")
    optim = cfg.optim
    # the frozen start: for objectives that keep capability, and val/kl_to_start when fine-tuning
    # (a concept bottleneck answers only at its read position: no per-token distribution to compare)
    fine_tuning = bool(cfg.model.get("path")) and cfg.model.get("bottleneck") is None
    wants_reference = any(o.needs_reference for o in objectives) or fine_tuning
    module = FaithfulModule(
        model, task, optim.lr, optim.weight_decay, tuple(optim.betas), optim.warmup_steps, cfg.seed,
        decay=optim.decay, total_steps=cfg.trainer.max_steps, min_lr_ratio=optim.min_lr_ratio,
        objective_modules=owned, answer_weight=cfg.loss.answer, lm_weight=cfg.loss.lm,
        reference=frozen_copy(model) if wants_reference else None,
    )  # fmt: skip
    for audit in audits:
        audit.attach(module)  # e.g. the interchange audit takes a learned rotation from its objective
    data = TaskDataModule(task, cfg.data.batch_size, cfg.seed, cfg.data.val_size, cfg.data.val_batch_size)
    return Run(cfg, Path(run_dir), task, module, data, objectives, audits)


def _loggers(cfg: DictConfig, run_dir: Path, resume_step: int | None) -> list[Logger]:
    loggers: list[Logger] = []
    if cfg.logger.csv:
        loggers.append(RunCSVLogger(run_dir, resume_step))
    wandb_cfg = cfg.logger.wandb
    if wandb_cfg.mode != "disabled":
        from lightning.pytorch.loggers import WandbLogger

        os.environ.setdefault("WANDB_SILENT", "true")
        loggers.append(
            WandbLogger(
                save_dir=str(run_dir),
                project=wandb_cfg.project,
                name=wandb_cfg.name or run_dir.name,
                entity=wandb_cfg.entity,
                tags=list(wandb_cfg.tags),
                mode=wandb_cfg.mode,  # offline unless the user turns it online
                config=to_plain(cfg),
                resume="allow" if resume_step is not None else None,
                id=_wandb_id(run_dir) if resume_step is not None else None,
            )
        )
    return loggers


def _wandb_id(run_dir: Path) -> str | None:
    """The id of the wandb run already in this run directory, so a resumed run continues it."""
    runs = sorted((run_dir / "wandb").glob("*run-*"))
    return runs[-1].name.rsplit("-", 1)[-1] if runs else None


def make_trainer(run: Run, extra_callbacks: list[Any] = (), resume_step: int | None = None) -> L.Trainer:
    t = run.cfg.trainer
    checkpoint = ModelCheckpoint(
        dirpath=run.run_dir / "checkpoints",
        filename="step{step}",
        auto_insert_metric_name=False,
        every_n_train_steps=t.checkpoint_every or t.val_every,
        save_last=True,
        save_top_k=1,
        monitor=None,
    )
    return L.Trainer(
        default_root_dir=str(run.run_dir),
        max_steps=t.max_steps,
        val_check_interval=t.val_every,
        check_val_every_n_epoch=None,
        log_every_n_steps=t.log_every,
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        num_nodes=t.num_nodes,
        precision=t.precision,
        gradient_clip_val=t.gradient_clip_val,
        accumulate_grad_batches=t.accumulate_grad_batches,
        enable_progress_bar=t.progress_bar,
        deterministic=t.deterministic,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        logger=_loggers(run.cfg, run.run_dir, resume_step),
        callbacks=[*run.objectives, *run.audits, checkpoint, *extra_callbacks],
    )


def quiet_lightning() -> None:
    """Keep the terminal to the progress bar and our summary."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_utilities"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    warnings.filterwarnings("ignore", message=".*IterableDataset.*__len__.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")


def fit(run: Run, resume: str | None = None, extra_callbacks: list[Any] = ()) -> dict[str, Any] | None:
    """Train; then validate once more and write ``summary.json``. Returns the summary on rank zero."""
    resume_step = None
    if resume is not None:
        resume_step = int(load_checkpoint(Path(resume)).get("global_step", 0))  # refused if it would run code
    trainer = make_trainer(run, list(extra_callbacks), resume_step)
    if trainer.is_global_zero:
        atomic_write_text(run.run_dir / "config.yaml", OmegaConf.to_yaml(run.cfg))
        if resume_step is not None:
            truncate_jsonl(run.run_dir / "audits.jsonl", resume_step)
    try:
        trainer.fit(run.module, run.datamodule, ckpt_path=resume)
        if trainer.interrupted:
            return None
        train_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        val_metrics = trainer.validate(run.module, run.datamodule, verbose=False)[0]
        if not trainer.is_global_zero:
            return None
        summary = build_summary({**train_metrics, **val_metrics}, run.audits, trainer.global_step)
        atomic_write_json(run.run_dir / "summary.json", summary)
        return summary
    finally:
        _finish_wandb(trainer)


def _finish_wandb(trainer: L.Trainer) -> None:
    """Close this run's wandb run: wandb keeps one run per process, and a later ``fit`` in the
    same process (a recipe training several models) would otherwise log into this one."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger._experiment.finish()


def audit_checkpoint(run: Run, ckpt: str | Path) -> dict[str, Any]:
    """Re-run the config's audits on a checkpoint's weights, without training."""
    path = Path(ckpt)
    state = load_checkpoint(path)
    missing, unexpected = run.module.load_state_dict(state["state_dict"], strict=False)
    missing = [k for k in missing if k.startswith(("model.", "objective_modules."))]
    if missing or unexpected:
        raise ConfigError(f"checkpoint {path} does not fit the config's model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    step = int(state.get("global_step", 0))
    atomic_write_text(run.run_dir / "config.yaml", OmegaConf.to_yaml(run.cfg))
    for audit in run.audits:
        audit.attach(run.module)
        record = audit.remember(audit.evaluate(run.module.model, run.task), step)
        append_jsonl(run.run_dir / "audits.jsonl", {**record, "checkpoint": str(path)})
        audit.write_artifacts(run.module.model, run.task, run.run_dir, step, [])
    summary = build_summary({}, run.audits, step)
    atomic_write_json(run.run_dir / "summary.json", summary)
    return summary
