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
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class RouterRows:
    """Router logits prepared once for every term: expert-major ``(L, E, N)`` float (``L``
    stacked layers, or 1) with token weights ``(N,)`` (1 = real token, 0 = padding), and the
    log-partition, log-probabilities and probabilities computed on first use.

    Expert-major because softmax, top-k and their backward over a last dimension of 4-64
    experts are 5-20x slower on CPU than over the leading one (measured; benchmarks/router_step.py).
    """

    rows: Tensor
    weights: Tensor
    stacked: bool  # the logits had a leading layer dimension

    @classmethod
    def of(cls, logits: Tensor | RouterRows, mask: Tensor | None = None) -> RouterRows:
        """From logits ``(B, T, E)``, ``(L, B, T, E)`` or ``(N, E)`` and an optional mask ``(B, T)``."""
        if isinstance(logits, RouterRows):
            return logits
        E = logits.shape[-1]
        n = (
            mask.numel()
            if mask is not None
            else (logits.shape[-3] * logits.shape[-2] if logits.dim() >= 3 else logits.shape[0])
        )
        rows = logits.float().reshape(-1, n, E).transpose(1, 2).contiguous()
        weights = torch.ones(n, device=rows.device) if mask is None else mask.reshape(-1).to(rows.device, torch.float32)
        return cls(rows, weights, logits.dim() == 4)

    @cached_property
    def log_partition(self) -> Tensor:  # (L, N)
        return torch.logsumexp(self.rows, dim=1)

    @cached_property
    def log_probs(self) -> Tensor:  # (L, E, N)
        return self.rows - self.log_partition[:, None]

    @cached_property
    def probs(self) -> Tensor:  # (L, E, N)
        return self.log_probs.exp()

    def mean(self, values: Tensor) -> Tensor:
        """Mean over layers of the weighted mean over tokens of ``values`` ``(L, N)``."""
        return (values @ self.weights / self.weights.sum().clamp_min(1.0)).mean()

    def load(self, top_k: int, bias: Tensor | None = None) -> Tensor:
        """``(L, E)`` top-k assignment counts (of ``logits + bias`` where a bias is given)."""
        scores = self.rows.detach()
        if bias is not None:
            scores = scores + bias.to(scores.device, torch.float32).reshape(-1, scores.shape[1], 1)
        chosen = scores.topk(top_k, dim=1).indices  # (L, k, N)
        L = scores.shape[0]
        counts = torch.zeros(L, scores.shape[1], device=scores.device)
        return counts.scatter_add_(1, chosen.reshape(L, -1), self.weights.repeat(top_k).expand(L, -1))


def top_k_experts(logits: Tensor, top_k: int, bias: Tensor | None = None) -> Tensor:
    """Indices ``(..., k)`` of the experts chosen: top-k of ``logits + bias`` (the bias steers
    only the choice, as in DeepSeek-V3; softmax is monotonic, so logits rank as probabilities)."""
    scores = logits.float() if bias is None else logits.float() + bias.to(logits.device, torch.float32)
    return scores.topk(top_k, dim=-1).indices


def expert_load(
    logits: Tensor | RouterRows, top_k: int, mask: Tensor | None = None, bias: Tensor | None = None
) -> Tensor:
    """Number of top-k assignments each expert receives (padding excluded): ``(E,)``, or
    ``(L, E)`` for stacked layers ``(L, B, T, E)`` (``bias`` then ``(L, E)``)."""
    r = RouterRows.of(logits, mask)
    counts = r.load(top_k, bias)
    return counts if r.stacked else counts[0]


def switch_load_balance(
    layers: Sequence[Tensor] | Tensor | RouterRows,
    top_k: int,
    mask: Tensor | None = None,
    pooled: bool = True,
    counts: Tensor | None = None,
) -> Tensor:
    """Switch load-balancing loss over the router logits of ``layers`` (a sequence, or stacked
    ``(L, B, T, E)``; see module docstring). ``counts``: the ``(L, E)`` top-k assignment counts
    if already known (the experts the model actually chose, e.g. under a selection bias);
    by default the top-k of the logits, as transformers counts them."""
    if isinstance(layers, Sequence):
        if not layers:
            raise ValueError("switch_load_balance needs the router logits of at least one layer")
        layers = torch.stack([x.reshape(1, -1, x.shape[-1]) for x in layers])  # (L, 1, N, E)
    r = RouterRows.of(layers, mask)
    L, E = r.rows.shape[:2]
    counts = r.load(top_k) if counts is None else counts  # (L, E)
    probs = r.probs @ r.weights  # (L, E)
    total = r.weights.sum()
    if pooled:
        return E * ((counts.sum(0) / (total * L)) * (probs.sum(0) / (total * L))).sum()
    return (E * (counts / total * (probs / total)).sum(-1)).mean()


def router_z_loss(logits: Tensor | RouterRows, mask: Tensor | None = None) -> Tensor:
    r = RouterRows.of(logits, mask)
    return r.mean(r.log_partition.square())


def entropy_of(probs: Tensor) -> Tensor:
    """Entropy in nats along the last dimension, with ``0 log 0 = 0``."""
    return -(probs * probs.clamp_min(1e-30).log()).sum(-1)


def routing_entropy(logits: Tensor | RouterRows, mask: Tensor | None = None) -> Tensor:
    r = RouterRows.of(logits, mask)
    return r.mean(-(r.probs * r.log_probs).sum(1))


def token_concepts(concept: Tensor, n_tokens: int) -> Tensor:
    """A per-sequence ``(B,)`` or per-token ``(B, T)`` concept label as ``(B*T,)`` per token."""
    if concept.dim() == 1:
        concept = concept.repeat_interleave(n_tokens // concept.shape[0])
    return concept.reshape(-1)


def mapped_alignment_loss(
    logits: Tensor | RouterRows, concept: Tensor, mapping: Tensor, mask: Tensor | None = None
) -> Tensor:
    """``-log sum_{e in M(c)} p_e`` averaged over tokens (and layers); ``mapping`` is ``(C, E)`` boolean."""
    r = RouterRows.of(logits, mask)
    labels = token_concepts(concept, r.weights.shape[0]).to(r.rows.device)
    allowed = mapping.to(r.rows.device)[labels].T  # (E, N)
    return r.mean(-torch.logsumexp(r.log_probs.masked_fill(~allowed, float("-inf")), dim=1))


def expert_concept_mi_loss(
    logits: Tensor | RouterRows, concept: Tensor, n_concepts: int, mask: Tensor | None = None
) -> Tensor:
    """``-I(expert; concept)`` in nats under soft routing (Mod-Squad's mutual-information loss),
    averaged over stacked layers."""
    r = RouterRows.of(logits, mask)
    labels = token_concepts(concept, r.weights.shape[0]).to(r.rows.device)
    one_hot = F.one_hot(labels, n_concepts).float() * r.weights[:, None]  # (N, C)
    joint = r.probs @ one_hot / r.weights.sum().clamp_min(1.0)  # P(e, c) per layer, (L, E, C)
    return -mutual_information(joint).mean()


def mutual_information(joint: Tensor) -> Tensor:
    """``I`` in nats of a joint distribution (or contingency table) ``(..., C, E)``."""
    joint = joint / joint.sum((-2, -1), keepdim=True).clamp_min(1e-30)
    outer = joint.sum(-1, keepdim=True) * joint.sum(-2, keepdim=True)
    ratio = (joint.clamp_min(1e-30) / outer.clamp_min(1e-30)).log()
    return (joint * ratio).sum((-2, -1))


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
