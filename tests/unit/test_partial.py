"""Partial forwards: a patched run resumed at the first block it changes gives the same logits
(and gradients) as the full patched forward, and skips the blocks below."""

import pytest
import torch

from faithful_train.interventions import patch
from faithful_train.partial import frozen_parameters, plan_resume, run_patched
from faithful_train.sites import SiteRef, run_with
from tests.conftest import tiny_transformer


def _patch_setup(site):
    """A tiny model, a base batch, its resume plan for ``site``, a patch of position 2 of
    ``site`` from a source batch, and the clean cache the plan resumes from."""
    model = tiny_transformer()
    base, source = torch.randint(0, 20, (4, 6)), torch.randint(0, 20, (4, 6))
    plan = plan_resume(model, [site])
    _, src = run_with(model, source, record=[site])
    ref = SiteRef(site, positions=(2,))
    edits = {site: [lambda t: patch(t, src[site], ref.mask(t.shape))]}
    _, cache = run_with(model, base, record=[plan.site])
    return model, base, plan, edits, cache


@pytest.mark.parametrize(
    "site, layer",
    [
        ("embed", 0),
        ("blocks.0.resid_pre", 0),
        ("blocks.0.attn.heads", 0),
        ("blocks.0.resid_post", 1),
        ("blocks.1.mlp.out", 1),
        ("blocks.1.resid_post", 1),  # the last block's output: run only that block
    ],
)
def test_resumed_patch_equals_full_patch(site, layer):
    model, base, plan, edits, cache = _patch_setup(site)
    assert plan.layer == layer
    full = run_patched(model, base, 1, edits)
    calls = []
    hook = model.hook_embed.register_forward_hook(lambda *a: calls.append(1))
    resumed = run_patched(model, base, 1, edits, cache, plan)
    hook.remove()
    torch.testing.assert_close(resumed, full)
    assert not calls  # the embedding (and blocks below plan.layer) did not run again
    assert not torch.allclose(full, model(base))  # the patch did something


def test_resumed_run_tiles_the_batch_and_passes_gradient_upstream():
    model = tiny_transformer()
    base = torch.randint(0, 20, (3, 5))
    plan = plan_resume(model, ["blocks.0.resid_post"])
    _, cache = run_with(model, base, record=[plan.site])
    out = run_patched(model, base, 2, {}, cache, plan)
    assert out.shape == (6, 5, 20)
    torch.testing.assert_close(out[:3], out[3:])
    out.sum().backward()
    assert model.tok_emb.weight.grad.abs().sum() > 0


def test_models_without_forward_from_and_sites_after_the_blocks_run_in_full():
    model = tiny_transformer()
    assert plan_resume(model, ["final"]) is None
    assert plan_resume(torch.nn.Linear(2, 2), ["blocks.0.resid_post"]) is None


def test_frozen_parameters_block_gradient_and_restore_the_model():
    model = tiny_transformer()
    x = torch.randint(0, 20, (2, 4))
    with frozen_parameters(model):
        out = model(x)
    assert not out.requires_grad
    assert all(p.requires_grad for p in model.parameters())
    model(x).sum().backward()
    assert model.tok_emb.weight.grad is not None


@pytest.mark.parametrize("site, allowed", [("blocks.0.resid_post", True), ("blocks.1.resid_pre", True), ("blocks.1.attn.heads", False)])
def test_last_position_only_run_equals_the_full_runs_last_position(site, allowed):
    """When the caller reads only the answer position, the last block computes only it."""
    model, base, plan, edits, cache = _patch_setup(site)
    assert plan.last_only == allowed
    full = run_patched(model, base, 1, edits, cache, plan)
    last_position = torch.full((base.shape[0], 1), base.shape[1] - 1)
    last = run_patched(model, base, 1, edits, cache, plan, positions=last_position)
    assert last.shape[1] == 1  # the last block computed one position where allowed, else all, read at one
    torch.testing.assert_close(last[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)
    (g_full,) = torch.autograd.grad(full[:, -1].sum(), cache[plan.site])
    (g_last,) = torch.autograd.grad(last[:, -1].sum(), cache[plan.site])
    torch.testing.assert_close(g_last, g_full, atol=1e-5, rtol=1e-5)
