"""Models for use from Python: ``load_model`` (a run directory, a ``save_pretrained`` directory or
a preset) and ``wrap`` (a Hugging Face model already in memory), each returning a model with the
canonical sites that ``faithful_train.intervene.sites``, the interventions and the audits work on."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from faithful_train.errors import ConfigError

if TYPE_CHECKING:  # torch is imported when a model is, not with the package
    from torch import nn


def wrap(hf_model: Any) -> nn.Module:
    """A ``transformers`` causal LM (gpt2, llama, mixtral, qwen2_moe, olmoe) behind our sites."""
    from faithful_train.modeling.hf import HFAdapter, _family

    _family(getattr(hf_model.config, "model_type", type(hf_model).__name__))  # one line naming the supported ones
    return HFAdapter(hf_model)


def load_model(
    source: str | os.PathLike,
    ckpt: str | os.PathLike | None = None,
    vocab_size: int | None = None,
    seq_len: int | None = None,
    seed: int = 0,
) -> nn.Module:
    """A model, in eval mode, from

    - a run directory (``config.yaml`` + ``checkpoints/last.ckpt``, or ``ckpt``): the trained model;
    - a directory written by ``save_pretrained`` (``config.json``): the Hugging Face model, wrapped;
    - a preset name or file (``dense-tiny``, ``gpt2-tiny``, ``models/x.yaml``): freshly initialised
      with ``seed``, sized by ``vocab_size`` (required) and ``seq_len`` (default 64).
    """
    path = Path(source)
    if (path / "config.yaml").is_file():
        model, _ = load_run(path, ckpt)
        return model.eval()
    if (path / "config.json").is_file():
        from faithful_train.modeling.hf import HFAdapter

        return HFAdapter.from_pretrained(path).eval()
    from faithful_train.modeling import build_model
    from faithful_train.training.config import resolve_model

    if vocab_size is None:
        raise ConfigError(f"load_model({str(source)!r}): a preset needs vocab_size (and optionally seq_len)")
    return build_model(resolve_model(str(source)), vocab_size, seq_len or 64, seed=seed).eval()


def load_run(run_dir: str | os.PathLike, ckpt: str | os.PathLike | None = None) -> tuple[nn.Module, Any]:
    """A run directory's model with the checkpoint's weights (default ``last.ckpt``, loaded with
    ``weights_only=True``), and its task (tokenizer and data included)."""
    from faithful_train.io.checkpoints import load_checkpoint
    from faithful_train.training import run as runs
    from faithful_train.training.config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)")
    state = load_checkpoint(Path(ckpt) if ckpt else run_dir / "checkpoints" / "last.ckpt")
    cfg = load_config(run_dir / "config.yaml")
    cfg.objectives, cfg.audits = [], []  # only the model and the task are needed
    cfg.logger.wandb.mode = "disabled"  # nothing is logged (an online run's config loads offline)
    run = runs.build(cfg, run_dir)
    load_weights(run.module.model, state, Path(ckpt) if ckpt else run_dir / "checkpoints" / "last.ckpt")
    return run.module.model, run.task


def load_weights(model: nn.Module, state: dict[str, Any], path: str | os.PathLike = "the checkpoint") -> None:
    """The model's weights from a loaded checkpoint; a checkpoint of another model (another size,
    another base, adapters or not) is one line (``rundir.model_weights``)."""
    from faithful_train.training.checkpoints import model_weights

    model.load_state_dict(model_weights(model, state, Path(path)), strict=False)
