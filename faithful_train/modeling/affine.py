"""Affine layers read as matrices, whatever wraps them: what the edge-level forward slices into
heads (``GraphParts``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from faithful_train.errors import ConfigError


def affine_weights(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """An affine layer as ``(weight (out, in), bias (out,) or None)``: a plain ``nn.Linear``'s own,
    GPT-2's ``Conv1D`` transposed, and a wrapped one (LoRA adapters) by probing it with the
    identity, so its adapters count and their gradients flow."""
    from transformers.pytorch_utils import Conv1D

    if type(module) is nn.Linear:
        return module.weight, module.bias
    if type(module) is Conv1D:
        return module.weight.T, module.bias
    width = getattr(module, "in_features", None)
    if width is None:
        raise ConfigError(f"{type(module).__name__} is not an affine layer the edge-level forward can read")
    reference = next(module.parameters())
    probe = torch.cat([torch.zeros(1, width), torch.eye(width)]).to(reference)
    out = module(probe)
    return (out[1:] - out[:1]).T, out[0]
