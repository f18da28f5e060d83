"""Shared by the interchange tests on hierarchical equality: alignments of the tiny transformer's
variables (``ALIGN``: whole positions; ``DAS``: learned subspaces of one position) and
``PlantedEquality``, a model that computes the task by hand (its IIA is known)."""

import torch
from torch import nn

from faithful_train.modeling.hooks import HookPoint, SitePoint
from faithful_train.tasks.batch import gather_positions
from faithful_train.tasks.hierarchical_equality import HierarchicalEquality

ALIGN = {
    "left": {"site": "blocks.0.resid_post", "positions": [1]},
    "right": {"site": "blocks.0.resid_post", "positions": [3]},
}

DAS = {
    "left": {"site": "blocks.0.resid_post", "positions": [3], "dims": [0, 4]},
    "right": {"site": "blocks.0.resid_post", "positions": [3], "dims": [4, 8]},
}


class PlantedEquality(nn.Module):
    """Computes the task by hand: ``left`` lives in unit 0 of site ``h``, ``right`` in unit 1,
    ``decoy`` (unit 2) holds a copy of ``left`` that the output ignores. Logits put +10 on the
    right answer token. IIA for left/right at their units is exactly 1; at the decoy, chance."""

    def __init__(self, task: HierarchicalEquality, width: int = 3):
        super().__init__()
        self.task, self.width = task, width
        self.hook_h = HookPoint()
        self.dummy = nn.Parameter(torch.zeros(1))

    def site_points(self):
        return {"h": SitePoint(self.hook_h)}

    def forward(self, ids, attention_mask=None, positions=None, narrow=True):
        w, x, y, z = ids.unbind(1)
        left, right = (w == x).float(), (y == z).float()
        units = [left, right, left] + [torch.zeros_like(left)] * (self.width - 3)
        h = self.hook_h(torch.stack(units, dim=-1)[:, None].repeat(1, 4, 1))  # (B, 4, width)
        same = 1 - (h[:, -1, 0] - h[:, -1, 1]).abs()
        return self.answer(ids, same, positions)

    def answer(self, ids, same, positions):
        """+10 on the true token where ``same`` is 1, on the false token where it is 0."""
        logits = torch.zeros(ids.shape[0], 4, self.task.vocab_size) + self.dummy
        logits[:, -1, self.task.true_token] = 10 * same
        logits[:, -1, self.task.false_token] = 10 * (1 - same)
        return logits if positions is None else gather_positions(logits, positions)
