"""Learned and random orthonormal bases for interchange in a subspace (distributed alignment
search, DAS; Geiger et al. 2023, "Finding alignments between interpretable causal variables and
distributed neural representations").

DAS learns a rotation ``R`` of a site's ``d``-dimensional activation and swaps only the first
coordinates of the rotated vector. We keep just the columns that are swapped: a ``d x k`` basis
with orthonormal columns (pyvene's low-rank rotated space). Several variables at one site share
one basis and take disjoint column ranges of it (``dims`` of their alignment), so their
subspaces are orthogonal.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import orthogonal

from faithful_train.errors import ConfigError
from faithful_train.intervene.sites import SiteRef


class OrthonormalBasis(nn.Module):
    """A trainable ``d x k`` matrix with orthonormal columns (k <= d), kept orthonormal by
    ``torch.nn.utils.parametrizations.orthogonal`` (the matrix exponential of a skew matrix)."""

    def __init__(self, width: int, rank: int, generator: torch.Generator | None = None):
        super().__init__()
        if not 0 < rank <= width:
            raise ConfigError(f"a rotated subspace needs 0 < rank <= width, got rank {rank}, width {width}")
        self.width, self.rank = width, rank
        linear = nn.Linear(width, rank, bias=False)  # weight (k, d); rows orthonormal
        with torch.no_grad():
            linear.weight.copy_(random_basis(width, rank, generator).T)
        self.map = orthogonal(linear)

    @property
    def basis(self) -> Tensor:
        """``(d, k)``, computed in float32 (autocast off): orthonormal under mixed precision too."""
        with torch.autocast(self.map.parametrizations.weight.original.device.type, enabled=False):
            return self.map.weight.T

    def forward(self) -> Tensor:
        return self.basis


def random_basis(width: int, rank: int, generator: torch.Generator | None = None) -> Tensor:
    """A ``width x rank`` matrix with orthonormal columns, uniformly distributed (QR of a Gaussian)."""
    q, r = torch.linalg.qr(torch.randn(width, rank, generator=generator))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # sign fix: Haar-uniform


def rotated_sites(alignment: Mapping[str, SiteRef]) -> dict[str, int]:
    """Site name -> number of rotated coordinates its variables use (the max ``dims`` stop)."""
    ranks: dict[str, int] = {}
    for var, ref in alignment.items():
        if ref.dims is None:
            raise ConfigError(f"variable {var!r}: a rotated alignment needs 'dims' (the rotated coordinates it swaps)")
        ranks[ref.name] = max(ranks.get(ref.name, 0), ref.dims[1])
    return ranks


def variable_bases(alignment: Mapping[str, SiteRef], site_bases: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Each variable's ``d x k_v`` basis: its ``dims`` columns of its site's basis."""
    return {var: site_bases[ref.name][:, ref.dims[0] : ref.dims[1]] for var, ref in alignment.items()}


class SiteBases(nn.Module):
    """The learned bases of an alignment, one per site (a module the optimizer and checkpoints see)."""

    def __init__(self, ranks: Mapping[str, int], widths: Mapping[str, int], seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.names = sorted(ranks)
        self.bases = nn.ModuleList(OrthonormalBasis(widths[n], ranks[n], generator) for n in self.names)

    def forward(self) -> dict[str, Tensor]:
        return {name: module.basis for name, module in zip(self.names, self.bases)}
