"""The batched-variants engine: K edited variants in one forward give what K separate edited
forwards give (logits and gradients), resumed at the first edited block, the last block at the
read positions only, chunked to a memory budget."""

import pytest
import torch

from faithful_train.intervene.engine import frozen_parameters, per_variant, plan_resume, run_variants
from faithful_train.intervene.interventions import patch
from faithful_train.intervene.sites import SiteRef, run_with
from tests.conftest import tiny_transformer

T = 6


def _setup(site, variants=3):
    """A tiny model, a base batch, and ``variants`` patches of ``site`` from a source batch, one
    position each (variant k patches position k + 1)."""
    model = tiny_transformer()
    base, source = torch.randint(0, 20, (4, T)), torch.randint(0, 20, (4, T))
    _, src = run_with(model, source, record=[site])
    refs = [SiteRef(site, positions=(k + 1,)) for k in range(variants)]
    single = [lambda t, r=r: patch(t, src[site], r.mask(t.shape)) for r in refs]
    return model, {"input_ids": base}, single


def _every_position(batch):
    B = batch["input_ids"].shape[0]
    return torch.arange(T)[None].expand(B, T)


def _one_by_one(model, batch, site, single, read):
    """The reference: one full forward per variant."""
    outs = []
    for fn in single:
        outs.append(run_variants(model, batch, 1, {site: per_variant({0: fn}, 4)}, read=read, resume=False))
    return torch.cat(outs)


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
def test_stacked_resumed_variants_equal_one_full_forward_each(site, layer):
    model, batch, single = _setup(site)
    plan = plan_resume(model, [site])
    assert plan.layer == layer
    read = _every_position(batch)
    reference = _one_by_one(model, batch, site, single, read)
    _, cache = run_with(model, batch["input_ids"], record=[plan.site])
    calls = []
    hook = model.hook_embed.register_forward_hook(lambda *a: calls.append(1))
    stacked = run_variants(
        model, batch, len(single), {site: per_variant(dict(enumerate(single)), 4)}, read=read, cache=cache
    )
    hook.remove()
    torch.testing.assert_close(stacked, reference, atol=1e-5, rtol=1e-5)
    assert not calls  # the embedding (and blocks below plan.layer) did not run again
    clean = model(batch["input_ids"])
    assert not torch.allclose(stacked[:4], clean)  # the patch did something


def test_without_a_cache_the_clean_prefix_runs_once_on_the_base_rows():
    model, batch, single = _setup("blocks.1.attn.out")
    rows = []
    hook = model.blocks[0].register_forward_hook(lambda _m, args, _o: rows.append(args[0].shape[0]))
    out = run_variants(model, batch, 3, {"blocks.1.attn.out": per_variant(dict(enumerate(single)), 4)})
    hook.remove()
    assert rows == [4]  # block 0 ran once, on B rows, not on 3 * B
    reference = _one_by_one(model, batch, "blocks.1.attn.out", single, None)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


def test_chunks_to_the_memory_budget_give_the_same_logits_and_gradients():
    model, batch, single = _setup("blocks.0.mlp.out", variants=5)
    edits = {"blocks.0.mlp.out": per_variant(dict(enumerate(single)), 4)}
    calls = []
    hook = model.ln_f.register_forward_hook(lambda *a: calls.append(1))
    whole = run_variants(model, batch, 5, edits)
    chunked = run_variants(model, batch, 5, edits, memory_budget=1)  # one variant per forward
    hook.remove()
    assert calls == [1] + [1] * 5
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)
    (g_whole,) = torch.autograd.grad(whole.sum(), model.tok_emb.weight, retain_graph=True)
    (g_chunked,) = torch.autograd.grad(chunked.sum(), model.tok_emb.weight)
    torch.testing.assert_close(g_chunked, g_whole, atol=1e-5, rtol=1e-5)


def test_resumed_run_tiles_the_batch_and_passes_gradient_upstream():
    model = tiny_transformer()
    batch = {"input_ids": torch.randint(0, 20, (3, 5))}
    plan = plan_resume(model, ["blocks.0.resid_post"])
    _, cache = run_with(model, batch["input_ids"], record=[plan.site])
    out = run_variants(model, batch, 2, {"blocks.0.resid_post": per_variant({}, 3)}, cache=cache)
    assert out.shape == (6, 1, 20)
    torch.testing.assert_close(out[:3], out[3:])
    out.sum().backward()
    assert model.tok_emb.weight.grad.abs().sum() > 0


def test_unedited_variants_pass_through_unchanged():
    x = torch.arange(12.0).view(6, 2)
    edit = per_variant({1: lambda t: t * 0}, 2)
    out = edit(x, range(0, 3))
    torch.testing.assert_close(out[:2], x[:2])
    torch.testing.assert_close(out[4:], x[4:])
    assert (out[2:4] == 0).all()
    assert edit(x[:2], range(2, 3)) is x[:2] or torch.equal(edit(x[:2], range(2, 3)), x[:2])


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


@pytest.mark.parametrize(
    "site, allowed", [("blocks.0.resid_post", True), ("blocks.1.resid_pre", True), ("blocks.1.attn.heads", False)]
)
def test_last_position_only_run_equals_the_full_runs_last_position(site, allowed):
    """When the caller reads only the answer position, the last block computes only it."""
    model, batch, single = _setup(site, variants=1)
    plan = plan_resume(model, [site])
    assert plan.last_only == allowed
    _, cache = run_with(model, batch["input_ids"], record=[plan.site])
    edits = {site: per_variant({0: single[0]}, 4)}
    full = run_variants(model, batch, 1, edits, read=_every_position(batch), cache=cache)
    last = run_variants(model, batch, 1, edits, cache=cache)
    assert last.shape[1] == 1
    torch.testing.assert_close(last[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)
    (g_full,) = torch.autograd.grad(full[:, -1].sum(), cache[plan.site])
    (g_last,) = torch.autograd.grad(last[:, -1].sum(), cache[plan.site])
    torch.testing.assert_close(g_last, g_full, atol=1e-5, rtol=1e-5)
