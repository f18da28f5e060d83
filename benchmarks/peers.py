"""Peers (pyvene, TransformerLens, sparsify) are benchmark and test helpers installed beside the
venv (``pip install --no-deps --target .bench ...``), never dependencies. One way to import them."""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import sys
from typing import Any


def import_peer(module: str, lib_variable: str, install: str, first: bool = False) -> Any:
    """Import ``module``; if it is not importable, retry with the directory ``$lib_variable`` on
    ``sys.path`` (``first``: before the venv's packages, else after them, so the venv's win).
    Import-time prints are swallowed. ``ImportError`` naming ``install`` if it is not there."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return importlib.import_module(module)
    except ImportError as err:
        lib = os.environ.get(lib_variable)
        if not lib or lib in sys.path:
            raise ImportError(
                f"cannot import {module} ({err}); install it with `{install}` and set {lib_variable}=.bench"
            ) from err
        sys.path.insert(0, lib) if first else sys.path.append(lib)
        return import_peer(module, lib_variable, install, first)
