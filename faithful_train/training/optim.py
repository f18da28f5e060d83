"""The optimizer, its learning-rate schedule and gradient clipping, from the ``optim`` section.

AdamW (Loshchilov & Hutter 2019) with weight decay on the model's matrices only (not on biases,
norms or objectives' parameters). An objective's module may carry its own learning rate (``lr``,
e.g. an SAE's): it is then its own parameter group, clipped by its own norm, so its gradients
never scale the model's. The schedule is a linear warm-up over ``warmup_steps``, then constant
or a cosine decay to ``min_lr_ratio`` over the run's steps.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from faithful_train.modeling.sharding import clip_grad_norm


def parameter_groups(model: nn.Module, objective_modules: nn.ModuleDict, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW's groups: the model's matrices (decayed), its vectors and the objectives' modules
    without a learning rate of their own (not decayed), and one group per module with its own."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    own_lr = {label: getattr(m, "lr", None) for label, m in objective_modules.items()}
    no_decay = [p for p in params if p.dim() < 2] + [
        p for label, m in objective_modules.items() if own_lr[label] is None for p in m.parameters() if p.requires_grad
    ]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups += [
        {
            "params": [p for p in objective_modules[label].parameters() if p.requires_grad],
            "weight_decay": 0.0,
            "lr": lr,
            "own": True,
        }
        for label, lr in own_lr.items()
        if lr is not None
    ]
    return groups


def lr_factor(step: int, warmup_steps: int, decay: str, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up over ``warmup_steps``, then constant or cosine decay to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "none" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def clip_own_groups(
    optimizer: torch.optim.Optimizer, max_norm: float, value: bool = False, sharded: bool = False
) -> None:
    """Clip the shared groups by their joint norm and each own-learning-rate group by its own (by
    value, when ``value``); a sharded model's norm counts every rank's shards."""
    own = [g["params"] for g in optimizer.param_groups if g.get("own")]
    shared = [p for g in optimizer.param_groups if not g.get("own") for p in g["params"]]
    for params in [shared, *own]:
        if value:
            torch.nn.utils.clip_grad_value_(params, max_norm)
        elif sharded:
            clip_grad_norm(params, max_norm)
        else:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
