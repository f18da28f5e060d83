"""The starting point that capability preservation compares with (``preserve``, ``val/kl_to_start``).

With LoRA adapters it is the same model with its adapters off (``AdapterFreeReference``): no
second copy of the weights. Otherwise it is a frozen copy of the model as the run starts
(``FrozenCopy``). Both give logits (``__call__``), and the final hidden states of every position
with only the last one unembedded (``final_states``) plus the unembedding (``unembed``), from
which a per-token KL over the whole vocabulary is computed in chunks.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from faithful_train.modeling.interface import final_states, unembed
from faithful_train.modeling.lora import adapters_disabled, has_adapters


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode (no dropout), each module's mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


class FrozenCopy:
    """A copy of the model as it is now, in eval mode, that never trains (not a submodule of
    anything: neither the optimizer, nor checkpoints, nor DDP see it)."""

    def __init__(self, model: nn.Module):
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)

    @contextmanager
    def _running(self) -> Iterator[None]:
        with torch.no_grad():
            yield

    def __call__(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        with self._running():
            return self.model(input_ids, attention_mask=attention_mask, **kwargs)

    def final_states(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        with self._running():
            return final_states(self.model, input_ids, attention_mask)

    def unembed(self, states: Tensor) -> Tensor:
        with self._running():
            return unembed(self.model, states)

    def to(self, *args: Any, **kwargs: Any) -> FrozenCopy:
        self.model.to(*args, **kwargs)
        return self


class AdapterFreeReference(FrozenCopy):
    """The model itself with its LoRA adapters off, in eval mode, without gradients."""

    def __init__(self, model: nn.Module):
        self.model = model

    @contextmanager
    def _running(self) -> Iterator[None]:
        with adapters_disabled(self.model), evaluating(self.model), torch.no_grad():
            yield

    def to(self, *args: Any, **kwargs: Any) -> AdapterFreeReference:
        return self  # it is the model itself, wherever the model is


def starting_point(model: nn.Module) -> FrozenCopy:
    """The model with its adapters off if it has adapters, else a frozen copy of it."""
    return AdapterFreeReference(model) if has_adapters(model) else FrozenCopy(model)
