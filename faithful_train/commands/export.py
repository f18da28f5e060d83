"""``faithful-train export RUN_DIR --out DIR [--merge]``: a run's model (and tokenizer) as a Hugging
Face directory (``save_pretrained``), loadable with ``AutoModelForCausalLM.from_pretrained(DIR)``.

Hugging Face models are saved as they are; our dense transformer as the GPT-2 it equals
(``modeling.convert``). A LoRA run writes its adapter in ``peft``'s format
(``adapter_config.json`` + ``adapter_model.safetensors``, loadable with
``PeftModel.from_pretrained(base, DIR)``), with its base: the ``model.path`` it started from, or,
for a base built from a config, the base itself in ``DIR/base``. ``--merge`` folds the adapters
into the weights and writes the merged model instead. Our transformer's adapters are written
against its GPT-2 form (``qkv`` is GPT-2's ``c_attn``, and so on).

The directory is written beside ``DIR`` and renamed into place, so an interrupted export leaves
nothing half-written. The checkpoint is loaded with ``weights_only=True``: it cannot run code.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from faithful_train.errors import ConfigError
from faithful_train.io.files import umask_mode


def export_run(run_dir: str | Path, out: str | Path, ckpt: str | Path | None = None, merge: bool = False) -> Path:
    from faithful_train.commands.loading import load_run
    from faithful_train.modeling.hf import quiet_progress
    from faithful_train.modeling.lora import has_adapters

    run_dir, out = Path(run_dir), Path(out)
    model, task = load_run(run_dir, ckpt)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    os.chmod(staging, umask_mode(0o777))  # mkdtemp makes 0700
    try:
        with quiet_progress():
            if has_adapters(model) and not merge:
                _write_adapter(model, staging, run_dir, out)
            else:
                _write_model(model, staging, merge)
        tokenizer = getattr(task, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _hugging_face(model: Any) -> Any:
    from faithful_train.modeling.interface import hugging_face_form

    hf_model = hugging_face_form(model)
    if hf_model is None:
        raise ConfigError(
            f"export: a {type(model).__name__} has no Hugging Face form (concept bottlenecks do not export)"
        )
    return hf_model


def _write_model(model: Any, where: Path, merge: bool) -> None:
    from faithful_train.modeling.lora import has_adapters, merge_adapters

    if has_adapters(model) and merge:
        merge_adapters(model)
    _hugging_face(model).save_pretrained(where)


def _write_adapter(model: Any, where: Path, run_dir: Path, final: Path) -> None:
    """The adapter in peft's layout, named against the Hugging Face form of the model, and its base
    (``where`` becomes ``final``)."""
    from safetensors.torch import save_file

    from faithful_train.modeling.lora import hugging_face_adapter, remove_adapters
    from faithful_train.training.config import load_config

    state, config = hugging_face_adapter(model)
    base_path = load_config(run_dir / "config.yaml").model.get("path")
    if base_path is None:  # a base built from a config: written beside the adapter
        _hugging_face(remove_adapters(model)).save_pretrained(where / "base")
        base_path = final / "base"
    config.base_model_name_or_path = str(Path(base_path).resolve())
    config.save_pretrained(where)
    save_file({f"base_model.model.{k}": v for k, v in state.items()}, where / "adapter_model.safetensors")
