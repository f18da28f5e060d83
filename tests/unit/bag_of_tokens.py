"""Shared by the attribution audit's and the cascading randomisation's tests: a planted model whose
attributions are known."""

from __future__ import annotations

import torch
from torch import nn

from faithful_train.modeling.hooks import HookPoint, SitePoint
from faithful_train.tasks.batch import gather_positions


class BagOfTokens(nn.Module):
    """``logits = readout(sum_t scale_t * embed_t)`` at every position: linear in the ``embed``
    site, so integrated gradients is exact and removing a token changes the logit by exactly its
    attribution. ``scales`` (per position) makes it order-dependent; default: order-invariant."""

    def __init__(self, vocab: int, d: int = 6, scales: torch.Tensor | None = None, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb, self.readout = nn.Embedding(vocab, d), nn.Linear(d, vocab)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(vocab, d, generator=g))
            self.readout.weight.copy_(torch.randn(vocab, d, generator=g))
            self.readout.bias.copy_(torch.randn(vocab, generator=g))
        self.hook_embed = HookPoint()
        self.register_buffer("scales", scales)
        self.double()

    def site_points(self) -> dict[str, SitePoint]:
        return {"embed": SitePoint(self.hook_embed)}

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, positions=None, narrow=True
    ) -> torch.Tensor:
        e = self.hook_embed(self.emb(input_ids))
        if self.scales is not None:
            e = e * self.scales[: input_ids.shape[1], None]
        logits = self.readout(e.sum(1))[:, None].expand(-1, input_ids.shape[1], -1)
        return logits if positions is None else gather_positions(logits, positions)
