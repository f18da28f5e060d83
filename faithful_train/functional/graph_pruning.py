"""Influence, pruning and scores of an attribution graph, as circuit-tracer computes them
(``circuit_tracer/graph.py``: ``normalize_matrix``, ``compute_influence``, ``prune_graph``,
``compute_graph_scores``), on an adjacency kept sparse: ``(rows, cols, weights)`` with rows the
targets and columns the sources, nodes ordered [features, error nodes (layer-major), tokens,
logits].

- normalised adjacency: ``Â[t, s] = |A[t, s]| / Σ_s' |A[t, s']|``;
- influence: ``I = w Â + w Â² + …`` with ``w`` the logits' probabilities (zero elsewhere), the
  share of the output each node reaches through every path (finite: the graph is acyclic);
- node pruning: the nodes whose influence makes up ``node_threshold`` (0.8) of the total,
  tokens and logits always kept; edge pruning: on the pruned, renormalised adjacency, edges
  scored ``Â[t, s] (I_t + w_t)`` kept up to ``edge_threshold`` (0.98) of the total; then nodes
  left without an outgoing edge (or, for features, an incoming one) removed until none is;
- replacement score: ``I(tokens) / (I(tokens) + I(errors))``; completeness score:
  ``Σ_t (1 − Â[t, errors]) (I_t + w_t) / Σ_t (I_t + w_t)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def find_threshold(scores: Tensor, threshold: float) -> Tensor:
    """The score at which the largest scores first reach ``threshold`` of their sum."""
    ordered = scores.sort(descending=True).values
    cumulative = ordered.cumsum(0) / ordered.sum().clamp_min(1e-30)
    index = min(int(torch.searchsorted(cumulative, torch.tensor(threshold, dtype=cumulative.dtype))), len(ordered) - 1)
    return ordered[index]


def normalised(rows: Tensor, weights: Tensor, n_nodes: int) -> Tensor:
    """``|w| / Σ_row |w|`` per entry."""
    sums = torch.zeros(n_nodes, dtype=weights.dtype).index_add_(0, rows, weights.abs())
    return weights.abs() / sums[rows].clamp_min(1e-10)


def influence(rows: Tensor, cols: Tensor, values: Tensor, start: Tensor, max_iter: int = 1000) -> Tensor:
    """``start Â + start Â² + …`` for the sparse ``Â`` (entries ``values`` at ``(rows, cols)``)."""
    current = torch.zeros_like(start).index_add_(0, cols, start[rows] * values)
    total = current.clone()
    for _ in range(max_iter):
        if not current.any():
            return total
        current = torch.zeros_like(start).index_add_(0, cols, current[rows] * values)
        total += current
    raise RuntimeError(f"influence did not converge in {max_iter} iterations (is the graph acyclic?)")


@dataclass
class Pruned:
    node_mask: Tensor  # (N,) bool
    edge_mask: Tensor  # (E,) bool over the stored entries
    cumulative: Tensor  # (N,) each node's cumulative influence share (circuit-tracer's ``influence`` field)


def prune(
    rows: Tensor,
    cols: Tensor,
    weights: Tensor,
    node_influence: Tensor,
    logit_weights: Tensor,
    n_features: int,
    n_tokens: int,
    n_logits: int,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
) -> Pruned:
    """circuit-tracer's ``prune_graph`` on the stored entries (``node_influence``: exact, from
    every entry of every row, ``attribution_graphs.attribute``)."""
    N = node_influence.shape[0]
    node_mask = node_influence >= find_threshold(node_influence, node_threshold)
    node_mask[N - n_logits - n_tokens :] = True
    kept = node_mask[rows] & node_mask[cols] & (weights != 0)
    r, c = rows[kept].long(), cols[kept].long()
    norm = normalised(r, weights[kept].double(), N)
    pruned_influence = influence(r, c, norm, logit_weights) + logit_weights
    scores = norm * pruned_influence[r]
    edge_mask = torch.zeros_like(kept)
    if len(scores):
        edge_mask[kept] = scores >= find_threshold(scores, edge_threshold)
    sources_end = N - n_logits - n_tokens
    while True:
        before = node_mask.clone()
        edge_mask &= node_mask[rows] & node_mask[cols]
        has_out = torch.zeros(N, dtype=torch.bool).index_fill_(0, cols[edge_mask].long(), True)
        has_in = torch.zeros(N, dtype=torch.bool).index_fill_(0, rows[edge_mask].long(), True)
        node_mask[:sources_end] &= has_out[:sources_end]
        node_mask[:n_features] &= has_in[:n_features]
        if torch.equal(before, node_mask):
            break
    ordered, order = node_influence.sort(descending=True)
    cumulative = torch.zeros_like(node_influence)
    cumulative[order] = ordered.cumsum(0) / ordered.sum().clamp_min(1e-30)
    return Pruned(node_mask, edge_mask, cumulative)


def nodes_for(node_influence: Tensor, share: float = 0.8) -> int:
    """The fewest nodes whose influence makes up ``share`` of the total."""
    ordered = node_influence.sort(descending=True).values
    if ordered.sum() <= 0:
        return 0
    cumulative = ordered.cumsum(0) / ordered.sum()
    return min(int(torch.searchsorted(cumulative, torch.tensor(share, dtype=cumulative.dtype))) + 1, len(ordered))
