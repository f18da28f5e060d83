"""A mixture of domains in one stream, for mixture-of-experts routing.

Each example is ``<domain> x_0 .. x_{n-1} q_j`` over symbols ``0..N-1``, and the answer (one
symbol) depends on the domain:

    copy      x_j
    reverse   x_{n-1-j}
    sum       (x_0 + x_{n-1}) mod N          (the query is ignored)
    sort      the j-th smallest of x          (with repeats)

The domain is the concept label (``concept/domain``, one per sequence, so every token of a
sequence carries it) that router objectives align experts to and router audits measure
against. Causal variables: ``domain``, ``query`` and the operands ``x<i>``; the causal model
is the table above, so setting ``domain`` from another example applies its operation.

Meaning-preserving perturbations keep the domain and the answer: copy and reverse resample
every operand but the one the answer reads; sum swaps its two operands and resamples the
others; sort permutes the operands.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from faithful_train.errors import UnknownNameError
from faithful_train.tasks.base import Batch, Task

DOMAINS = ("copy", "reverse", "sum", "sort")


class DomainMixture(Task):
    name = "domain_mixture"

    def __init__(self, n_symbols: int = 8, n_operands: int = 4, domains: Sequence[str] = DOMAINS):
        if n_symbols < 2 or n_operands < 2:
            raise ValueError(f"n_symbols and n_operands must be >= 2, got {n_symbols}, {n_operands}")
        domains = tuple(domains)
        for d in domains:
            if d not in DOMAINS:
                raise UnknownNameError("domain", d, DOMAINS)
        if len(set(domains)) != len(domains) or not domains:
            raise ValueError(f"domains must be distinct and non-empty, got {list(domains)}")
        self.n_symbols, self.n_operands, self.domains = n_symbols, n_operands, domains
        self.domain_token0 = n_symbols
        self.query_token0 = n_symbols + len(domains)
        self.variables = ("domain", "query", *(f"x{i}" for i in range(n_operands)))

    @property
    def vocab_size(self) -> int:
        return self.query_token0 + self.n_operands

    @property
    def seq_len(self) -> int:
        return self.n_operands + 2

    @property
    def answer_tokens(self) -> tuple[int, ...]:
        return tuple(range(self.n_symbols))

    @property
    def concepts(self) -> dict[str, tuple[str, ...]]:
        return {"domain": self.domains}

    def token_name(self, token: int) -> str:
        if token < self.n_symbols:
            return str(token)
        if token < self.query_token0:
            return f"<{self.domains[token - self.domain_token0]}>"
        return f"q{token - self.query_token0}"

    def _batch(self, domain: Tensor, query: Tensor, operands: Tensor) -> Batch:
        variables = {"domain": domain, "query": query, **{f"x{i}": operands[:, i] for i in range(self.n_operands)}}
        ids = torch.cat([(self.domain_token0 + domain)[:, None], operands, (self.query_token0 + query)[:, None]], dim=1)
        return {
            "input_ids": ids,
            "labels": self.label_from_variables(variables),
            "concept/domain": domain,
            **{f"var/{k}": v for k, v in variables.items()},
        }

    def generate(self, n: int, generator: torch.Generator) -> Batch:
        domain = torch.randint(0, len(self.domains), (n,), generator=generator)
        query = torch.randint(0, self.n_operands, (n,), generator=generator)
        operands = torch.randint(0, self.n_symbols, (n, self.n_operands), generator=generator)
        return self._batch(domain, query, operands)

    def label_from_variables(self, variables: dict[str, Tensor]) -> Tensor:
        x = torch.stack([variables[f"x{i}"] for i in range(self.n_operands)], dim=1)
        query, domain = variables["query"], variables["domain"]
        by_domain = {
            "copy": x.gather(1, query[:, None])[:, 0],
            "reverse": x.gather(1, (self.n_operands - 1 - query)[:, None])[:, 0],
            "sum": (x[:, 0] + x[:, -1]) % self.n_symbols,
            "sort": x.sort(dim=1).values.gather(1, query[:, None])[:, 0],
        }
        out = torch.zeros_like(query)
        for d, name in enumerate(self.domains):
            out = torch.where(domain == d, by_domain[name], out)
        return out

    def perturb(self, batch: Batch, generator: torch.Generator) -> Tensor:
        return self.perturb_aligned(batch, generator)[0]

    def perturb_aligned(self, batch: Batch, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """The label-preserving rewrite, and for each new token the position it stands for: the
        operand an answer reads keeps (copy, reverse) or changes (sum's swap, sort's
        permutation) its place; resampled operands stand for nothing (-1); the rest in place."""
        ids, k = batch["input_ids"], self.n_operands
        operands, domain, query = ids[:, 1 : k + 1].cpu(), batch["concept/domain"].cpu(), batch["var/query"].cpu()
        names = [self.domains[d] for d in domain.tolist()]
        is_kind = {kind: torch.tensor([name == kind for name in names], dtype=torch.bool) for kind in DOMAINS}
        fresh = torch.randint(0, self.n_symbols, operands.shape, generator=generator)
        position = torch.arange(k).expand_as(operands)  # each operand slot's old place, 0-based
        # copy / reverse: keep only the operand the answer reads
        read = torch.where(is_kind["copy"], query, k - 1 - query)[:, None]
        out = fresh.scatter(1, read, operands.gather(1, read))
        source = torch.full_like(operands, -1).scatter(1, read, read)
        # sum: its two operands swapped, the rest resampled
        swapped = fresh.clone()
        swapped[:, 0], swapped[:, -1] = operands[:, -1], operands[:, 0]
        swapped_source = torch.full_like(operands, -1)
        swapped_source[:, 0], swapped_source[:, -1] = k - 1, 0
        out = torch.where(is_kind["sum"][:, None], swapped, out)
        source = torch.where(is_kind["sum"][:, None], swapped_source, source)
        # sort: the operands permuted
        order = torch.rand(operands.shape, generator=generator).argsort(dim=1)
        out = torch.where(is_kind["sort"][:, None], operands.gather(1, order), out)
        source = torch.where(is_kind["sort"][:, None], position.gather(1, order), source)
        result = ids.clone()
        result[:, 1 : k + 1] = out.to(ids.device)
        aligned = torch.arange(ids.shape[1]).expand_as(ids).clone()
        aligned[:, 1 : k + 1] = torch.where(source >= 0, source + 1, -1)
        return result, aligned.to(ids.device)
