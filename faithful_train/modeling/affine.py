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


def frozen_norm(module: nn.Module, x: Tensor, reference: Tensor) -> Tensor:
    """``module`` (a LayerNorm or an RMSNorm) applied to ``x`` with its scale frozen at
    ``reference``'s: ``(x - mean(x)) / std(reference) * w + b`` or ``x / rms(reference) * w``, so
    the result is affine in ``x`` (circuit-tracer's stop-gradient on ``hook_scale``). With ``x`` =
    ``reference`` it equals ``module(x)``."""
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if isinstance(module, nn.LayerNorm):
        ref = reference.float()
        scale = torch.rsqrt(ref.var(-1, unbiased=False, keepdim=True) + module.eps)
        out = (x.float() - x.float().mean(-1, keepdim=True)) * scale
    else:
        eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", None)
        if weight is None or eps is None:
            raise ConfigError(f"{type(module).__name__} is not a norm the replacement model can freeze")
        scale = torch.rsqrt(reference.float().pow(2).mean(-1, keepdim=True) + eps)
        out = x.float() * scale
    out = out.to(x.dtype)
    if weight is not None:
        out = out * weight
    return out if bias is None else out + bias
