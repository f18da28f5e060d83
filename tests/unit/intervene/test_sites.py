import pytest
import torch

from faithful_train.errors import ConfigError, UnknownNameError
from faithful_train.intervene.interventions import patch
from faithful_train.intervene.sites import SiteRef, hooked, run_with
from tests.conftest import tiny_transformer


def test_siteref_parse_and_roundtrip():
    ref = SiteRef.parse({"site": "blocks.0.resid_post", "positions": [1, 3], "dims": [0, 8]})
    assert ref == SiteRef("blocks.0.resid_post", (1, 3), None, (0, 8))
    assert SiteRef.parse(ref.to_dict()) == ref
    assert SiteRef.parse("embed") == SiteRef("embed")


@pytest.mark.parametrize(
    "spec, error",
    [
        ({"site": "embed", "position": [1]}, UnknownNameError),
        ({"positions": [1]}, ConfigError),
        ({"site": "embed", "dims": [4, 2]}, ConfigError),
        (3, ConfigError),
    ],
)
def test_siteref_bad_specs(spec, error):
    with pytest.raises(error):
        SiteRef.parse(spec)


def test_mask_narrows_positions_heads_dims():
    mask = SiteRef("x", positions=(1,), heads=(2,), dims=(0, 3)).mask((5, 4, 4, 8))
    assert mask.shape == (1, 4, 4, 8)
    assert mask.sum() == 3
    assert mask[0, 1, 2, :3].all()
    with pytest.raises(ConfigError):
        SiteRef("x", heads=(0,)).mask((2, 4, 8))
    with pytest.raises(ConfigError):
        SiteRef("x", dims=(0, 9)).mask((2, 4, 8))


def test_select_flattens_the_narrowed_part():
    value = torch.arange(2 * 4 * 6.0).view(2, 4, 6)
    out = SiteRef("x", positions=(1, 2), dims=(2, 4)).select(value)
    assert out.shape == (2, 4)
    assert torch.equal(out[0], torch.tensor([8.0, 9.0, 14.0, 15.0]))


def test_unknown_site_lists_valid_ones():
    model = tiny_transformer()
    with pytest.raises(UnknownNameError) as info:
        with hooked(model, record=["blocks.9.resid_post"]):
            pass
    assert "blocks.9.resid_post" in str(info.value) and "blocks.1.resid_post" in str(info.value)


def test_record_is_not_detached_and_reaches_parameters():
    model = tiny_transformer()
    ids = torch.randint(0, 20, (3, 5))
    _, cache = run_with(model, ids, record=["blocks.0.resid_post", "blocks.1.attn.heads"])
    assert cache["blocks.1.attn.heads"].shape == (3, 5, 4, 8)
    assert cache["blocks.0.resid_post"].requires_grad
    cache["blocks.0.resid_post"].sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.blocks[1].attn.qkv.weight.grad is None  # downstream of the site: no gradient


def test_record_works_without_grad():
    model = tiny_transformer()
    with torch.no_grad():
        _, cache = run_with(model, torch.randint(0, 20, (2, 4)), record=["embed"])
    assert not cache["embed"].requires_grad


def test_hooks_removed_exactly_others_kept():
    model = tiny_transformer()
    point = model.blocks[0].hook_resid_post
    calls = []
    user = point.register_forward_hook(lambda *a: calls.append(1))
    with hooked(model, record=["blocks.0.resid_post"], edits={"blocks.1.mlp.out": lambda t: t}):
        assert len(point._forward_hooks) == 2
        assert len(model.blocks[1].hook_mlp_out._forward_hooks) == 1
    assert len(point._forward_hooks) == 1 and len(model.blocks[1].hook_mlp_out._forward_hooks) == 0
    model(torch.randint(0, 20, (1, 3)))
    assert calls == [1]
    user.remove()


def test_hooks_removed_when_forward_raises():
    model = tiny_transformer()

    def boom(t):
        raise RuntimeError("edit failed")

    with pytest.raises(RuntimeError):
        with hooked(model, edits={"blocks.0.resid_post": boom}):
            model(torch.randint(0, 20, (1, 3)))
    assert not model.blocks[0].hook_resid_post._forward_hooks


def test_patch_matches_manual_computation():
    """Patching resid_post of block 0 at one position == running block 1 on the hand-edited stream."""
    model = tiny_transformer().eval()
    base, source = torch.randint(0, 20, (2, 6)), torch.randint(0, 20, (2, 6))
    _, src = run_with(model, source, record=["blocks.0.resid_post"])
    ref = SiteRef("blocks.0.resid_post", positions=(2,))
    logits, _ = run_with(model, base, edits={ref.name: lambda t: patch(t, src[ref.name], ref.mask(t.shape))})
    with torch.no_grad():
        resid = model.blocks[0](model.embed(base))
        resid[:, 2] = src[ref.name][:, 2]
        manual = model.forward_from(1, resid)
    torch.testing.assert_close(logits, manual)
    assert not torch.allclose(logits, model(base))


def test_clean_patch_leaves_output_unchanged():
    model = tiny_transformer(n_experts=4).eval()
    ids = torch.randint(0, 20, (3, 6))
    clean = model(ids)
    names = list(model.site_points())
    _, cache = run_with(model, ids, record=names)
    for name in names:
        logits, _ = run_with(
            model, ids, edits={name: lambda t, n=name: patch(t, cache[n], torch.ones_like(t, dtype=torch.bool))}
        )
        torch.testing.assert_close(logits, clean, msg=name)
