import pytest
import torch

from faithful_train.intervene.sites import run_with
from faithful_train.modeling.transformer import Transformer, TransformerConfig
from tests.conftest import tiny_transformer


def test_dense_shapes_and_sites():
    model = tiny_transformer()
    ids = torch.randint(0, 20, (3, 7))
    assert model(ids).shape == (3, 7, 20)
    names = set(model.site_points())
    assert {
        "embed",
        "final",
        "blocks.1.resid_pre",
        "blocks.1.attn.heads",
        "blocks.1.resid_mid",
        "blocks.1.mlp.out",
    } <= names
    assert not any("moe" in n for n in names)


def test_causal_masking():
    model = tiny_transformer().eval()
    ids = torch.randint(0, 20, (1, 6))
    changed = ids.clone()
    changed[0, 4] = (ids[0, 4] + 1) % 20
    torch.testing.assert_close(model(ids)[:, :4], model(changed)[:, :4])


def test_forward_from_resumes_exactly():
    model = tiny_transformer(n_experts=4).eval()
    ids = torch.randint(0, 20, (2, 5))
    _, cache = run_with(model, ids, record=["blocks.0.resid_post"])
    torch.testing.assert_close(model.forward_from(1, cache["blocks.0.resid_post"]), model(ids))


def test_moe_routing_observable_and_topk():
    model = tiny_transformer(n_experts=4, top_k=2).eval()
    ids = torch.randint(0, 20, (3, 6))
    _, cache = run_with(model, ids, record=["blocks.0.moe.router", "blocks.0.moe.weights"])
    logits, weights = cache["blocks.0.moe.router"], cache["blocks.0.moe.weights"]
    assert logits.shape == weights.shape == (3, 6, 4)
    assert ((weights > 0).sum(-1) == 2).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 6))
    chosen = weights.topk(2, dim=-1).indices.sort(-1).values
    assert torch.equal(chosen, logits.topk(2, dim=-1).indices.sort(-1).values)


def test_moe_matches_dense_expert_sum():
    """The sparse dispatch equals sum_e w_e * expert_e(x) computed densely."""
    model = tiny_transformer(n_experts=4, top_k=2).eval()
    moe = model.blocks[0].mlp
    x = torch.randn(2, 5, 32)
    weights = moe.routing_weights(moe.router(x))
    dense = sum(weights[..., e : e + 1] * expert(x) for e, expert in enumerate(moe.experts))
    torch.testing.assert_close(moe(x), dense)


def test_patching_router_changes_routing_and_masking_an_expert_changes_output():
    model = tiny_transformer(n_experts=4, top_k=1).eval()
    ids = torch.randint(0, 20, (2, 6))
    forced = torch.zeros(2, 6, 4)
    forced[..., 3] = 10.0
    _, cache = run_with(model, ids, record=["blocks.0.moe.weights"], edits={"blocks.0.moe.router": lambda t: forced})
    assert (cache["blocks.0.moe.weights"][..., 3] == 1).all()
    clean = model(ids)

    def mask_expert(weights, e=int(cache["blocks.0.moe.weights"].argmax(-1)[0, 0])):
        weights = weights.clone()
        weights[..., e] = 0
        return weights

    masked, _ = run_with(model, ids, edits={"blocks.0.moe.weights": mask_expert})
    assert not torch.allclose(masked, clean)


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        TransformerConfig(vocab_size=10, d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="top_k"):
        TransformerConfig(vocab_size=10, n_experts=2, top_k=3)
    with pytest.raises(ValueError, match="max_seq_len"):
        Transformer(TransformerConfig(vocab_size=10, max_seq_len=4))(torch.zeros(1, 5, dtype=torch.long))
