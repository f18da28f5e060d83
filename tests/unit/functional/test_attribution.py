"""Attribution: parity with captum (every quadrature rule, three model kinds), the axioms of
integrated gradients, double backprop, and the fast site path against the hooked one.

Parity runs in float64 so that what differs is the implementation, not rounding; captum rounds
its Riemann nodes and all weights to float32, which moves attributions by ~1e-8 here.
"""

from __future__ import annotations

import pytest
import torch
from captum.attr import InputXGradient, IntegratedGradients, LayerIntegratedGradients
from captum.attr._utils.approximation_methods import approximation_parameters

from faithful_train.errors import UnknownNameError
from faithful_train.functional.attribution import (
    QUADRATURES,
    attribute_tokens,
    gradient_x_input,
    integrated_gradients,
    quadrature,
    site_function,
)
from faithful_train.intervene.sites import run_with
from tests.conftest import tiny_transformer

B, T, VOCAB, STEPS = 4, 6, 20, 8
TOL = 1e-5


def _gather(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return out.gather(1, target.repeat(out.shape[0] // target.shape[0])[:, None]).squeeze(1)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (B, T), generator=g), torch.randint(0, VOCAB, (B,), generator=g)


@pytest.fixture(scope="module")
def transformer():
    return tiny_transformer(VOCAB).double().eval()


@pytest.fixture(scope="module")
def hf_model():
    from faithful_train.modeling.hf import HFAdapter

    config = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=16,
    )
    return HFAdapter.from_config("llama", config, vocab_size=VOCAB, seed=0).double().eval()


def _close(ours: torch.Tensor, theirs: torch.Tensor, tol: float = TOL) -> None:
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= tol


# --- quadrature ---


@pytest.mark.parametrize("method", QUADRATURES)
def test_quadrature_matches_captum(method):
    step_sizes, alphas = approximation_parameters(method)
    ours_alphas, ours_weights = quadrature(STEPS, method)
    _close(ours_alphas, torch.tensor(alphas(STEPS), dtype=torch.float64), 1e-7)
    _close(ours_weights, torch.tensor(step_sizes(STEPS), dtype=torch.float64), 1e-7)


def test_unknown_quadrature_lists_valid():
    with pytest.raises(UnknownNameError, match="riemann_trapezoid") as info:
        quadrature(8, "simpson")
    assert info.value.valid == sorted(QUADRATURES)
    with pytest.raises(UnknownNameError):
        integrated_gradients(lambda x: x.sum(1), torch.ones(2, 3), method="simpson")


# --- parity with captum ---


@pytest.mark.parametrize("method", QUADRATURES)
def test_mlp_matches_captum(method):
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    x, baseline = torch.randn(B, 5, dtype=torch.float64), torch.randn(1, 5, dtype=torch.float64)
    target = torch.tensor([0, 2, 1, 2])
    theirs, their_delta = IntegratedGradients(mlp).attribute(
        x, baselines=baseline, target=target, n_steps=STEPS, method=method, return_convergence_delta=True
    )
    ours = integrated_gradients(lambda z: _gather(mlp(z), target), x, baseline, STEPS, method)
    _close(ours.values, theirs)
    _close(ours.delta, their_delta)
    _close(ours.output, _gather(mlp(x), target).detach(), 1e-12)
    # chunked evaluation: same numbers
    chunked = integrated_gradients(
        lambda z: _gather(mlp(z), target), x, baseline, STEPS, method, internal_batch_size=3 * B
    )
    _close(chunked.values, ours.values, 1e-12)
    _close(chunked.delta, ours.delta, 1e-12)


@pytest.mark.parametrize("method", QUADRATURES)
@pytest.mark.parametrize("site", ["embed", "blocks.1.resid_pre"])
def test_transformer_matches_captum(transformer, data, site, method):
    ids, target = data
    layer = 0 if site == "embed" else 1
    _, cache = run_with(transformer, ids, record=[site])
    act = cache[site].detach()
    # a random baseline at the mid site (tensor baselines), zeros at the embeddings
    baseline = torch.zeros_like(act) if site == "embed" else torch.randn(act.shape, dtype=act.dtype)
    ig = IntegratedGradients(lambda z: transformer.forward_from(layer, z)[:, -1])
    theirs, their_delta = ig.attribute(
        act, baselines=baseline, target=target, n_steps=STEPS, method=method, return_convergence_delta=True
    )
    ours_baseline = "zeros" if site == "embed" else baseline
    ours = attribute_tokens(transformer, ids, target, site=site, baseline=ours_baseline, steps=STEPS, quadrature=method)
    _close(ours.features, theirs)
    _close(ours.values, theirs.sum(-1))
    _close(ours.delta, their_delta)


@pytest.mark.parametrize("method", QUADRATURES)
def test_hf_matches_captum_layer_ig(hf_model, data, method):
    """HF llama at ``embed`` with a token baseline, against captum's LayerIntegratedGradients on
    ``embed_tokens`` (token-id baselines: the embedding of the pad token everywhere)."""
    ids, target = data
    pad = 0
    lig = LayerIntegratedGradients(lambda i: hf_model(i)[:, -1], hf_model.hf_model.model.embed_tokens)
    theirs, their_delta = lig.attribute(
        ids,
        baselines=torch.full_like(ids, pad),
        target=target,
        n_steps=STEPS,
        method=method,
        return_convergence_delta=True,
    )
    ours = attribute_tokens(hf_model, ids, target, site="embed", baseline=pad, steps=STEPS, quadrature=method)
    _close(ours.features, theirs)
    _close(ours.delta, their_delta)


def test_gradient_x_input_matches_captum(transformer, data):
    ids, target = data
    emb = transformer.embed(ids).detach().requires_grad_()
    theirs = InputXGradient(lambda z: transformer.forward_from(0, z)[:, -1]).attribute(emb, target=target)
    ours = attribute_tokens(transformer, ids, target, method="gradient_x_input")
    _close(ours.features, theirs)
    f0 = transformer.forward_from(0, torch.zeros_like(emb)).detach()[:, -1].gather(1, target[:, None]).squeeze(1)
    _close(ours.delta, theirs.reshape(B, -1).sum(1) - (ours.output - f0), 1e-10)


# --- axioms ---


@pytest.mark.parametrize("method", QUADRATURES)
def test_linear_model_is_exact(method):
    """IG of ``w.x + c`` is ``(x - b) * w`` (times the weights' sum, 1 - 1/n for captum's
    trapezoid rule, whose weights are ``1/n`` on a ``1/(n-1)`` grid)."""
    w, c = torch.randn(7, dtype=torch.float64), 0.3
    x, b = torch.randn(B, 7, dtype=torch.float64), torch.randn(B, 7, dtype=torch.float64)
    out = integrated_gradients(lambda z: z @ w + c, x, b, STEPS, method)
    scale = 1 - 1 / STEPS if method == "riemann_trapezoid" else 1.0
    _close(out.values, (x - b) * w * scale, 1e-12)
    expected_delta = (scale - 1) * ((x - b) @ w)
    _close(out.delta, expected_delta, 1e-12)
    gxi = gradient_x_input(lambda z: z @ w + c, x)  # affine: exact first-order Taylor
    _close(gxi.values, x * w, 1e-12)
    _close(gxi.delta, torch.zeros(B, dtype=torch.float64), 1e-12)


def test_completeness_and_dummy_feature(transformer, data):
    ids, target = data
    x = torch.randn(B, 6, dtype=torch.float64)

    def fn(z):  # ignores feature 5
        return torch.tanh(z[:, :5] @ torch.linspace(-1, 1, 5, dtype=z.dtype)).exp()

    out = integrated_gradients(fn, x, steps=32)
    gap = (out.output - out.baseline_output).abs()
    assert (out.delta.abs() <= 1e-8 * gap.clamp_min(1)).all()
    assert (out.values[:, 5] == 0).all()
    # the transformer: gausslegendre converges
    coarse = attribute_tokens(transformer, ids, target, steps=4)
    fine = attribute_tokens(transformer, ids, target, steps=64)
    assert (fine.delta.abs() <= 1e-6 * (fine.output - fine.baseline_output).abs().clamp_min(1e-3)).all()
    assert fine.delta.abs().max() < coarse.delta.abs().max()
    _close(fine.values.sum(1), fine.output - fine.baseline_output, 1e-6)


def test_symmetry():
    """Features that the function treats symmetrically, with equal values, get equal attributions."""
    x = torch.tensor([[0.7, 0.7, -0.2]], dtype=torch.float64)
    out = integrated_gradients(lambda z: torch.sigmoid(z[:, 0] * z[:, 1] + z[:, 2]), x, steps=16)
    assert out.values[0, 0] == pytest.approx(out.values[0, 1].item(), abs=1e-15)


# --- double backprop, fast path, errors ---


@pytest.mark.parametrize("method", ["integrated_gradients", "gradient_x_input"])
def test_create_graph_reaches_parameters(data, method):
    ids, target = data
    model = tiny_transformer(VOCAB)
    out = attribute_tokens(model, ids, target, method=method, steps=4, create_graph=True)
    assert out.values.grad_fn is not None and out.delta.grad_fn is not None
    out.values.square().sum().backward()
    early = model.blocks[0].attn.qkv.weight.grad
    assert early is not None and early.abs().sum() > 0
    assert model.tok_emb.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    plain = attribute_tokens(model, ids, target, method=method, steps=4)
    assert plain.values.grad_fn is None and plain.features.grad_fn is None and plain.delta.grad_fn is None
    assert plain.output.grad_fn is None
    assert all(p.grad is None for p in model.parameters())
    _close(plain.values, out.values.detach(), 1e-6)


def test_fast_path_matches_hooked_path(transformer, data):
    ids, target = data
    for site in ("embed", "blocks.1.resid_pre"):
        act_fast, fast = site_function(transformer, ids, site, target)
        act_hooked, slow = site_function(transformer, ids, site, target, fast=False)
        _close(act_fast, act_hooked, 1e-12)
        a = integrated_gradients(fast, act_fast, steps=8)
        b = integrated_gradients(slow, act_hooked, steps=8)
        _close(a.values, b.values, 1e-6)
        _close(a.delta, b.delta, 1e-6)


def test_other_site_and_logprob(transformer, data):
    """A site off the fast path (hooked) with the log-probability as output; completeness holds."""
    ids, target = data
    out = attribute_tokens(transformer, ids, target, site="blocks.0.attn.heads", steps=48, output="logprob")
    assert out.features.shape == (B, T, 4, 8) and out.values.shape == (B, T)
    logp = transformer(ids)[:, -1].log_softmax(-1).gather(1, target[:, None]).squeeze(1)
    _close(out.output, logp.detach(), 1e-10)
    _close(out.values.sum(1), out.output - out.baseline_output, 1e-5)


def test_bad_names(transformer, data):
    ids, target = data
    with pytest.raises(UnknownNameError, match="blocks.0.resid_pre") as info:
        attribute_tokens(transformer, ids, target, site="blocks.9.nowhere")
    assert info.value.kind == "site"
    with pytest.raises(UnknownNameError, match="gausslegendre"):
        attribute_tokens(transformer, ids, target, quadrature="simpson")
    with pytest.raises(UnknownNameError):
        attribute_tokens(transformer, ids, target, method="saliency")
