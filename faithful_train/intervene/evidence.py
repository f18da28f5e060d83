"""Edits of a batch's evidence: the documents and tool results its rows carry as named spans.

Leave-one-document-out, a filler of the same length, a counterfactual or null tool result and a
ContextCite-style random subset are all edits of ``input_ids`` (and of ``attention_mask`` when
tokens are deleted), the same for generated tasks and for rows read from files, where a span
sits at different positions in different rows. Each function is vectorised over rows; the
audits stack their outputs as variants of one engine call (``engine.run_variants``).

Spans are ``(B, 2)`` token ``[start, stop)`` (``span/<name>`` in a batch) or ``(B, k, 2)`` for
``k`` spans at once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from faithful_train.tasks.base import Batch


def document_spans(batch: Batch, n_docs: int) -> Tensor:
    """``(B, k, 2)``: the spans ``span/doc0 .. span/doc{k-1}`` of a batch."""
    return torch.stack([batch[f"span/doc{j}"] for j in range(n_docs)], 1)


def n_documents(spans: tuple[str, ...]) -> int:
    """How many ``doc<j>`` spans a task names (``doc0`` .. ``doc{k-1}``)."""
    return sum(1 for s in spans if s.startswith("doc") and s[3:].isdigit())


def in_spans(spans: Tensor, length: int) -> Tensor:
    """``(B, k, T)`` (or ``(B, T)`` for ``(B, 2)`` spans): True on the tokens inside each span."""
    positions = torch.arange(length, device=spans.device)
    return (positions >= spans[..., :1]) & (positions < spans[..., 1:])


def fill(input_ids: Tensor, spans: Tensor, chosen: Tensor, filler: int) -> Tensor:
    """``input_ids`` with the spans ``chosen`` (``(B, k)`` or ``(k,)`` bool) replaced by ``filler``
    tokens of the same length: the content goes, every position stays."""
    hit = in_spans(spans, input_ids.shape[1])  # (B, k, T)
    chosen = chosen.to(hit.device).expand(hit.shape[:2])
    covered = (hit & chosen[..., None]).any(1)
    return input_ids.masked_fill(covered, filler)


def remove(input_ids: Tensor, attention_mask: Tensor | None, span: Tensor, pad: int) -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)`` with each row's ``span`` ``(B, 2)`` deleted: the deleted
    places move to the front of the row as padding (mask 0), so every token after the span keeps
    its position in the row (answer positions hold) and, since positions count real tokens
    (``batches.position_ids``), sits where it would in a row without the span."""
    B, T = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    keep = ~in_spans(span, T)
    order = keep.long().argsort(dim=1, stable=True)  # deleted places first, the rest in order
    ids = input_ids.gather(1, order).masked_fill(~keep.gather(1, order), pad)
    return ids, (mask * keep).gather(1, order)


def replace(input_ids: Tensor, span: Tensor, tokens: Tensor) -> Tensor:
    """``input_ids`` with each row's ``span`` ``(B, 2)`` overwritten by ``tokens`` ``(B, L)``; every
    span must be ``L`` tokens long (a counterfactual keeps the evidence's schema and length)."""
    lengths = span[:, 1] - span[:, 0]
    if (lengths != tokens.shape[1]).any():
        raise ValueError(f"spans of {lengths.tolist()} tokens cannot take {tokens.shape[1]} tokens")
    index = span[:, :1] + torch.arange(tokens.shape[1], device=span.device)
    return input_ids.scatter(1, index, tokens.to(input_ids.dtype))


def read(input_ids: Tensor, span: Tensor, length: int) -> Tensor:
    """``(B, length)``: the first ``length`` tokens of each row's ``span``."""
    return input_ids.gather(1, span[:, :1] + torch.arange(length, device=span.device))


def random_subsets(n: int, k: int, generator: torch.Generator) -> Tensor:
    """``(n, k)`` bool: which of ``k`` documents each of ``n`` ablations keeps, each kept with
    probability 1/2 (ContextCite's ablation masks, Cohen-Wang et al. 2024)."""
    return torch.rand(n, k, generator=generator) < 0.5


def linear_surrogate(kept: Tensor, target: Tensor, ridge: float = 1e-3) -> tuple[Tensor, Tensor]:
    """ContextCite's surrogate: per example, a linear model ``target ≈ w · kept + b`` fitted by
    (ridge) least squares over the ablations. ``kept`` ``(n, k)`` or ``(B, n, k)``, ``target``
    ``(B, n)``; returns the weights ``(B, k)`` (each document's effect when the others vary too)
    and the fit's R² ``(B,)``. ContextCite fits a Lasso on the logit of the response's
    probability; with k documents and n >> k ablations least squares needs no sparsity."""
    B, n = target.shape
    x = kept.float().to(target.device).expand(B, n, kept.shape[-1])
    design = torch.cat([x, torch.ones(B, n, 1, device=target.device)], 2).double()
    gram = design.transpose(1, 2) @ design + ridge * torch.eye(
        design.shape[2], device=target.device, dtype=torch.double
    )
    coef = torch.linalg.solve(gram, design.transpose(1, 2) @ target.double()[..., None])[..., 0]  # (B, k + 1)
    fitted = (design @ coef[..., None])[..., 0]
    y = target.double()
    total = ((y - y.mean(1, keepdim=True)) ** 2).sum(1)
    r2 = 1 - ((y - fitted) ** 2).sum(1) / total.clamp_min(1e-12)
    return coef[:, :-1].float(), r2.float()


def log_odds(log_prob: Tensor) -> Tensor:
    """``log p - log(1 - p)``: ContextCite's target (the logit of the answer's probability)."""
    return log_prob - torch.log1p(-log_prob.exp().clamp(max=1 - 1e-6))
