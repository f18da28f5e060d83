"""A model whose circuit is known exactly, for hierarchical equality (``w x y z``).

Residual width 4. Block 0: head 0 writes ``left = ±1`` (``w == x``) to dim 0, head 1 writes
``right = ±1`` (``y == z``) to dim 1, the MLP writes a constant to dim 2 (unused). Block 1: both
heads write a constant to dim 2 (unused); the MLP writes ``left * right`` to dim 3. The answer
reads dim 3: logit(TRUE) = 5 d3, logit(FALSE) = -5 d3. So the circuit is exactly
{blocks.0 head 0, blocks.0 head 1, blocks.1 MLP}: with zero ablation the logit difference is
10 with it (and with the full model) and 0 with any of its nodes ablated.
"""

from types import SimpleNamespace

import torch
from torch import nn

from faithful_train.modeling.hooks import HookPoint, SitePoint
from faithful_train.tasks.batch import gather_positions

CIRCUIT = [
    {"site": "blocks.0.attn.heads", "heads": [0, 1]},
    "blocks.1.mlp.out",
]


class PlantedCircuit(nn.Module):
    n_layers = 2

    def __init__(self, task):
        super().__init__()
        self.cfg = SimpleNamespace(n_heads=2, d_model=4)
        self.task = task
        self.scale = nn.Parameter(torch.tensor(5.0))
        self.hooks = nn.ModuleDict({f"{i}_{s}": HookPoint() for i in range(2) for s in ("heads", "attn", "mlp")})

    def forward(self, input_ids, attention_mask=None, positions=None, narrow=True):
        B, T = input_ids.shape
        w, x, y, z = input_ids[:, -4:].unbind(1)
        left, right = (w == x).float() * 2 - 1, (y == z).float() * 2 - 1
        resid = torch.zeros(B, T, 4)
        heads = torch.zeros(B, T, 2, 4)
        heads[..., 0, 0] = left[:, None]
        heads[..., 1, 1] = right[:, None]
        heads = self.hooks["0_heads"](heads)
        resid = resid + self.hooks["0_attn"](heads.sum(2))
        resid = resid + self.hooks["0_mlp"](torch.zeros(B, T, 4).index_fill(2, torch.tensor([2]), 3.0))
        heads = torch.zeros(B, T, 2, 4)
        heads[..., :, 2] = 0.5
        heads = self.hooks["1_heads"](heads)
        resid = resid + self.hooks["1_attn"](heads.sum(2))
        product = torch.zeros(B, T, 4)
        product[..., 3] = resid[..., 0] * resid[..., 1]
        resid = resid + self.hooks["1_mlp"](product)
        logits = torch.full((B, T, self.task.vocab_size), -100.0)
        logits[..., self.task.true_token] = self.scale * resid[..., 3]
        logits[..., self.task.false_token] = -self.scale * resid[..., 3]
        if positions is None:
            return logits
        return gather_positions(logits, positions)

    def site_points(self):
        names = {"heads": "attn.heads", "attn": "attn.out", "mlp": "mlp.out"}
        return {f"blocks.{key[0]}.{names[key[2:]]}": SitePoint(hook) for key, hook in self.hooks.items()}
