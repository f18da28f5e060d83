"""Router objective: parity with the Hugging Face models' own auxiliary loss, each term against
its formula, selection bias on our MoE and HF ones, and bad inputs."""

import pytest
import torch

from faithful_train.errors import ConfigError, UnknownNameError
from faithful_train.functional.routing import (
    expert_concept_mi_loss,
    mapped_alignment_loss,
    router_z_loss,
    routing_entropy,
)
from faithful_train.intervene.sites import run_with
from faithful_train.modeling.hf import HFAdapter
from faithful_train.modeling.transformer import Transformer, TransformerConfig
from faithful_train.objectives.base import StepContext
from faithful_train.objectives.router import RouterObjective
from faithful_train.tasks.domain_mixture import DomainMixture
from faithful_train.tasks.hierarchical_equality import HierarchicalEquality
from tests.unit.hf_configs import CONFIGS, VOCAB

MOE_FAMILIES = ["mixtral", "qwen2_moe", "olmoe"]
TASK = DomainMixture()


def moe(seed=0) -> Transformer:
    torch.manual_seed(seed)
    cfg = TransformerConfig(
        vocab_size=TASK.vocab_size, max_seq_len=TASK.seq_len, d_model=32, n_heads=2, d_mlp=32, n_experts=4
    )
    return Transformer(cfg)


def context(model, objective, batch) -> StepContext:
    logits, cache = run_with(
        model, batch["input_ids"], record=objective.sites(), attention_mask=batch.get("attention_mask")
    )
    return StepContext(batch, logits, cache, model, TASK, 0, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("padded", [False, True])
def test_load_balance_equals_the_models_own_aux_loss(family, padded):
    torch.manual_seed(0)
    model = HFAdapter.from_config(family, CONFIGS[family], vocab_size=VOCAB).eval()
    ids = torch.randint(VOCAB, (3, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0
        mask[2, :1] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    objective = RouterObjective(load_balance=1.0)
    objective.bind(model, TASK)
    with torch.no_grad():
        ours = objective.term(context(model, objective, batch))
        theirs = model.hf_model(input_ids=ids, attention_mask=mask, output_router_logits=True, use_cache=False).aux_loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_terms_match_their_formulas_on_recorded_logits():
    model = moe()
    batch = TASK.sample(16, 0)
    mapping = {"copy": 0, "reverse": [1, 2], "sum": 2, "sort": 3}
    for alignment_mapping in ("learned", mapping):
        objective = RouterObjective(z_loss=0.5, entropy=0.25, alignment=2.0, mapping=alignment_mapping)
        objective.bind(model, TASK)
        ctx = context(model, objective, batch)
        total = objective.term(ctx)
        logits = [ctx.cache[f"blocks.{i}.moe.router"] for i in (0, 1)]
        z = torch.stack([router_z_loss(x) for x in logits]).mean()
        h = torch.stack([routing_entropy(x) for x in logits]).mean()
        if alignment_mapping == "learned":
            a = torch.stack([expert_concept_mi_loss(x, batch["concept/domain"], 4) for x in logits]).mean()
        else:
            table = torch.tensor([[1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
            a = torch.stack([mapped_alignment_loss(x, batch["concept/domain"], table) for x in logits]).mean()
        torch.testing.assert_close(total, 0.5 * z + 0.25 * h + 2.0 * a)
        assert set(objective.parts) == {"z_loss", "entropy", "alignment", "max_violation"}
        torch.testing.assert_close(objective.parts["alignment"], a.detach())
        total.backward()
        assert model.blocks[0].mlp.router.weight.grad.abs().sum() > 0
        model.zero_grad()


def test_only_requested_layers_are_recorded_and_used():
    model = moe()
    objective = RouterObjective(entropy=1.0, layers=[1])
    objective.bind(model, TASK)
    assert objective.sites() == ["blocks.1.moe.router"]
    ctx = context(model, objective, TASK.sample(8, 0))
    torch.testing.assert_close(objective.term(ctx), routing_entropy(ctx.cache["blocks.1.moe.router"]))


def test_our_selection_bias_steers_choice_but_not_weights():
    model = moe().eval()
    ids = TASK.sample(8, 0)["input_ids"]
    _, before = run_with(model, ids, record=["blocks.0.moe.router", "blocks.0.moe.weights"])
    model.selection_bias(0).copy_(torch.tensor([0.0, 0.0, 0.0, 50.0]))
    _, after = run_with(model, ids, record=["blocks.0.moe.router", "blocks.0.moe.weights"])
    torch.testing.assert_close(after["blocks.0.moe.router"], before["blocks.0.moe.router"])
    weights = after["blocks.0.moe.weights"]
    assert (weights[..., 3] > 0).all()  # expert 3 always chosen
    probs = after["blocks.0.moe.router"].softmax(-1)
    chosen = weights > 0
    expected = torch.where(chosen, probs, 0) / torch.where(chosen, probs, 0).sum(-1, keepdim=True)
    torch.testing.assert_close(weights, expected)  # weights: unbiased probabilities, renormalised


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_hf_selection_bias_steers_choice_and_is_checkpointed(family):
    torch.manual_seed(0)
    model = HFAdapter.from_config(family, CONFIGS[family], vocab_size=VOCAB).eval()
    ids = torch.randint(VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    layer = next(iter(model.moe_layers()))
    site = f"blocks.{layer}.moe.weights"
    clean_logits, clean = run_with(model, ids, record=[site])
    model.selection_bias(layer).copy_(torch.tensor([0.0, 0.0, 0.0, 50.0]))
    logits, biased = run_with(model, ids, record=[site])
    assert (biased[site][..., 3] > 0).all() and not (clean[site][..., 3] > 0).all()
    assert not torch.allclose(logits, clean_logits)
    assert f"selection_bias_{layer}" in model.state_dict()
    model.selection_bias(layer).zero_()
    torch.testing.assert_close(run_with(model, ids)[0], clean_logits)


def test_bad_inputs_name_the_valid_choices():
    model = moe()
    with pytest.raises(UnknownNameError, match="'mean'.*pooled"):
        RouterObjective(pooling="mean")
    with pytest.raises(UnknownNameError, match="'copyy'.*copy"):
        RouterObjective(alignment=1.0, mapping={"copyy": 0}).bind(model, TASK)
    with pytest.raises(ConfigError, match=r"expert 9.*\[0, 4\)"):
        RouterObjective(alignment=1.0, mapping={"copy": 9}).bind(model, TASK)
    with pytest.raises(ConfigError, match="no expert.*sort"):
        RouterObjective(alignment=1.0, mapping={"copy": 0, "reverse": 1, "sum": 2}).bind(model, TASK)
    with pytest.raises(UnknownNameError, match="concept.*valid: \\(none\\)"):
        RouterObjective(alignment=1.0).bind(model, HierarchicalEquality(4))
    with pytest.raises(ConfigError, match="mixture-of-experts"):
        RouterObjective(z_loss=1.0).bind(Transformer(TransformerConfig(vocab_size=20, d_model=32, n_heads=2)), TASK)
    with pytest.raises(ConfigError, match="z_loss must be >= 0"):
        RouterObjective(z_loss=-1.0)
