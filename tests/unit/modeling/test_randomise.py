"""Cascading randomisation (``faithful_train/modeling/randomise.py``): its stages, top down, and
seeded copies that leave the model and the global RNG alone."""

from __future__ import annotations

import torch
from torch import nn

from faithful_train.modeling.randomise import cascade_stages, cascading_randomisation
from tests.conftest import tiny_transformer
from tests.unit.bag_of_tokens import BagOfTokens


def test_cascade_stages_and_copies():
    model = tiny_transformer(20)
    stages = cascade_stages(model)
    assert stages == [["ln_f", "unembed"], ["blocks.1"], ["blocks.0", "tok_emb", "pos_emb"]]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    copies = cascading_randomisation(model, seed=5)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the global RNG untouched
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model too

    def changed(copy: nn.Module) -> set[str]:
        return {k.rsplit(".", 1)[0] for k, v in copy.state_dict().items() if not torch.equal(v, before[k])}

    prefixes = [{"ln_f", "unembed"}, {"blocks.1"}, {"blocks.0", "tok_emb", "pos_emb"}]
    for n, copy in enumerate(copies):
        modules = changed(copy)
        allowed = set().union(*prefixes[: n + 1])
        assert all(any(m == p or m.startswith(p + ".") for p in allowed) for m in modules)
        assert all(any(m == p or m.startswith(p + ".") for m in modules) for p in prefixes[n] - {"ln_f"})
    again = cascading_randomisation(model, seed=5)  # deterministic
    assert all(torch.equal(a, b) for a, b in zip(copies[-1].state_dict().values(), again[-1].state_dict().values()))
    assert cascade_stages(BagOfTokens(10)) == [["emb", "readout"]]  # no blocks: one stage
