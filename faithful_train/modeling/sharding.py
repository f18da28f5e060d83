"""Sharded training: ``trainer.strategy: fsdp`` is FSDP2 (``torch.distributed.fsdp.fully_shard``)
through Lightning's ``ModelParallelStrategy``.

Why FSDP2 and not Lightning's ``FSDPStrategy`` (FSDP1): FSDP2 shards each parameter on its own
(a ``DTensor``), so frozen and trainable parameters mix freely, the frozen ones never get a
gradient (FSDP1 needs ``use_orig_params`` for the mix, pytorch #100945, and then allocates
gradients for the frozen ones, litgpt #1417), and module paths do not change, so the site names
resolve as they are. It also runs on CPU with gloo, which FSDP1 through Lightning does not.

How the model is cut (``shard_model``): each block (ours) or decoder layer (Hugging Face) is a
unit, and its LoRA adapters a unit of their own beside it; the rest (embeddings, final norm,
unembedding) belongs to the root, which stays gathered between the step's forward and its
backward, so the engine's resumed forwards (``forward_from``, called outside the root's
forward) find it whole. The objectives' own modules (rotations, SAEs) are replicated, not
sharded: they are read outside any forward (featurized sites, hypotheses, SAELens files), and
their gradients are averaged across ranks after each backward (``average_gradients``), as DDP
would.

Audits and everything that reads whole weights (hypotheses' hashes, artifacts written by rank
zero) run on a replica (``gathered``): a copy of the model's structure kept on the meta device
(no memory), filled with the gathered weights for the audit and emptied after. Its peak is one
full copy of the model per rank, during audits only.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from faithful_train.modeling.interface import block_list


def is_distributed_tensor(value: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def is_shard_unit(module: nn.Module) -> bool:
    """Whether ``module`` itself was sharded (``fully_shard``): its parameters are gathered by its
    own forward hooks, so it must be called, not its submodules one by one."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def _adapter_layers(block: nn.Module) -> list[nn.Module]:
    """The LoRA adapters' linear layers inside ``block`` (the modules that run)."""
    return [
        m
        for name, m in block.named_modules()
        if ".lora_A." in f".{name}." or ".lora_B." in f".{name}."
        if isinstance(m, nn.Linear)
    ]


def shard_model(model: nn.Module, mesh: Any) -> None:
    """``fully_shard`` each block, its adapters apart, then the root (kept gathered after forward)."""
    from torch.distributed.fsdp import fully_shard

    blocks = block_list(model)
    for block in blocks if blocks is not None else ():
        adapters = _adapter_layers(block)
        if adapters:
            fully_shard(adapters, mesh=mesh)
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)


def meta_replica(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s structure on the meta device (no memory): what ``gathered`` fills.
    What lives outside its modules (attached SAEs, adapter bookkeeping) is shared, not copied."""
    memo: dict[int, Any] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        empty = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = (
            nn.Parameter(empty, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
        )
    for key, value in model.__dict__.items():
        if not key.startswith("_") or key == "_featurized_sites":
            memo[id(value)] = value  # plain attributes: the same objects (an SAE stays the trained one)
    return copy.deepcopy(model, memo)


def _full(value: Tensor) -> Tensor:
    return value.full_tensor() if is_distributed_tensor(value) else value


@contextmanager
def gathered(model: nn.Module, replica: nn.Module) -> Iterator[nn.Module]:
    """``replica`` holding ``model``'s whole weights (gathered on every rank, one tensor at a
    time, in the same order everywhere), in ``model``'s mode; emptied again after."""
    named = dict(model.named_parameters()) | dict(model.named_buffers())
    device = next(iter(named.values())).device
    replica.to_empty(device=device)
    with torch.no_grad():
        own = dict(replica.named_parameters()) | dict(replica.named_buffers())
        for name, value in named.items():
            own[name].copy_(_full(value.detach()))
    replica.train(model.training)
    try:
        yield replica
    finally:
        replica.to("meta")


def average_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """All-reduce (mean) the gradients of replicated parameters, as DDP would."""
    import torch.distributed as dist

    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads or not dist.is_initialized():
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for g, piece in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(piece.view_as(g))


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> Tensor:
    """Clip by the total norm over sharded (``DTensor``) and replicated gradients together: each
    rank's shards are summed across ranks, a replicated gradient counts once."""
    import torch.distributed as dist

    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    sharded = [g.to_local() for g in grads if is_distributed_tensor(g)]
    plain = [g for g in grads if not is_distributed_tensor(g)]
    device = (sharded or plain)[0].device
    total = torch.zeros((), device=device)
    if sharded:
        total = total + sum(g.float().pow(2).sum() for g in sharded)
        if dist.is_initialized():
            dist.all_reduce(total)
    if plain:
        total = total + sum(g.float().pow(2).sum() for g in plain)
    norm = total.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype) if not is_distributed_tensor(g) else float(scale))
    return norm


def local(value: Tensor) -> Tensor:
    """This rank's part of a parameter (its shard), or the tensor itself."""
    return value.to_local() if is_distributed_tensor(value) else value


@contextmanager
def whole_model(pl_module: nn.Module) -> Iterator[nn.Module]:
    """The module's model with whole weights: the model itself, or, when it is sharded, its
    replica filled with the gathered weights (``gathered``; every rank must enter)."""
    replica = pl_module.__dict__.get("replica")
    if replica is None:
        yield pl_module.model
        return
    with gathered(pl_module.model, replica) as model:
        yield model
