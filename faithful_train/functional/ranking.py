"""Rank statistics shared by audits: average ranks with ties, Spearman correlation per row,
top-k membership. Pure tensor functions."""

from __future__ import annotations

import torch
from torch import Tensor


def average_ranks(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """1-based ranks along the last dim, ties given their average rank, counting only the
    entries where ``mask`` is True (entries outside it get meaningless ranks)."""
    mask = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()
    valid = mask.unsqueeze(-2)  # over j
    less = ((x.unsqueeze(-2) < x.unsqueeze(-1)) & valid).sum(-1)  # [i]: #{j: x_j < x_i}
    equal = ((x.unsqueeze(-2) == x.unsqueeze(-1)) & valid).sum(-1)  # includes i itself
    return less.double() + (equal.double() + 1) / 2


def spearman(a: Tensor, b: Tensor, mask: Tensor | None = None) -> Tensor:
    """Spearman rank correlation of each row of ``a`` and ``b`` ``(B, N)`` over the entries
    where ``mask`` ``(B, N)`` is True (default all): Pearson correlation of average ranks. A row
    where either side is constant on the mask, or with fewer than two entries, gives 0 (never
    NaN). Returns ``(B,)`` float64."""
    mask = torch.ones_like(a, dtype=torch.bool) if mask is None else mask.bool()
    m = mask.double()
    n = m.sum(-1)
    ra, rb = average_ranks(a, mask), average_ranks(b, mask)
    ca = (ra - (ra * m).sum(-1, keepdim=True) / n.clamp_min(1)[..., None]) * m
    cb = (rb - (rb * m).sum(-1, keepdim=True) / n.clamp_min(1)[..., None]) * m
    cov, var = (ca * cb).sum(-1), (ca * ca).sum(-1) * (cb * cb).sum(-1)
    ok = (var > 0) & (n >= 2)
    rho = torch.where(ok, cov / var.clamp_min(1e-300).sqrt(), torch.zeros_like(cov))
    return rho.clamp(-1.0, 1.0)


def top_k_members(scores: Tensor, k: Tensor | int, mask: Tensor | None = None) -> Tensor:
    """``(B, N)`` bool: each row's ``k`` highest ``scores`` among the entries in ``mask``; ties
    go to the earlier index (a stable sort), so the choice is deterministic. ``k`` may be per row."""
    if mask is not None:
        scores = scores.masked_fill(~mask.bool(), float("-inf"))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    place = order.argsort(dim=-1)  # each entry's place in the order
    k = torch.as_tensor(k, device=scores.device)
    members = place < (k[..., None] if k.dim() else k)
    return members if mask is None else members & mask.bool()
