"""``faithful-train export RUN_DIR --out DIR``: a run's model (and tokenizer) as a Hugging Face
directory (``save_pretrained``), loadable with ``AutoModelForCausalLM.from_pretrained(DIR)``.

Hugging Face models are saved as they are; our dense transformer as the GPT-2 it equals
(``modeling.convert``). The directory is written beside ``DIR`` and renamed into place, so an
interrupted export leaves nothing half-written. The checkpoint is loaded with
``weights_only=True``: it cannot run code.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from faithful_train.errors import ConfigError
from faithful_train.rundir import umask_mode


def export_run(run_dir: str | Path, out: str | Path, ckpt: str | Path | None = None) -> Path:
    from faithful_train.loading import load_run
    from faithful_train.modeling.interface import hugging_face_form

    run_dir, out = Path(run_dir), Path(out)
    model, task = load_run(run_dir, ckpt)
    hf_model = hugging_face_form(model)
    if hf_model is None:
        raise ConfigError(f"export: a {type(model).__name__} has no Hugging Face form (concept bottlenecks do not export)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    os.chmod(staging, umask_mode(0o777))  # mkdtemp makes 0700
    try:
        hf_model.save_pretrained(staging)
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
