import torch

from faithful_train.intervene.interventions import (
    interchange,
    mean_ablate,
    mean_activation,
    patch,
    resample_ablate,
    steer,
    zero_ablate,
)
from faithful_train.intervene.sites import SiteRef


def _pair():
    torch.manual_seed(0)
    return torch.randn(4, 3, 6, requires_grad=True), torch.randn(4, 3, 6, requires_grad=True)


def test_patch_copies_only_the_mask_and_is_differentiable():
    base, source = _pair()
    mask = SiteRef("x", positions=(1,), dims=(0, 2)).mask(base.shape)
    out = patch(base, source, mask)
    assert torch.equal(out[:, 1, :2], source[:, 1, :2])
    assert torch.equal(out[:, 0], base[:, 0]) and torch.equal(out[:, 1, 2:], base[:, 1, 2:])
    out.sum().backward()
    assert source.grad[:, 1, :2].eq(1).all() and source.grad.sum() == 4 * 2
    assert base.grad[:, 1, :2].eq(0).all()


def test_patch_rows_edits_one_block_of_a_batched_forward():
    base, source = _pair()
    mask = torch.ones(1, 3, 6, dtype=torch.bool)
    out = patch(base, source[:2], mask, rows=slice(2, 4))
    assert torch.equal(out[:2], base[:2]) and torch.equal(out[2:], source[:2])


def test_interchange_without_rotation_is_a_subspace_patch():
    base, source = _pair()
    mask = SiteRef("x", dims=(2, 5)).mask(base.shape)
    assert torch.equal(interchange(base, source, mask), patch(base, source, mask))


def test_interchange_in_a_basis_swaps_only_those_coordinates():
    base, source = _pair()
    rotation, _ = torch.linalg.qr(torch.randn(6, 6))
    basis = rotation[:, :2]
    positions = SiteRef("x", positions=(1,)).mask(base.shape)
    out = interchange(base, source, positions, basis)
    # DAS: in the rotated basis, the first two coordinates come from the source, the rest from the base
    torch.testing.assert_close((out[:, 1] @ rotation)[..., :2], (source[:, 1] @ rotation)[..., :2])
    torch.testing.assert_close((out[:, 1] @ rotation)[..., 2:], (base[:, 1] @ rotation)[..., 2:])
    assert torch.equal(out[:, [0, 2]], base[:, [0, 2]])  # unselected positions exactly untouched
    full = torch.ones_like(positions)
    torch.testing.assert_close(interchange(base, source, full, rotation), source)


def test_interchange_in_the_standard_basis_equals_a_dims_patch():
    base, source = _pair()
    basis = torch.eye(6)[:, 2:5]
    everywhere = torch.ones(1, 3, 6, dtype=torch.bool)
    torch.testing.assert_close(
        interchange(base, source, everywhere, basis), patch(base, source, SiteRef("x", dims=(2, 5)).mask(base.shape))
    )


def test_ablations_and_steering():
    base, _ = _pair()
    mask = SiteRef("x", positions=(0,)).mask(base.shape)
    zeroed = zero_ablate(base, mask)
    assert zeroed[:, 0].abs().sum() == 0 and torch.equal(zeroed[:, 1:], base[:, 1:])
    mean = mean_activation(base)
    meaned = mean_ablate(base, mean, mask)
    assert torch.allclose(meaned[:, 0], mean[:, 0].expand(4, 6)) and torch.equal(meaned[:, 1:], base[:, 1:])
    perm = torch.tensor([1, 2, 3, 0])
    resampled = resample_ablate(base, perm, mask)
    assert torch.equal(resampled[:, 0], base[perm, 0]) and torch.equal(resampled[:, 1:], base[:, 1:])
    direction = torch.ones(6)
    steered = steer(base, direction, mask, scale=2.0)
    assert torch.allclose(steered[:, 0], base[:, 0] + 2) and torch.equal(steered[:, 1:], base[:, 1:])
