"""Router losses and routing statistics: pure tensor functions on raw router logits.

Every function takes router logits ``(..., E)`` as recorded at a ``blocks.{i}.moe.router``
site (our MoE and the Hugging Face adapter alike: ``(B, T, E)``) and, where it matters, a
token mask of the leading shape (1 = a real token, 0 = padding). Probabilities are always
``softmax(logits)`` in float32, computed here once from the *raw* logits (never from
scores a model already normalised: that is the "double softmax" bug of some model code).

Losses (the router objective weights each independently):

- ``switch_load_balance``: Switch Transformer's auxiliary loss (Fedus et al. 2021, eq. 4-6),
  ``E * sum_e f_e * P_e`` with ``f_e`` the fraction of top-k assignments that go to expert
  ``e`` and ``P_e`` its mean router probability. ``pooled=True`` pools tokens of all layers
  before the product, exactly as transformers' ``load_balancing_loss_func``; ``False`` is the
  mean of the per-layer losses. Minimum ``top_k`` (uniform routing).
- ``router_z_loss``: ST-MoE (Zoph et al. 2022, eq. 5), ``mean_tokens logsumexp(x)^2``.
- ``routing_entropy``: ``mean_tokens H(softmax(x))`` in nats: low is decisive routing.
- ``mapped_alignment_loss``: experts given per concept value, ``-log sum_{e in M(c)} p_e``.
- ``expert_concept_mi_loss``: the mapping learned: ``-I(expert; concept)`` under soft
  routing, ``I = sum_{c,e} P(c,e) log P(c,e) / (P(c) P(e))`` with ``P(c,e)`` the mean of
  ``p(e|x)`` over tokens of concept ``c`` times ``P(c)`` (Mod-Squad, Chen et al. 2023, eq. 3).

Statistics (the router audit): ``normalized_mutual_information`` of a contingency table
(arithmetic normalisation, as scikit-learn's default), ``load_statistics`` of assignment
counts (coefficient of variation, max/mean, dead experts), ``bias_update`` (DeepSeek-V3's
auxiliary-loss-free balancing, Liu et al. 2024 §2.1.2: ``b_e += rate * sign(mean load - load_e)``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _flat(logits: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(N, E)`` float logits and ``(N,)`` float token weights."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    weights = torch.ones(flat.shape[0], device=flat.device) if mask is None else mask.reshape(-1).to(flat.device, torch.float32)
    if weights.shape[0] != flat.shape[0]:
        raise ValueError(f"mask has {weights.shape[0]} tokens, router logits {flat.shape[0]}")
    return flat, weights


def _masked_mean(values: Tensor, weights: Tensor) -> Tensor:
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def top_k_experts(logits: Tensor, top_k: int, bias: Tensor | None = None) -> Tensor:
    """Indices ``(..., k)`` of the experts chosen: top-k of ``logits + bias`` (the bias steers
    only the choice, as in DeepSeek-V3; softmax is monotonic, so logits rank as probabilities)."""
    scores = logits.float() if bias is None else logits.float() + bias.to(logits.device, torch.float32)
    return scores.topk(top_k, dim=-1).indices


def expert_load(logits: Tensor, top_k: int, mask: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """``(E,)`` number of top-k assignments each expert receives (padding excluded)."""
    flat, weights = _flat(logits, mask)
    chosen = top_k_experts(flat, top_k, bias)
    return torch.zeros(flat.shape[-1], device=flat.device).scatter_add_(0, chosen.reshape(-1), weights.repeat_interleave(top_k))


def switch_load_balance(layers: Sequence[Tensor], top_k: int, mask: Tensor | None = None, pooled: bool = True) -> Tensor:
    """Switch load-balancing loss over the router logits of ``layers`` (see module docstring)."""
    if not layers:
        raise ValueError("switch_load_balance needs the router logits of at least one layer")
    E = layers[0].shape[-1]
    counts, prob_sums, totals = [], [], []
    for logits in layers:
        flat, weights = _flat(logits, mask)
        counts.append(expert_load(flat, top_k, weights))
        prob_sums.append((flat.softmax(-1) * weights[:, None]).sum(0))
        totals.append(weights.sum())
    if pooled:
        total = torch.stack(totals).sum()
        return E * (torch.stack(counts).sum(0) / total * (torch.stack(prob_sums).sum(0) / total)).sum()
    per_layer = [E * (c / t * (p / t)).sum() for c, p, t in zip(counts, prob_sums, totals)]
    return torch.stack(per_layer).mean()


def router_z_loss(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    flat, weights = _flat(logits, mask)
    return _masked_mean(torch.logsumexp(flat, dim=-1).square(), weights)


def entropy_of(probs: Tensor) -> Tensor:
    """Entropy in nats along the last dimension, with ``0 log 0 = 0``."""
    return -(probs * probs.clamp_min(1e-30).log()).sum(-1)


def routing_entropy(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    flat, weights = _flat(logits, mask)
    return _masked_mean(entropy_of(flat.softmax(-1)), weights)


def token_concepts(concept: Tensor, logits: Tensor) -> Tensor:
    """A per-sequence ``(B,)`` or per-token ``(B, T)`` concept label as ``(B*T,)`` per token."""
    if concept.dim() == 1:
        concept = concept[:, None].expand(*logits.shape[:2])
    return concept.reshape(-1)


def mapped_alignment_loss(logits: Tensor, concept: Tensor, mapping: Tensor, mask: Tensor | None = None) -> Tensor:
    """``-log sum_{e in M(c)} p_e`` averaged over tokens; ``mapping`` is ``(C, E)`` boolean."""
    flat, weights = _flat(logits, mask)
    labels = token_concepts(concept, logits).to(flat.device)
    allowed = mapping.to(flat.device)[labels]  # (N, E)
    log_probs = flat.log_softmax(-1).masked_fill(~allowed, float("-inf"))
    return _masked_mean(-torch.logsumexp(log_probs, dim=-1), weights)


def expert_concept_mi_loss(logits: Tensor, concept: Tensor, n_concepts: int, mask: Tensor | None = None) -> Tensor:
    """``-I(expert; concept)`` in nats under soft routing (Mod-Squad's mutual-information loss)."""
    flat, weights = _flat(logits, mask)
    labels = token_concepts(concept, logits).to(flat.device)
    one_hot = F.one_hot(labels, n_concepts).float() * weights[:, None]  # (N, C)
    joint = one_hot.T @ flat.softmax(-1) / weights.sum().clamp_min(1.0)  # P(c, e), (C, E)
    return -mutual_information(joint)


def mutual_information(joint: Tensor) -> Tensor:
    """``I`` in nats of a joint distribution (or contingency table) ``(C, E)``."""
    joint = joint / joint.sum().clamp_min(1e-30)
    outer = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
    ratio = (joint.clamp_min(1e-30) / outer.clamp_min(1e-30)).log()
    return (joint * ratio).sum()


def normalized_mutual_information(contingency: Tensor) -> Tensor:
    """``I(A;B) / mean(H(A), H(B))`` of a count table ``(A, B)``; 1 when either determines the
    other both ways, 0 when independent (0 too when both are constant)."""
    joint = contingency.double() / contingency.sum().clamp_min(1)
    denominator = (entropy_of(joint.sum(1)) + entropy_of(joint.sum(0))) / 2
    if denominator <= 1e-12:
        return torch.zeros((), dtype=torch.float64)
    return (mutual_information(joint) / denominator).clamp(0.0, 1.0)


def load_statistics(counts: Tensor) -> dict[str, Tensor]:
    """Balance of assignment counts ``(E,)``: coefficient of variation (std / mean, population
    std), max / mean, and the number of experts that received nothing."""
    counts = counts.double()
    mean = counts.mean().clamp_min(1e-12)
    return {
        "load_cv": counts.std(unbiased=False) / mean,
        "load_max_mean": counts.max() / mean,
        "dead_experts": (counts == 0).sum().double(),
    }


def bias_update(bias: Tensor, load: Tensor, rate: float) -> Tensor:
    """DeepSeek-V3 auxiliary-loss-free balancing: raise the bias of under-loaded experts and
    lower that of over-loaded ones by ``rate``."""
    return bias + rate * torch.sign(load.float().mean() - load.float()).to(bias.dtype)
