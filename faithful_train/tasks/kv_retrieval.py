"""Key–value retrieval: ``k`` documents of facts, then a query; the answer is in one document.

Each document is three tokens, ``entity key value`` ("the <key> of <entity> is <value>"), and
the query is ``? entity key``; the answer is the value of the one document that states that
fact (the *gold* document). The other documents are distractors:

- ``same_key``: the same key on another entity (another value);
- ``near_duplicate``: the same entity with another key (another value);
- the rest: other facts.

Variables: ``doc`` (which document is gold) and ``value`` (its value). The causal model's answer
is the gold document's value, whichever slot it sits in.

``parametric: true`` makes every (entity, key) have one fixed value (a seeded table) that every
document states: the facts are also memorisable, so a model can answer from memory instead of
from the document. A counterfactual document (``counterfactual_evidence``: the gold value
replaced) then tells a model that reads its evidence from one that remembers.

Batches carry ``span/doc<j>`` (each document's tokens), ``span/query``, ``doc_kind`` ``(B, k)``
(0 gold, 1 same key, 2 near duplicate, 3 other) and ``var/doc``, ``var/value``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from faithful_train.tasks.base import Batch, Task

GOLD, SAME_KEY, NEAR_DUPLICATE, OTHER = 0, 1, 2, 3
DOC_KINDS = ("gold", "same_key", "near_duplicate", "other")


class KVRetrieval(Task):
    name = "kv_retrieval"
    variables = ("doc", "value")

    def __init__(
        self,
        n_docs: int = 4,
        n_entities: int = 8,
        n_keys: int = 8,
        n_values: int = 16,
        parametric: bool = False,
        table_seed: int = 0,
    ):
        if n_docs < 3:
            raise ValueError(f"n_docs must be >= 3 (the gold document and its two distractors), got {n_docs}")
        if n_entities < 2 or n_keys < 2 or n_values < 2:
            raise ValueError(f"n_entities, n_keys and n_values must be >= 2, got {n_entities}, {n_keys}, {n_values}")
        self.n_docs, self.n_entities, self.n_keys, self.n_values = n_docs, n_entities, n_keys, n_values
        self.parametric = bool(parametric)
        self.first_key, self.first_value = n_entities, n_entities + n_keys
        self.query_token = self.first_value + n_values
        self._filler = self.query_token + 1
        # the memorisable world: one value per (entity, key)
        self.table = torch.randint(
            0, n_values, (n_entities, n_keys), generator=torch.Generator().manual_seed(table_seed)
        )

    @property
    def vocab_size(self) -> int:
        return self._filler + 1

    @property
    def seq_len(self) -> int:
        return 3 * self.n_docs + 3

    @property
    def filler_token(self) -> int:
        return self._filler

    @property
    def answer_tokens(self) -> tuple[int, ...]:
        return tuple(range(self.first_value, self.first_value + self.n_values))

    @property
    def spans(self) -> tuple[str, ...]:
        return (*(f"doc{j}" for j in range(self.n_docs)), "query")

    @property
    def provides(self) -> frozenset[str]:
        return super().provides | {"documents"}

    def token_name(self, token: int) -> str:
        if token < self.first_key:
            return f"E{token}"
        if token < self.first_value:
            return f"K{token - self.first_key}"
        if token < self.query_token:
            return f"V{token - self.first_value}"
        return "?" if token == self.query_token else "_"

    def _value(self, entity: Tensor, key: Tensor, generator: torch.Generator, avoid: Tensor | None = None) -> Tensor:
        """The fact's value: the table's (parametric), else a random one (unequal to ``avoid``)."""
        if self.parametric:
            return self.table[entity, key]
        value = torch.randint(0, self.n_values, entity.shape, generator=generator)
        if avoid is not None:
            shift = torch.randint(1, self.n_values, entity.shape, generator=generator)
            value = torch.where(value == avoid, (value + shift) % self.n_values, value)
        return value

    def _other(self, than: Tensor, size: int, generator: torch.Generator) -> Tensor:
        """A random index in ``[0, size)`` unequal to ``than``."""
        return (than + torch.randint(1, size, than.shape, generator=generator)) % size

    def generate(self, n: int, generator: torch.Generator) -> Batch:
        k = self.n_docs
        entity = torch.randint(0, self.n_entities, (n,), generator=generator)
        key = torch.randint(0, self.n_keys, (n,), generator=generator)
        value = self._value(entity, key, generator)
        entities, keys = [entity], [key]
        entities.append(self._other(entity, self.n_entities, generator))  # same key, another entity
        keys.append(key)
        entities.append(entity)  # near duplicate: same entity, another key
        keys.append(self._other(key, self.n_keys, generator))
        for _ in range(k - 3):  # other facts (never the query's)
            e = torch.randint(0, self.n_entities, (n,), generator=generator)
            kk = torch.randint(0, self.n_keys, (n,), generator=generator)
            kk = torch.where((e == entity) & (kk == key), self._other(key, self.n_keys, generator), kk)
            entities.append(e)
            keys.append(kk)
        entities, keys = torch.stack(entities, 1), torch.stack(keys, 1)  # (n, k), slot 0 gold
        values = torch.stack(
            [value] + [self._value(entities[:, j], keys[:, j], generator, avoid=value) for j in range(1, k)], 1
        )
        kinds = torch.tensor([GOLD, SAME_KEY, NEAR_DUPLICATE] + [OTHER] * (k - 3)).expand(n, k)
        order = torch.rand(n, k, generator=generator).argsort(1)  # document j is fact order[:, j]
        docs = torch.stack(
            [
                entities.gather(1, order),
                self.first_key + keys.gather(1, order),
                self.first_value + values.gather(1, order),
            ],
            2,
        )
        query = torch.stack([torch.full((n,), self.query_token), entity, self.first_key + key], 1)
        ids = torch.cat([docs.reshape(n, 3 * k), query], 1)
        gold = (order == 0).long().argmax(1)
        starts = torch.arange(k) * 3
        spans = {
            f"span/doc{j}": torch.tensor([int(starts[j]), int(starts[j]) + 3]).expand(n, 2).clone() for j in range(k)
        }
        spans["span/query"] = torch.tensor([3 * k, 3 * k + 3]).expand(n, 2).clone()
        return {
            "input_ids": ids,
            "labels": self.first_value + value,
            "var/doc": gold,
            "var/value": value,
            "doc_kind": kinds.gather(1, order),
            **spans,
        }

    def label_from_variables(self, variables: dict[str, Tensor]) -> Tensor:
        return self.first_value + variables["value"]

    def counterfactual_evidence(self, batch: Batch, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``input_ids`` with the gold document's value replaced by another value, and the
        answer the evidence then gives ``(B,)``."""
        ids = batch["input_ids"].clone()
        gold = batch["var/doc"].to(ids.device)
        new = self._other(batch["var/value"].cpu(), self.n_values, generator).to(ids.device)
        ids.scatter_(1, (3 * gold + 2)[:, None], (self.first_value + new)[:, None])
        return ids, self.first_value + new
