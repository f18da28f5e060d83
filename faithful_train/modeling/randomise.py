"""Models with fresh random weights: the random-model control, and the cascading model
randomisation of Adebayo et al. 2018 ("Sanity checks for saliency maps"). Everything here
draws from its own seed and leaves the global RNG untouched."""

from __future__ import annotations

import copy

import torch
from torch import nn

from faithful_train.modeling.interface import block_list


def randomly_initialised(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` with fresh random weights (its own ``init_weights`` if it has one,
    else every submodule's ``reset_parameters``), drawn without touching the global RNG."""
    fresh = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        if hasattr(fresh, "init_weights"):
            fresh.init_weights()
        else:
            for module in fresh.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
    return fresh.eval()


def cascade_stages(model: nn.Module) -> list[list[str]]:
    """Names of the modules each stage of the cascade re-initialises (on top of the earlier
    stages), top first: the head, then each block from the last, the first block with the
    embeddings. The head: every module outside the blocks with parameters of its own, except
    ``nn.Embedding``s (embeddings, last stage). Without a block list: one stage, every module."""
    names = {id(m): name for name, m in model.named_modules()}
    blocks = block_list(model)
    if blocks is None:
        return [[name for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]]
    inside = {id(m) for block in blocks for m in block.modules()}
    head, embeddings = [], []
    for name, module in model.named_modules():
        if id(module) in inside or not any(True for _ in module.parameters(recurse=False)):
            continue
        (embeddings if isinstance(module, nn.Embedding) else head).append(name)
    stages = [head] + [[names[id(block)]] for block in reversed(blocks)]
    stages[-1] += embeddings
    return stages


def fresh_initialisation(model: nn.Module, seed: int) -> nn.Module:
    """A model of the same architecture with newly drawn weights (the global RNG untouched):
    our ``Transformer`` with its own constructor's init, others via ``randomly_initialised``."""
    from faithful_train.modeling.transformer import Transformer

    if type(model) is Transformer:  # noqa: E721 (a subclass may add parameters the constructor lacks)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return Transformer(model.cfg)
    return randomly_initialised(model, seed)


def cascading_randomisation(model: nn.Module, seed: int) -> list[nn.Module]:
    """Copies of ``model`` for each stage of ``cascade_stages``, stage n with stages 1..n
    re-initialised from one fresh initialisation (so later stages keep earlier stages' draws).
    The copies are in eval mode, their parameters not requiring gradients."""
    fresh = dict(fresh_initialisation(model, seed).named_modules())
    current = copy.deepcopy(model)
    modules = dict(current.named_modules())
    copies = []
    with torch.no_grad():
        for stage in cascade_stages(model):
            for name in stage:
                new = dict(fresh[name].named_parameters())
                for pname, param in modules[name].named_parameters():
                    param.copy_(new[pname])
            snapshot = copy.deepcopy(current).eval()
            snapshot.requires_grad_(False)
            copies.append(snapshot)
    return copies
