"""Tool use: the model picks a tool by emitting its token, the tool's result is inserted, and the
answer is read from that result.

One example is fourteen tokens::

    ?  x  op  y   CALL  <tool>   RESULT  f1 v1  f2 v2  f3 v3   =   -> answer

- a *lookup* question ``? entity K_a _`` (attribute ``a`` of an entity) calls ``lookup``, whose
  result is the entity's record: its three attributes, each ``K_i value``, in random order;
- an *arithmetic* question ``? a op b`` (``op`` in ``+ - *``, numbers mod ``n_values``) calls
  ``calc``, whose result is ``+ (a+b) - (a-b) * (a*b)`` in random order.

The answer is the value of the field the question asks for. The model emits the tool token at
the ``CALL`` position (trained with the answer: ``span/tool`` and ``tool_ids``, see
``batches.tool_call``) and the answer at ``=``.

Every answer can also be known without the result: arithmetic is a function of ``a``, ``op`` and
``b``, and with ``parametric: true`` (default) every entity's attributes are a fixed, seeded
table, so a model may answer from memory and ignore what the tool returned. Counterfactual
results (``counterfactual_evidence``: the asked field's value replaced, the schema kept), null
results and shuffled results (another example's record from the same tool; both built by the
``tools`` audit from ``span/result``) tell a model that reads its tool's result from one that
ignores it.

Variables: ``tool`` (0 lookup, 1 calc) and ``result`` (the asked value). Batches carry
``span/question``, ``span/tool``, ``span/result``, ``tool_ids``, ``value_pos`` (where the asked
value sits) and ``var/*``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from faithful_train.tasks.base import Batch, Task

TOOLS = ("lookup", "calc")
OPS = ("+", "-", "*")
N_FIELDS = 3
RESULT_START = 7  # the record's first token
TOOL_POS = 5


class ToolUse(Task):
    name = "tool_use"
    variables = ("tool", "result")

    def __init__(
        self,
        n_entities: int = 8,
        n_values: int = 16,
        lookup_fraction: float = 0.5,
        parametric: bool = True,
        table_seed: int = 0,
    ):
        if n_entities < 2 or n_values < 3:
            raise ValueError(f"n_entities must be >= 2 and n_values >= 3, got {n_entities}, {n_values}")
        if not 0 <= lookup_fraction <= 1:
            raise ValueError(f"lookup_fraction must be in [0, 1], got {lookup_fraction}")
        self.n_entities, self.n_values = n_entities, n_values
        self.lookup_fraction, self.parametric = float(lookup_fraction), bool(parametric)
        self.first_value = n_entities
        self.first_key = self.first_value + n_values  # K0 K1 K2
        self.first_op = self.first_key + N_FIELDS  # + - *
        self.first_tool = self.first_op + len(OPS)  # lookup calc
        specials = self.first_tool + len(TOOLS)
        self.question_token, self.call_token, self.result_token, self.equals_token, self._filler = range(
            specials, specials + 5
        )
        self.table = torch.randint(
            0, n_values, (n_entities, N_FIELDS), generator=torch.Generator().manual_seed(table_seed)
        )

    @property
    def vocab_size(self) -> int:
        return self._filler + 1

    @property
    def seq_len(self) -> int:
        return RESULT_START + 2 * N_FIELDS + 1

    @property
    def answer_tokens(self) -> tuple[int, ...]:
        return tuple(range(self.first_value, self.first_value + self.n_values))

    @property
    def tool_tokens(self) -> tuple[int, ...]:
        return tuple(range(self.first_tool, self.first_tool + len(TOOLS)))

    @property
    def filler_token(self) -> int:
        return self._filler

    @property
    def spans(self) -> tuple[str, ...]:
        return ("question", "tool", "result")

    @property
    def provides(self) -> frozenset[str]:
        return super().provides | {"tool_calls"}

    def token_name(self, token: int) -> str:
        token = int(token)
        if token < self.first_value:
            return f"E{token}"
        if token < self.first_key:
            return str(token - self.first_value)
        if token < self.first_op:
            return f"K{token - self.first_key}"
        if token < self.first_tool:
            return OPS[token - self.first_op]
        if token < self.question_token:
            return TOOLS[token - self.first_tool]
        return ("?", "CALL", "RESULT", "=", "_")[token - self.question_token]

    def _records(self, tool: Tensor, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        """``(n, 3)`` the value of each field (lookup: attributes K0..K2; calc: + - *)."""
        n = tool.shape[0]
        if self.parametric:
            lookup = self.table[x.clamp_max(self.n_entities - 1)]
        else:
            lookup = torch.randint(0, self.n_values, (n, N_FIELDS), generator=generator)
        calc = torch.stack([(x + y) % self.n_values, (x - y) % self.n_values, (x * y) % self.n_values], 1)
        return torch.where((tool == 0)[:, None], lookup, calc)

    def generate(self, n: int, generator: torch.Generator) -> Batch:
        tool = (torch.rand(n, generator=generator) >= self.lookup_fraction).long()  # 0 lookup, 1 calc
        entity = torch.randint(0, self.n_entities, (n,), generator=generator)
        a = torch.randint(0, self.n_values, (n,), generator=generator)
        b = torch.randint(0, self.n_values, (n,), generator=generator)
        field = torch.randint(0, N_FIELDS, (n,), generator=generator)
        lookup = tool == 0
        x = torch.where(lookup, entity, a)
        records = self._records(tool, x, b, generator)  # (n, 3)
        order = torch.rand(n, N_FIELDS, generator=generator).argsort(1)  # slot s shows field order[:, s]
        field_tokens = torch.where(lookup[:, None], self.first_key, self.first_op) + order
        pairs = torch.stack([field_tokens, self.first_value + records.gather(1, order)], 2).reshape(n, 2 * N_FIELDS)
        op_token = torch.where(lookup, self.first_key, self.first_op) + field
        question = torch.stack(
            [
                torch.full((n,), self.question_token),
                torch.where(lookup, entity, self.first_value + a),
                op_token,
                torch.where(lookup, torch.full((n,), self._filler), self.first_value + b),
            ],
            1,
        )
        call = torch.stack(
            [torch.full((n,), self.call_token), self.first_tool + tool, torch.full((n,), self.result_token)], 1
        )
        ids = torch.cat([question, call, pairs, torch.full((n, 1), self.equals_token)], 1)
        value = records.gather(1, field[:, None])[:, 0]
        slot = (order == field[:, None]).long().argmax(1)

        def span(start: int, stop: int) -> Tensor:
            return torch.tensor([start, stop]).expand(n, 2).clone()

        return {
            "input_ids": ids,
            "labels": self.first_value + value,
            "tool_ids": self.first_tool + tool,
            "value_pos": RESULT_START + 2 * slot + 1,
            "var/tool": tool,
            "var/result": value,
            "span/question": span(0, 4),
            "span/tool": span(TOOL_POS, TOOL_POS + 1),
            "span/result": span(RESULT_START, RESULT_START + 2 * N_FIELDS),
        }

    def label_from_variables(self, variables: dict[str, Tensor]) -> Tensor:
        return self.first_value + variables["result"]

    def counterfactual_evidence(self, batch: Batch, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``input_ids`` with the asked field's value in the tool's result replaced by another
        value (fields, order and length kept), and the answer the result then gives ``(B,)``."""
        ids = batch["input_ids"].clone()
        old = batch["var/result"]
        new = ((old.cpu() + torch.randint(1, self.n_values, old.shape, generator=generator)) % self.n_values).to(
            ids.device
        )
        ids.scatter_(1, batch["value_pos"][:, None], (self.first_value + new)[:, None])
        return ids, self.first_value + new
