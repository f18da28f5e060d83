"""Learned (DAS) and random orthonormal bases (``faithful_train/intervene/rotation.py``): seeded,
orthonormal under training, and variables at one site taking disjoint columns of one basis."""

import pytest
import torch

from faithful_train.errors import ConfigError
from faithful_train.intervene.rotation import OrthonormalBasis, SiteBases, random_basis, rotated_sites, variable_bases
from faithful_train.intervene.sites import SiteRef
from tests.unit.equality_cases import DAS


def test_random_basis_is_orthonormal_and_seeded():
    q = random_basis(16, 5, torch.Generator().manual_seed(0))
    torch.testing.assert_close(q.T @ q, torch.eye(5), atol=1e-5, rtol=0)
    assert torch.equal(q, random_basis(16, 5, torch.Generator().manual_seed(0)))


def test_learned_basis_stays_orthonormal_under_training():
    basis = OrthonormalBasis(16, 6, torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(basis.parameters(), lr=0.1)
    target = torch.randn(16, 6)
    for _ in range(20):
        loss = (basis.basis - target).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    b = basis.basis.detach()
    torch.testing.assert_close(b.T @ b, torch.eye(6), atol=1e-5, rtol=0)


def test_variables_at_one_site_take_disjoint_columns_of_one_basis():
    alignment = {v: SiteRef.parse(s) for v, s in DAS.items()}
    assert rotated_sites(alignment) == {"blocks.0.resid_post": 8}
    bases = SiteBases({"blocks.0.resid_post": 8}, {"blocks.0.resid_post": 32})
    per_var = variable_bases(alignment, bases())
    assert per_var["left"].shape == (32, 4)
    torch.testing.assert_close(per_var["left"].T @ per_var["right"], torch.zeros(4, 4), atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="dims"):
        rotated_sites({"left": SiteRef("blocks.0.resid_post")})
