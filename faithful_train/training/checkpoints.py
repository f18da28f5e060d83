"""Checkpoints a run writes and reads back: never a non-finite one (``SoundCheckpoint``), and a
checkpoint of another model refused in one line before anything loads (``model_weights``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from faithful_train.errors import ConfigError, TrainingDiverged
from faithful_train.training.metrics_csv import RunCSVLogger


def first_nonfinite(module: torch.nn.Module) -> str | None:
    """The first parameter or buffer with a non-finite value (of this rank's shard, when sharded)."""
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


class SoundCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` that never writes non-finite weights (``last.ckpt`` stays
    the last sound state) and first flushes ``metrics.csv``, recording its row count in the
    checkpoint so a resume can tell whether the log lost rows."""

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        bad = first_nonfinite(trainer.lightning_module)
        if trainer.strategy.reduce_boolean_decision(bad is not None, all=False):
            raise TrainingDiverged(
                f"non-finite weights ({bad or 'on another process'}) at step {trainer.global_step}; not checkpointed"
            )
        super()._save_checkpoint(trainer, filepath)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, RunCSVLogger) and trainer.is_global_zero:
                logger.save()
                checkpoint["metrics_csv_rows"] = logger.experiment.rows_written


def model_weights(
    model: torch.nn.Module, state: Mapping[str, Any], path: Path, prefix: str = "model."
) -> dict[str, torch.Tensor]:
    """The model's weights in checkpoint ``state`` (its keys under ``prefix``), checked against
    ``model`` before anything loads, each mismatch one line: a weight of another shape (another
    size or vocabulary), weights missing or unexpected. A LoRA run's checkpoint holds the
    trainable weights only and names its base by hash (``faithful_train.base``): the base's
    weights are then the model's own, which must be that base."""
    from faithful_train.modeling.lora import has_adapters

    saved = {k[len(prefix) :]: v for k, v in state["state_dict"].items() if k.startswith(prefix)}
    own = model.state_dict()
    for key, value in saved.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise ConfigError(
                f"checkpoint {path} does not fit the config's model: {prefix}{key} is {list(value.shape)} there and "
                f"{list(own[key].shape)} here (a model of another size or vocabulary?)"
            )
    base = (state.get("faithful_train") or {}).get("base")
    adapters = has_adapters(model)
    if base is not None and not adapters:
        raise ConfigError(
            f"checkpoint {path} holds LoRA adapters only (trained on base {base}); the config has no model.lora"
        )
    optional: set[str] = set()
    if base is not None:
        if base != model.__dict__["lora_base_hash"]:
            raise ConfigError(
                f"checkpoint {path} holds adapters trained on another base model (base {base}; this config's model is "
                f"{model.__dict__['lora_base_hash']}): point model.path at the model that run started from"
            )
        optional = {name for name, p in model.named_parameters() if "lora_" not in name}
    missing = [k for k in own if k not in saved and k not in optional]
    unexpected = [k for k in saved if k not in own]
    if missing or unexpected:
        hint = " (the config adds LoRA adapters; the checkpoint has none)" if adapters and base is None else ""
        raise ConfigError(
            f"checkpoint {path} does not fit the config's model{hint}: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    return saved
