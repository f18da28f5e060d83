"""Activation checkpointing whose hooks act once per logical forward.

Non-reentrant activation checkpointing (``torch.utils.checkpoint``, ``use_reentrant=False``)
keeps a block's inputs and recomputes its activations in the backward pass. Site hooks make that
recomputation a hazard: the hooks of a step's edits (an interchange swap, an ablation) are
removed as soon as the edited forward returns, long before the backward pass recomputes the
block, so the recomputation would run the *unedited* block and back-propagate through values the
forward never saw (pyvene's #231 is the CheckpointError this raises when shapes differ; when
they agree the gradients are silently wrong). Recording hooks have the opposite problem: run
twice, they would count a statistic twice.

``checkpoint_block(module, fn, *args)`` fixes both:

- it snapshots the forward hooks of ``module`` and of every module under it when the forward
  runs, and the recomputation runs with exactly those hooks (the edits act again, the same
  way), whatever is registered by then;
- while it recomputes, the recording hooks of ``faithful_train.intervene.sites.hooked`` record nothing
  (``sites.records_suspended``): a site is recorded once per logical forward;
- the recomputation runs with the attention kernels the forward allowed (``sdpa_kernel``: the
  attribution objectives run their double-backward forwards on the math kernel), so it saves
  what the forward saved. torch itself restores the RNG state and autocast.

Our blocks call it from ``Transformer.forward_from``; a Hugging Face model's decoder layers get
it as their ``_gradient_checkpointing_func`` (``HFAdapter.enable_activation_checkpointing``),
so ``transformers``' own checkpointing wrapper calls it, with the layer's own hooks (the
``resid_pre``/``resid_post`` sites) left outside the checkpoint, as ``transformers`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from faithful_train.modeling.hooks import records_suspended

_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)

Snapshot = list[tuple[nn.Module, list[dict]]]


def hook_snapshot(module: nn.Module) -> Snapshot:
    """The forward hooks registered on ``module`` and every module under it, now."""
    return [(m, [dict(getattr(m, name)) for name in _HOOK_DICTS]) for m in module.modules()]


@contextmanager
def hooks_as(snapshot: Snapshot) -> Iterator[None]:
    """Run with exactly the hooks of ``snapshot`` on its modules; the present ones come back after."""
    present = [(m, [dict(getattr(m, name)) for name in _HOOK_DICTS]) for m, _ in snapshot]
    try:
        _install(snapshot)
        yield
    finally:
        _install(present)


def _install(snapshot: Snapshot) -> None:
    for module, dicts in snapshot:
        for name, saved in zip(_HOOK_DICTS, dicts):
            current = getattr(module, name)
            current.clear()
            current.update(saved)


def checkpoint_block(module: nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` (a forward of ``module``) under non-reentrant activation
    checkpointing, its recomputation run with the hooks it had in the forward and without
    recording. The RNG state (dropout) is restored for the recomputation, as torch does."""
    snapshot, kernels = hook_snapshot(module), _attention_kernels()
    calls = 0

    def run(*a: Any, **k: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            return fn(*a, **k)
        with hooks_as(snapshot), records_suspended(), sdpa_kernel(kernels):
            return fn(*a, **k)

    return checkpoint(run, *args, use_reentrant=False, **kwargs)


def _attention_kernels() -> list[SDPBackend]:
    """The ``scaled_dot_product_attention`` backends enabled now (``sdpa_kernel`` sets them)."""
    enabled = {
        SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled(),
        SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled(),
        SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled(),
        SDPBackend.CUDNN_ATTENTION: torch.backends.cuda.cudnn_sdp_enabled(),
    }
    return [backend for backend, on in enabled.items() if on]


def should_checkpoint(module: nn.Module, enabled: bool) -> bool:
    """Checkpoint only where a backward pass will need the activations: training, with gradients."""
    return enabled and module.training and torch.is_grad_enabled()
