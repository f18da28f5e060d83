"""Where a model's sites live: the hook points a model marks and the ``SitePoint`` records it
declares (``site_points()``), from our transformer's identity modules to a Hugging Face module's
input or output. ``faithful_train.intervene.sites`` reads and edits sites through them.

Recording can be suspended (``records_suspended``): activation checkpointing's recomputation
runs a block again, and a site must be recorded, and a statistic counted, once per forward.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn


def _identity(raw: Any) -> Tensor:
    return raw


def _replace(raw: Any, new: Tensor) -> Any:
    return new


@dataclass
class SitePoint:
    """Where a site lives: a module's output (``kind="output"``) or first input (``"input"``).

    ``read`` turns the raw hook value into the canonical tensor; ``write`` puts an edited
    canonical tensor back into the raw value's form (e.g. a tuple, or a flattened shape).
    """

    module: nn.Module
    kind: str = "output"
    read: Callable[[Any], Tensor] = field(default=_identity)
    write: Callable[[Any, Tensor], Any] = field(default=_replace)


class HookPoint(nn.Identity):
    """An identity module marking a site in our own models (TransformerLens's ``HookPoint``)."""


_records = threading.local()


def recording_suspended() -> bool:
    """Whether recording hooks are off (an activation checkpoint's recomputation is running)."""
    return getattr(_records, "suspended", 0) > 0


@contextmanager
def records_suspended() -> Iterator[None]:
    """Recording hooks record nothing inside: a site is recorded once per logical forward, not again
    when activation checkpointing recomputes it (``modeling.checkpointing``)."""
    _records.suspended = getattr(_records, "suspended", 0) + 1
    try:
        yield
    finally:
        _records.suspended -= 1
