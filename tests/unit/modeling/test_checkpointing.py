"""Activation checkpointing changes memory, never the maths: for every objective the step's
gradients equal those without checkpointing (fp32, 1e-6), and statistics are counted once.

The hazard it guards against: an edit's hooks are gone by the time the backward pass recomputes
the edited block, so a naive recomputation runs the unedited block (pyvene #231); a recording
hook that runs again counts twice."""

from __future__ import annotations

import pytest
import torch

from faithful_train.intervene import sites
from faithful_train.modeling.hf import HFAdapter
from tests.unit.objective_cases import CASES, Case, bound, gradients, step_loss

# what checkpointing may change: the order of float sums in the recomputed backward
ATOL = 1e-6


def _with_and_without(make) -> tuple[dict, dict, Case, Case]:
    plain, checkpointed = make(), make()
    checkpointed.model.enable_activation_checkpointing(True)
    plain.model.train(), checkpointed.model.train()
    return gradients(plain, step_loss(plain)), gradients(checkpointed, step_loss(checkpointed)), plain, checkpointed


def _assert_equal(plain: dict, checkpointed: dict) -> None:
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=ATOL, rtol=1e-5, msg=name)


@pytest.mark.parametrize("name", list(CASES))
def test_every_objective_has_the_same_gradients_with_checkpointing(name: str):
    plain, checkpointed, *_ = _with_and_without(CASES[name])
    _assert_equal(plain, checkpointed)


def test_a_recomputed_block_is_edited_again_and_recorded_once():
    """The edit is what the forward used (the gradient through the edited value says so), and the
    recording hook ran once per logical forward."""
    make = CASES["interchange"]
    case = make()
    case.model.enable_activation_checkpointing(True)
    case.model.train()
    seen: list[int] = []
    counter = case.model.blocks[1].hook_resid_pre.register_forward_hook(lambda *_: seen.append(1))
    try:
        ids = case.batch["input_ids"]
        with sites.hooked(
            case.model, record=["blocks.1.resid_pre"], edits={"blocks.0.mlp.out": lambda t: 2 * t}
        ) as cache:
            logits = case.model(ids)
        recorded = cache["blocks.1.resid_pre"]
        forwards = len(seen)
        logits.sum().backward()
        assert cache["blocks.1.resid_pre"] is recorded  # the recomputation recorded nothing
        assert len(seen) == 2 * forwards  # block 1 did recompute (its hook point ran again)
        with_edit = case.model.blocks[0].mlp.down.weight.grad.clone()
        case.model.zero_grad()
        case.model.enable_activation_checkpointing(False)
        with sites.hooked(case.model, edits={"blocks.0.mlp.out": lambda t: 2 * t}):
            case.model(ids).sum().backward()
        torch.testing.assert_close(with_edit, case.model.blocks[0].mlp.down.weight.grad, atol=ATOL, rtol=1e-5)
    finally:
        counter.remove()


def test_router_load_and_sae_dead_counts_are_counted_once():
    _, _, plain, checkpointed = _with_and_without(CASES["router"])
    router_plain, router_checkpointed = plain.objectives[0], checkpointed.objectives[0]
    assert router_plain._pending_load is not None
    torch.testing.assert_close(router_checkpointed._pending_load, router_plain._pending_load)
    _, _, plain, checkpointed = _with_and_without(CASES["sae"])
    assert torch.equal(checkpointed.objectives[0].sae.tokens_since_fired, plain.objectives[0].sae.tokens_since_fired)
    assert int(plain.objectives[0].sae.tokens_since_fired.max()) == 16 * 4  # one step's tokens, once


def test_audit_figures_are_the_same_with_checkpointing():
    from faithful_train.audits.interchange import InterchangeAudit
    from tests.unit.objective_cases import ALIGN

    figures = []
    for enabled in (False, True):
        case = CASES["interchange"]()
        case.model.enable_activation_checkpointing(enabled)
        case.model.train()
        audit = InterchangeAudit(alignment=ALIGN, n_examples=64)
        audit.bind(case.model, case.task, 0)
        figures.append(audit.evaluate(case.model, case.task))
    assert figures[0] == figures[1]


HF_PRESETS = {
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "llama": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    ),
    "mixtral": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2,
    ),
}  # fmt: skip


@pytest.mark.parametrize("family", list(HF_PRESETS))
def test_hugging_face_layers_give_the_same_gradients_with_checkpointing(family: str):
    """transformers' own checkpointing of the decoder layers, with our checkpoint function: the
    interchange objective (an edit at a layer's output, a resumed variant) and preserve."""
    from faithful_train.objectives.interchange import InterchangeObjective
    from faithful_train.objectives.preserve import PreserveObjective
    from faithful_train.objectives.router import RouterObjective
    from faithful_train.tasks.hierarchical_equality import HierarchicalEquality

    def make() -> Case:
        task = HierarchicalEquality()
        model = HFAdapter.from_config(family, HF_PRESETS[family], vocab_size=task.vocab_size, seed=0)
        objectives = [InterchangeObjective(ALIGN_HF), PreserveObjective(label="keep")]
        if family == "mixtral":
            objectives.append(RouterObjective(load_balance=1.0, z_loss=0.1))
        case = bound(model, task, objectives, task.sample(16, 0), reference=True)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        return case

    plain, checkpointed, _, case = _with_and_without(make)
    assert all(layer.gradient_checkpointing for layer in case.model.decoder_layers())
    _assert_equal(plain, checkpointed)


ALIGN_HF = {
    "left": {"site": "blocks.0.resid_post", "positions": [3], "dims": [0, 16]},
    "right": {"site": "blocks.0.resid_post", "positions": [3], "dims": [16, 32]},
}
