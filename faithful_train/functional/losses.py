"""Losses and scores on a batch's answers and tokens, as pure tensor functions.

- ``answer_loss``: mean cross-entropy over the answer's tokens (teacher forcing);
- ``exact_match``: 1 where every answer token is the argmax;
- ``language_model_loss``: next-token cross-entropy over the real tokens (Radford et al. 2019);
- ``token_kl``: ``KL(p_model || p_reference)`` per token over the real tokens, and
  ``token_kl_from_states``, the same from final hidden states unembedded in checkpointed chunks;
- ``answer_forward``: a model's logits at a batch's answer positions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from faithful_train.tasks.batch import Batch, tile


def answer_forward(model: nn.Module, batch: Batch, input_ids: Tensor | None = None, narrow: bool = True) -> Tensor:
    """Logits ``(N, A, vocab)`` at the answer positions of ``input_ids`` (default: the batch's),
    which may stack ``K`` variants of the batch's rows (``N = K * B``, variant-major): padding
    and answer positions are tiled. With ``narrow`` the model computes only those positions in
    its last block; pass ``False`` when a hook records or edits a site of that block."""
    ids = batch["input_ids"] if input_ids is None else input_ids
    repeats = ids.shape[0] // batch["input_ids"].shape[0]
    extra = tile(batch, repeats)
    positions = extra.get("answer_pos")
    if positions is None:
        positions = torch.full((ids.shape[0], 1), ids.shape[1] - 1, dtype=torch.long, device=ids.device)
    return model(ids, attention_mask=extra.get("attention_mask"), positions=positions, narrow=narrow)


def answer_loss(answer_logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Mean cross-entropy over the answer tokens (teacher forcing): ``(N, A, V)``, ``(N, A)``, ``(N, A)``."""
    losses = F.cross_entropy(answer_logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    weights = mask.flatten().float()
    return (losses * weights).sum() / weights.sum().clamp_min(1.0)


def exact_match(answer_logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """``(N,)`` 1 where every answer token is the argmax (over the whole vocabulary)."""
    right = (answer_logits.argmax(-1) == targets) | ~mask
    return right.all(-1).float()


def language_model_loss(logits: Tensor, input_ids: Tensor, mask: Tensor | None) -> Tensor:
    """Next-token cross-entropy over the real tokens of ``input_ids`` (a language model's loss)."""
    targets = input_ids[:, 1:]
    losses = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), reduction="none")
    if mask is None:
        return losses.mean()
    keep = (mask[:, 1:] * mask[:, :-1]).flatten().float()
    return (losses * keep).sum() / keep.sum().clamp_min(1.0)


def token_kl(logits: Tensor, reference_logits: Tensor, mask: Tensor | None) -> Tensor:
    """``KL(p_model || p_reference)`` per token, averaged over the real tokens: ``(B, T, V)`` each."""
    log_p, log_q = logits.float().log_softmax(-1), reference_logits.float().log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    if mask is None:
        return kl.mean()
    weights = mask.float()
    return (kl * weights).sum() / weights.sum().clamp_min(1.0)


def token_kl_from_states(
    states: Tensor,
    reference_states: Tensor,
    mask: Tensor | None,
    unembed: Callable[[Tensor], Tensor],
    reference_unembed: Callable[[Tensor], Tensor],
    chunk_tokens: int = 512,
) -> Tensor:
    """``token_kl`` from final hidden states ``(B, T, D)`` instead of logits: the real tokens are
    unembedded ``chunk_tokens`` at a time, each chunk under activation checkpointing, so no more
    than one chunk's ``(chunk, vocab)`` logits exist at once, in the forward or the backward (at a
    real vocabulary, every position's logits are gigabytes). The reference side gets no gradient."""
    flat, reference = states.flatten(0, 1), reference_states.flatten(0, 1)
    rows = torch.arange(flat.shape[0], device=flat.device) if mask is None else mask.flatten().nonzero()[:, 0]

    def kl_sum(h: Tensor, h0: Tensor) -> Tensor:
        log_p = unembed(h).float().log_softmax(-1)
        with torch.no_grad():
            log_q = reference_unembed(h0).float().log_softmax(-1)
        return (log_p.exp() * (log_p - log_q)).sum()

    total = states.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk_tokens):
        chosen = rows[start : start + chunk_tokens]
        part = (flat[chosen], reference[chosen])
        total = total + (checkpoint(kl_sum, *part, use_reentrant=False) if torch.is_grad_enabled() else kl_sum(*part))
    return total / max(1, rows.shape[0])


def token_nll_from_states(
    states: Tensor, input_ids: Tensor, mask: Tensor | None, unembed: Callable[[Tensor], Tensor], chunk_tokens: int = 512
) -> tuple[Tensor, Tensor]:
    """``(summed next-token negative log-likelihood, token count)`` over the real tokens of
    ``input_ids`` that follow a real token, from the final hidden states ``(B, T, D)`` unembedded
    ``chunk_tokens`` at a time (a perplexity without every position's logits at once)."""
    keep = torch.ones_like(input_ids[:, 1:], dtype=torch.bool) if mask is None else (mask[:, 1:] * mask[:, :-1]).bool()
    rows, columns = keep.nonzero(as_tuple=True)
    total = states.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk_tokens):
        r, c = rows[start : start + chunk_tokens], columns[start : start + chunk_tokens]
        total = total + F.cross_entropy(unembed(states[r, c]).float(), input_ids[r, c + 1], reduction="sum")
    return total, torch.tensor(float(rows.shape[0]), device=states.device)
