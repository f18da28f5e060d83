"""Interventions: pure, differentiable functions from a site's activation to its replacement.

Each takes the base activation and a boolean ``mask`` (from ``SiteRef.mask``) that says
which entries change; everything outside the mask is left as it was. They are meant to be
wrapped into edits for ``sites.hooked``, e.g. ``lambda t: patch(t, source, ref.mask(t.shape))``.

``rows`` (a slice of the batch) lets several interventions share one forward pass: each
edits its own block of rows of a concatenated batch (batched interchange, §3 of DESIGN.md).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _on_rows(base: Tensor, new_rows: Tensor, rows: slice | None) -> Tensor:
    if rows is None:
        return new_rows
    start, stop, _ = rows.indices(base.shape[0])
    return torch.cat([base[:start], new_rows, base[stop:]], dim=0)


def patch(base: Tensor, source: Tensor, mask: Tensor, rows: slice | None = None) -> Tensor:
    """Activation patching: ``where(mask, source, base)``; ``source`` has the shape of ``base[rows]``."""
    part = base if rows is None else base[rows]
    return _on_rows(base, torch.where(mask, source.to(part.dtype), part), rows)


def interchange(
    base: Tensor,
    source: Tensor,
    mask: Tensor,
    basis: Tensor | None = None,
    rows: slice | None = None,
) -> Tensor:
    """Interchange intervention (Geiger et al. 2021; DAS, Geiger et al. 2023).

    Without ``basis``, a subspace patch: ``where(mask, source, base)``. With a ``d x k`` matrix
    ``Q`` of orthonormal columns (a learned or random subspace), the coordinates of the
    activation along ``Q`` are swapped and the rest kept:

        out = base + mask * ((source - base) Q) Q^T

    which is DAS's ``R^T (where(first k, R s, R b))`` with the rotation's first ``k`` rows
    ``Q^T``; here ``mask`` selects positions (and heads), not dimensions. Entries outside
    ``mask`` are returned exactly. The rotation is applied in float32 (autocast off), whatever
    precision the activations have: in bf16 its projection would not be one.
    """
    if basis is None:
        return patch(base, source, mask, rows)
    part = base if rows is None else base[rows]
    with torch.autocast(part.device.type, enabled=False):
        basis = basis.float()
        delta = ((source.float() - part.float()) @ basis) @ basis.T
    return _on_rows(base, part + (delta * mask).to(part.dtype), rows)


def zero_ablate(base: Tensor, mask: Tensor, rows: slice | None = None) -> Tensor:
    """Zero ablation: the masked entries become 0."""
    part = base if rows is None else base[rows]
    return _on_rows(base, part.masked_fill(mask, 0.0), rows)


def mean_ablate(base: Tensor, mean: Tensor, mask: Tensor, rows: slice | None = None) -> Tensor:
    """Mean ablation: masked entries take a reference mean, broadcast from its trailing shape."""
    part = base if rows is None else base[rows]
    return _on_rows(base, torch.where(mask, mean.to(part.dtype).expand_as(part), part), rows)


def resample_ablate(base: Tensor, permutation: Tensor, mask: Tensor) -> Tensor:
    """Resample ablation: masked entries come from another example of the batch (``base[perm]``)."""
    return torch.where(mask, base[permutation], base)


def steer(base: Tensor, direction: Tensor, mask: Tensor, scale: float = 1.0) -> Tensor:
    """Activation steering: add ``scale * direction`` where the mask selects."""
    return base + mask * (scale * direction.to(base.dtype))


def mean_activation(activations: Tensor) -> Tensor:
    """The reference mean for ``mean_ablate``: the mean over the batch, per position and unit."""
    return activations.mean(dim=0, keepdim=True)
