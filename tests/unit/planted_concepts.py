"""Hand-set concept-bottleneck models whose answers are known, for the concepts audit's tests.

``AttributeReader`` is a planted backbone: its "residual stream" is the one-hot of every
attribute read straight off the tokens (zeros where occluded), laid out like the bottleneck's
units, then ``pattern``. The concept encoder is set by hand to pass those one-hots on as
confident probabilities (|logit| = 4), and ``RuleHead`` applies the task's rule to the concepts
it reads. The leaky variant hides ``pattern`` in the size unit's confidence (|logit| 4 or 4.5)
and its head reads it from there: the textbook soft-probability leak.
"""

from __future__ import annotations

import torch
from torch import nn

from faithful_train.modeling.bottleneck import BottleneckModel
from faithful_train.modeling.concept_layout import ConceptLayout
from faithful_train.modeling.hooks import HookPoint, SitePoint
from faithful_train.tasks.concept_objects import ATTRIBUTES, LABELLED, ConceptObjects


class AttributeReader(nn.Module):
    """The planted backbone (one block)."""

    def __init__(self, task):
        super().__init__()
        self.task, self.n_layers = task, 1
        self.d_model = sum(1 if len(ATTRIBUTES[a]) == 2 else len(ATTRIBUTES[a]) for a in (*LABELLED, "pattern"))
        self.hook = HookPoint()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, ids, attention_mask=None):
        cols = []
        for attr in (*LABELLED, "pattern"):
            start, n = self.task.attribute_token0[attr], len(ATTRIBUTES[attr])
            present = ((ids[..., None] - start) == torch.arange(n)).any(1).float()  # (B, n)
            cols.append(present[:, 1:] if n == 2 else present)
        feats = torch.cat(cols, -1)[:, None].expand(-1, ids.shape[1], -1) + 0 * self.dummy
        return self.hook(feats)

    def site_points(self):
        return {"blocks.0.resid_post": SitePoint(self.hook)}


class RuleHead(nn.Module):
    """The task's rule on the predicted concepts (plus, if leaky, pattern decoded from size's confidence)."""

    def __init__(self, layout, task, leaky):
        super().__init__()
        self.layout, self.task, self.leaky = layout, task, leaky

    def forward(self, x):
        u = x[:, 0]
        values = dict(zip(self.layout.names, self.layout.predict(u).unbind(1)))
        values["pattern"] = torch.zeros(len(u), dtype=torch.long)  # the honest head cannot know it
        if self.leaky:
            p = u[:, self.layout.slices[2]][:, 0].clamp(1e-6, 1 - 1e-6)
            values["pattern"] = ((p / (1 - p)).log().abs() > 4.25).long()
        out = torch.full((len(u), self.task.vocab_size), -10.0)
        out[torch.arange(len(u)), self.task.label_from_variables(values)] = 10.0
        return out[:, None]


def planted(task: ConceptObjects, leaky: bool = False) -> BottleneckModel:
    layout = ConceptLayout.from_task(task.concepts)
    width = layout.n_units + 1
    model = BottleneckModel(AttributeReader(task), layout, task.vocab_size, mode="hard")
    bn = model.bottleneck
    bn.norm = nn.Identity()
    with torch.no_grad():
        w, b = torch.zeros(layout.n_units, width), torch.zeros(layout.n_units)
        for k, s in enumerate(layout.slices):
            for u in range(s.start, s.stop):
                if layout.n_values[k] == 2:
                    w[u, u], b[u] = 8.0, -4.0  # logit = 4 (2f - 1)
                else:
                    w[u, u] = 8.0
        bn.concept_logits.weight.copy_(w)
        bn.concept_logits.bias.copy_(b)
    if leaky:  # size's |logit| grows from 4 to 4.5 on striped objects
        su = layout.slices[2].start

        def leak(module, args, out):
            f, pattern = args[0][..., su], args[0][..., -1]
            out = out.clone()
            out[..., su] = out[..., su] + 0.5 * pattern * (2 * f - 1)
            return out

        bn.concept_logits.register_forward_hook(leak)
    bn.head = RuleHead(layout, task, leaky)
    return model
