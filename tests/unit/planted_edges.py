"""A model whose answer flows through three known edges: ``input->a0.h0<v>``, ``a0.h0->m1`` and
``m1->logits`` (one head's output read only by one MLP), with a task that resamples its input.

Residual width 4, 2 blocks of 2 heads, no norms, no mixing across positions, everything linear:
the input writes the token id ``x`` to dim 0; head 0 of block 0 reads dim 0 on its value input
and writes ``2 x`` to dim 1 (its query and key are ignored); MLP 1 writes ``3 * dim 1`` to dim 2;
every other head and MLP writes nothing; the logits are ``(0, dim 2)`` over answers ``(0, 1)``.
So the logit difference of the answer 1 is ``6 x`` at the last position, corrupting any one of
the three edges gives ``6 x'`` (x' the corrupted token), and no other edge matters. The metric
is linear in every receiver's input, so EAP is exact.
"""

import torch
from torch import Tensor, nn

from faithful_train.intervene.edges import graph_forward
from faithful_train.tasks.base import Pairs, Task

EDGES = ["input->a0.h0<v>", "a0.h0->m1", "m1->logits"]


class PlantedEdgesTask(Task):
    name = "planted_edges"
    variables = ("x",)

    @property
    def vocab_size(self) -> int:
        return 10

    @property
    def seq_len(self) -> int:
        return 3

    @property
    def answer_tokens(self) -> tuple[int, ...]:
        return (0, 1)

    def generate(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        ids = torch.randint(1, 10, (n, 3), generator=generator)
        return {"input_ids": ids, "labels": torch.ones(n, dtype=torch.long), "var/x": ids[:, -1]}

    def label_from_variables(self, variables: dict[str, Tensor]) -> Tensor:
        return torch.ones_like(variables["x"])

    def interchange_pairs(self, batch, variables, generator) -> Pairs:
        """The corrupted input: the last token set to 0 (a resample would leave the mean unchanged)."""
        ids = batch["input_ids"].clone()
        ids[:, -1] = 0
        source = dict(batch, input_ids=ids, **{"var/x": ids[:, -1]})
        answers = (batch["labels"][:, None], torch.ones_like(batch["labels"][:, None], dtype=torch.bool))
        return Pairs({v: source for v in variables}, {v: answers for v in variables})


class PlantedEdgesModel(nn.Module):
    n_layers, n_heads = 2, 2

    def __init__(self):
        super().__init__()
        self.cfg = type("Cfg", (), {"d_model": 4, "n_heads": 2})()
        self.scale = nn.Parameter(torch.tensor(1.0))

    def graph_parts(self) -> "Parts":
        return Parts(self)

    def forward(self, input_ids, attention_mask=None, positions=None, narrow=True):
        read = positions if positions is not None else torch.arange(input_ids.shape[1]).expand_as(input_ids)
        return graph_forward(self, input_ids, attention_mask, read)[0]

    def site_points(self):
        return {}


class Parts:
    n_layers, n_heads = 2, 2

    def __init__(self, model):
        self.model = model

    def embed(self, input_ids, attention_mask):
        out = torch.zeros(*input_ids.shape, 4)
        out[..., 0] = input_ids.float() * self.model.scale
        return out

    def contexts(self, resid, attention_mask):
        return [None, None]

    def attn_norm(self, layer, x):
        return x

    def attend(self, layer, q_in, k_in, v_in, context):
        z = torch.zeros(*v_in.shape[:3], 2)
        if layer == 0:
            z[:, :, 0, 0] = v_in[:, :, 0, 0]
        return z

    def head_weights(self, layer):
        weight = torch.zeros(2, 2, 4)
        if layer == 0:
            weight[0, 0, 1] = 2.0
        return weight, None

    def mlp(self, layer, x):
        out = torch.zeros_like(x)
        if layer == 1:
            out[..., 2] = 3.0 * x[..., 1]
        return out

    def logits(self, resid):
        return torch.stack([torch.zeros_like(resid[..., 2]), resid[..., 2]], -1)
