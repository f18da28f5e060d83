"""Assemble a run from a config (task + model -> FaithfulModule + objectives + audits ->
Trainer, loggers, run directory), then fit it or audit a checkpoint."""

from __future__ import annotations

import logging
import signal
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

from faithful_train.audits.base import Audit
from faithful_train.errors import ConfigError, FaithfulError, TrainingDiverged
from faithful_train.intervene.hypotheses import HypothesisFiles
from faithful_train.io.checkpoints import load_checkpoint
from faithful_train.io.files import append_jsonl, atomic_write_json, atomic_write_text, truncate_jsonl
from faithful_train.modeling import build_model, freeze, model_context, starting_point
from faithful_train.objectives.base import Objective
from faithful_train.registry import AUDITS, OBJECTIVES, TASKS, instantiate
from faithful_train.tasks.base import Task
from faithful_train.training.checkpoints import SoundCheckpoint, first_nonfinite, model_weights
from faithful_train.training.config import to_plain
from faithful_train.training.datamodule import TaskDataModule
from faithful_train.training.loggers import check_wandb, finish_wandb, make_loggers
from faithful_train.training.module import FaithfulModule
from faithful_train.training.rundir import build_summary, preregister


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
    freeze(model, list(cfg.optim.freeze))
    context = model_context(model)
    if context is not None:
        task.check_context(context)
    probe = task.validation_set(1, 0)
    with torch.no_grad():  # in eval mode: no training-time noise drawn
        vocab = model.eval()(probe["input_ids"], attention_mask=probe.get("attention_mask")).shape[-1]
    model.train()
    if vocab < task.vocab_size:
        raise ConfigError(f"model vocabulary ({vocab}) is smaller than task {task.name!r}'s ({task.vocab_size})")
    objectives = [
        _entry("objectives", i, lambda o=o: instantiate("objective", to_plain(o), OBJECTIVES, Objective, config_dir))
        for i, o in enumerate(cfg.objectives)
    ]
    audits = [
        _entry("audits", i, lambda a=a: instantiate("audit", to_plain(a), AUDITS, Audit, config_dir))
        for i, a in enumerate(cfg.audits)
    ]
    _unique_labels(objectives, "objectives")
    _unique_labels(audits, "audits")
    if cfg.model.get("activation_checkpointing"):
        for i, objective in enumerate(objectives):
            if not objective.supports_activation_checkpointing:
                raise ConfigError(
                    f"objectives.{i}: objective {objective.label!r} ({type(objective).__name__}) does not declare that "
                    "it supports model.activation_checkpointing (supports_activation_checkpointing = True: "
                    "its edits are the same when a block is recomputed); turn model.activation_checkpointing off"
                )
    for kind, items in (("objectives", objectives), ("audits", audits)):
        # objectives that add sites (an SAE's <site>.sae) first: the rest may name those sites
        for i, item in sorted(enumerate(items), key=lambda entry: not getattr(entry[1], "adds_sites", False)):
            _entry(kind, i, lambda item=item: item.bind(model, task, cfg.seed))
    for objective in objectives:  # schedules written as shares of the run become steps
        objective.resolve_schedule(int(cfg.trainer.max_steps))
    owned = {o.label: o.module() for o in objectives if o.module() is not None}
    for label in owned:
        if "." in label:
            raise ConfigError(f"objective label {label!r} must not contain '.'")
    # the frozen start: for objectives that keep capability, and val/kl_to_start when fine-tuning
    # (a concept bottleneck answers only at its read position: no per-token distribution to compare)
    fine_tuning = bool(cfg.model.get("path")) and cfg.model.get("bottleneck") is None
    wants_reference = any(o.needs_reference for o in objectives) or fine_tuning
    if "tool_calls" in task.provides and not any(o.name == "tool_call" for o in objectives):
        raise ConfigError(
            f"task {task.name!r} writes tool calls that the model must emit: add {{name: tool_call}} to objectives "
            "(the loss that teaches it to pick the tool)"
        )
    module = FaithfulModule(
        model,
        task,
        cfg.optim,
        cfg.loss,
        cfg.trainer,
        cfg.seed,
        objective_modules=owned,
        reference=starting_point(model) if wants_reference else None,
    )
    for i, objective in enumerate(objectives):
        # e.g. caft takes an sae objective's SAE
        _entry("objectives", i, lambda objective=objective: objective.attach(module))
    files = HypothesisFiles(run_dir, {o.label: o.hypothesis for o in objectives if o.hypothesis() is not None})
    for i, audit in enumerate(audits):
        # e.g. the alignment (and rotation) an objective writes
        _entry("audits", i, lambda audit=audit: audit.use_hypotheses(files))
        _entry("audits", i, lambda audit=audit: audit.attach(module))  # e.g. an SAE read from its files
    data = TaskDataModule(task, cfg.data.batch_size, cfg.seed, cfg.data.val_size, cfg.data.val_batch_size)
    return Run(cfg, Path(run_dir), task, module, data, objectives, audits)


def make_trainer(
    run: Run, extra_callbacks: list[Any] = (), resume_step: int | None = None, csv_rows: int | None = None
) -> L.Trainer:
    t = run.cfg.trainer
    checkpoint = SoundCheckpoint(
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
        strategy=fsdp_strategy(t) if t.strategy == "fsdp" else t.strategy,
        num_nodes=t.num_nodes,
        precision=t.precision,
        gradient_clip_val=t.gradient_clip_val,
        accumulate_grad_batches=t.accumulate_grad_batches,
        enable_progress_bar=t.progress_bar,
        deterministic=t.deterministic,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        logger=make_loggers(run.cfg, run.run_dir, resume_step, csv_rows),
        callbacks=[*run.objectives, *run.audits, checkpoint, *_progress_bars(run.cfg), *extra_callbacks, StopOnCtrlC()],
    )


def fsdp_strategy(t: DictConfig) -> Any:
    """``trainer.strategy: fsdp``: FSDP2 through Lightning's ``ModelParallelStrategy`` (data parallel
    over every process, no tensor parallelism; ``FaithfulModule.configure_model`` shards), saving
    whole checkpoints that ``audit``, ``verify`` and ``export`` read (``modeling.sharding``)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    devices = t.devices
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if not isinstance(devices, int) or devices < 1:  # auto / -1 / a list of device ids
        cuda = t.accelerator in ("gpu", "cuda") or (t.accelerator == "auto" and torch.cuda.is_available())
        devices = (
            len(devices)
            if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices)
            else (torch.cuda.device_count() if cuda else 1)
        )
    world = devices * t.num_nodes
    return ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1, save_distributed_checkpoint=False)


def _progress_bars(cfg: DictConfig) -> list[Any]:
    """Lightning's rich bar, labelled "train" (its "Epoch 0/-2" counts epochs of an endless stream;
    a run is ``trainer.max_steps`` long, which is the bar's total)."""
    if not cfg.trainer.progress_bar:
        return []
    try:
        from lightning.pytorch.callbacks import RichProgressBar
        from rich import progress  # noqa: F401  (Lightning falls back to tqdm without rich)
    except ImportError:
        return []

    class StepProgressBar(RichProgressBar):
        def _get_train_description(self, current_epoch: int) -> str:
            return f"{'train':{len(self.validation_description)}}"

    return [StepProgressBar()]


def quiet_lightning() -> None:
    """Keep the terminal to the progress bar and our summary."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_utilities"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    warnings.filterwarnings("ignore", message=".*IterableDataset.*__len__.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")
    warnings.filterwarnings(
        "ignore", message=".*training_step. returned .None.*"
    )  # on purpose: trainer.on_nonfinite=skip


class RunInterrupted(Exception):
    """Ctrl-C stopped training (Lightning shut it down cleanly); the CLI says how to resume."""

    def __init__(self, step: int, checkpoint: Path | None, checkpoint_step: int | None):
        self.step, self.checkpoint, self.checkpoint_step = step, checkpoint, checkpoint_step
        super().__init__(f"stopped at step {step}")


class StopOnCtrlC(Callback):
    """Ctrl-C asks the run to stop at the end of the current step: the signal handler only sets a
    flag, which nothing can swallow (a ``KeyboardInterrupt`` raised inside a finaliser or a
    library's ``except`` is lost, and the run would go on), and Lightning stops cleanly on
    ``should_stop``. A second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False

    def handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if self.requested:
            trainer.should_stop = True


def last_checkpoint(run_dir: Path) -> tuple[Path | None, int | None]:
    """``<run dir>/checkpoints/last.ckpt`` and its step, if there is one that loads."""
    path = run_dir / "checkpoints" / "last.ckpt"
    try:
        return path, int(load_checkpoint(path).get("global_step", 0))
    except FaithfulError:
        return None, None


def fit(run: Run, resume: str | None = None, extra_callbacks: list[Any] = ()) -> dict[str, Any] | None:
    """Train; then validate once more and write ``summary.json``. Returns the summary on rank zero.

    Raises ``RunInterrupted`` on Ctrl-C, and ``TrainingDiverged`` (naming the term, the step and
    the last sound checkpoint) when a loss, a term or the weights stop being finite."""
    check_wandb(run.cfg)  # before anything is written
    resume_step = csv_rows = None
    if resume is not None:
        state = load_checkpoint(Path(resume))  # refused if it would run code
        fitting_weights(run, state, Path(resume))  # one line if it is another model's
        resume_step, csv_rows = int(state.get("global_step", 0)), state.get("metrics_csv_rows")
    trainer = make_trainer(run, list(extra_callbacks), resume_step, csv_rows)
    if trainer.is_global_zero:
        config_text = OmegaConf.to_yaml(run.cfg)
        preregister(run.run_dir, config_text, run.audits, run.cfg.strict, resume_step is not None, resume_step or 0)
        atomic_write_text(run.run_dir / "config.yaml", config_text)
        if resume_step is not None:
            truncate_jsonl(run.run_dir / "audits.jsonl", resume_step)
    on_sigint = signal.getsignal(signal.SIGINT)  # Lightning ignores Ctrl-C after the first one
    stop = next(c for c in trainer.callbacks if isinstance(c, StopOnCtrlC))
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, stop.handle)
    try:
        trainer.fit(run.module, run.datamodule, ckpt_path=resume, weights_only=True)
        if trainer.interrupted or stop.requested:
            raise RunInterrupted(trainer.global_step, *last_checkpoint(run.run_dir))
        train_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        val_metrics = trainer.validate(run.module, run.datamodule, verbose=False)[0]
        if not trainer.is_global_zero:
            return None
        summary = build_summary({**train_metrics, **val_metrics}, run.audits, trainer.global_step)
        atomic_write_json(run.run_dir / "summary.json", summary)
        return summary
    except SystemExit:  # Lightning's answer to Ctrl-C: sys.exit(1) after a clean shutdown
        if trainer.interrupted:
            raise RunInterrupted(trainer.global_step, *last_checkpoint(run.run_dir)) from None
        raise
    except TrainingDiverged as e:
        path, step = last_checkpoint(run.run_dir)
        where = f"the last sound checkpoint is {path} (step {step})" if path else "no checkpoint was written"
        raise TrainingDiverged(
            f"training diverged: {e}; {where}. Lower optim.lr, clip gradients (trainer.gradient_clip_val), "
            "or skip such steps (trainer.on_nonfinite=skip)"
        ) from None
    finally:
        if signal.getsignal(signal.SIGINT) != on_sigint and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, on_sigint)
        finish_wandb(trainer)


def fitting_weights(run: Run, state: dict[str, Any], path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The checkpoint's model weights and its objectives' own (``objective_modules``), each checked
    against the run's before anything loads (``rundir.model_weights``); weights of an objective
    the config lacks are left out."""
    weights = model_weights(run.module.model, state, path)
    mine = run.module.objective_modules.state_dict()
    prefix = "objective_modules."
    owned = {
        k[len(prefix) :]: v
        for k, v in state["state_dict"].items()
        if k.startswith(prefix) and k[len(prefix) :].split(".")[0] in run.module.objective_modules
    }
    for key, value in owned.items():
        if key in mine and tuple(mine[key].shape) != tuple(value.shape):
            raise ConfigError(
                f"checkpoint {path} does not fit the config's objectives: {prefix}{key} is {list(value.shape)} there "
                f"and {list(mine[key].shape)} here"
            )
    missing = [k for k in mine if k not in owned]
    if missing:
        raise ConfigError(f"checkpoint {path} does not fit the config's objectives: missing {prefix}{missing[0]}")
    return weights, owned


def audit_checkpoint(run: Run, ckpt: str | Path) -> dict[str, Any]:
    """Re-run the config's audits on a checkpoint's weights, without training."""
    path = Path(ckpt)
    state = load_checkpoint(path)
    weights, owned = fitting_weights(run, state, path)
    run.module.model.load_state_dict(weights, strict=False)
    run.module.objective_modules.load_state_dict(owned, strict=False)
    bad = first_nonfinite(run.module)
    if bad is not None:
        raise ConfigError(
            f"checkpoint {path} holds non-finite weights ({bad}): the run diverged; audit an earlier checkpoint"
        )
    step = int(state.get("global_step", 0))
    config_text = OmegaConf.to_yaml(run.cfg)
    preregister(run.run_dir, config_text, run.audits, run.cfg.strict, keep_existing=True, at_step=step)
    atomic_write_text(run.run_dir / "config.yaml", config_text)
    for audit in run.audits:
        audit.attach(run.module)
        record = audit.remember(audit.evaluate(run.module.model, run.task), step)
        append_jsonl(run.run_dir / "audits.jsonl", {**record, "checkpoint": str(path)})
        audit.write_artifacts(run.module.model, run.task, run.run_dir, step, [])
    summary = build_summary({}, run.audits, step)
    atomic_write_json(run.run_dir / "summary.json", summary)
    return summary
