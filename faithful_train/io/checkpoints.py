"""Reading a checkpoint safely: ``torch.load(..., weights_only=True)``, so a pickle that would run
code is refused, not run, and every other failure is one line naming the file."""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from faithful_train.errors import ConfigError, first_line


def _first_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(1)


def load_checkpoint(path: Path) -> dict:
    """A Lightning checkpoint's contents, loaded with ``weights_only=True`` (a pickle that would run
    code is refused, not run), or a one-line error."""
    if not path.is_file():
        raise ConfigError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path) and _first_byte(path) != b"\x80":  # neither torch.save's zip nor a pickle
        raise ConfigError(f"{path} is not a checkpoint that loads safely: not a file written by torch.save")
    try:
        # mmap needs torch.save's zip format; an older or foreign file is read (safely) without it
        with warnings.catch_warnings():  # "Detected pickle protocol 4": a foreign pickle, refused below if unsafe
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:
        code = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", str(e))
        if code:
            reason = f"it would call {code.group(1)} (refused: checkpoints load with weights_only=True)"
        elif "Weights only load failed" in str(e):
            reason = (
                "it holds more than tensors and plain containers (refused: checkpoints load with weights_only=True)"
            )
        else:
            reason = first_line(e, 160) if isinstance(e, pickle.UnpicklingError) else "not a file written by torch.save"
        raise ConfigError(f"{path} is not a checkpoint that loads safely: {reason}") from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise ConfigError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    return state
