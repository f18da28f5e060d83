"""Interventional supervision of a declared circuit: the model is trained so that its explanation
is true, i.e. it computes through the components the circuit names.

Each step adds, on the step's batch, through the engine (resumed from the step's forward):

- sufficiency: with the circuit's complement ablated (every other head and MLP of the universe),
  the task's answer loss (``sufficiency: task``), or ``KL(M || C)`` to the full model's answer
  distribution (``sufficiency: kl``, the full model detached), or the squared gap of their
  centred answer logits (``logits``, ``centred_logit_gap``: what the logit-difference
  faithfulness compares, which the KL stops seeing once both are confident), or the answer loss
  plus either (``task+kl``, ``task+logits``: the circuit must answer, and as the full model does;
  ``kl`` or ``logits`` alone are also met by a model that answers nothing, so they slow learning);
- necessity (``necessity_weight > 0``): with the circuit ablated, the answer distribution over
  the task's answers goes to chance: ``KL(uniform || p(answer | M \\ C))``.

    term = L_suff + necessity_weight * L_nec

Ablation as in the ``ablation`` audit (``circuits``), with the step's batch as the reference set
for ``mean`` (its mean, detached) and ``resample`` (another example's activation). At the start
of training the circuit is written to ``<run dir>/hypotheses/<label>.json`` for audits and
``faithful-train verify`` to read.

An **edge circuit** (``edges: ["input->a0.h0<q>", "a0.h0->m1", ...]``, ``intervene.graph``)
runs through the edge-level forward (``intervene.edges``): "C alone" gives every receiver the
ablated value on each edge outside C (``input_r = resid_r − Σ_{s→r ∉ C} (a_s − ā_s)``), "M \\ C"
on each edge of C. The senders' ablated values come from the step's own forward (its recorded
embeddings, per-head outputs and MLP outputs): their batch mean over real tokens (``mean``),
zero, or another example's (``resample``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from faithful_train.errors import ConfigError
from faithful_train.functional.circuits import (
    ABLATIONS,
    AblationValues,
    Knockout,
    check_choice,
    components,
    knockout_edits,
    parse_nodes,
)
from faithful_train.functional.edges import corrupt_record
from faithful_train.functional.interchange import check_positions
from faithful_train.functional.losses import answer_loss
from faithful_train.intervene.edges import Record, graph_forward, model_graph, parts_of
from faithful_train.intervene.engine import run_variants
from faithful_train.intervene.graph import Graph
from faithful_train.intervene.hypotheses import Hypothesis
from faithful_train.intervene.sites import SiteRef, validate_sites
from faithful_train.objectives.base import Objective, StepContext
from faithful_train.tasks.base import Task
from faithful_train.tasks.batch import answer_mask, answer_positions, answer_targets, first_answer_logits

SUFFICIENCY = ("task", "kl", "task+kl", "logits", "task+logits")


def centred_logit_gap(circuit: Tensor, full: Tensor, answers: tuple[int, ...] | None) -> Tensor:
    """Mean squared difference of the circuit's and the full model's first-answer logits over the
    task's answers (every token when it has no fixed set), each centred on its mean over them:
    ``mean_b mean_a ((z_C - mean z_C) - (z_M - mean z_M))²``. For two answers it is the
    squared gap of their logit differences over 4, the quantity MIB's faithfulness compares; unlike the
    KL it does not vanish once both are confident."""
    if answers:
        index = torch.as_tensor(answers, device=circuit.device)
        circuit, full = circuit[:, index], full[:, index]
    circuit, full = circuit.float(), full.float()
    gap = (circuit - circuit.mean(-1, keepdim=True)) - (full - full.mean(-1, keepdim=True))
    return gap.pow(2).mean()


class CircuitObjective(Objective):
    name = "circuit"
    supports_activation_checkpointing = True

    def __init__(
        self,
        circuit: list[Any] | None = None,
        edges: list[str] | None = None,
        granularity: str = "heads",
        ablation: str = "mean",
        sufficiency: str = "task",
        necessity_weight: float = 0.0,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if (circuit is None) == (edges is None):
            raise ConfigError(
                f"objective {self.label!r}: give either 'circuit' (nodes) or 'edges' (sender->receiver names)"
            )
        self.edge_specs = edges
        self.nodes = parse_nodes(circuit, f"objective {self.label!r}") if circuit is not None else ()
        if edges is not None and ablation == "mean_per_position":
            raise ConfigError(f"objective {self.label!r}: an edge circuit ablates with mean, zero or resample")
        self.edge_mask: Tensor | None = None
        self.graph: Graph | None = None
        self.granularity = granularity
        self.ablation = check_choice("ablation", ablation, ABLATIONS)
        self.sufficiency = check_choice("circuit sufficiency loss", sufficiency, SUFFICIENCY)
        self.require_non_negative(necessity_weight=necessity_weight)
        self.necessity_weight = float(necessity_weight)
        self.universe: list[SiteRef] = []
        self.answer_tokens: tuple[int, ...] | None = None

    def bind(self, model: nn.Module, task: Task, run_seed: int = 0) -> None:
        if self.edge_specs is not None:
            self.graph = model_graph(model)
            self.edge_mask = self.graph.parse_circuit(self.edge_specs, f"objective {self.label!r}: edges")
        self.universe = components(model, self.granularity) if self.edge_specs is None else []
        validate_sites(model, {ref.name for ref in self.nodes})
        for ref in self.nodes:
            check_positions(ref, task)
        self.answer_tokens = task.answer_tokens
        if self.necessity_weight and not self.answer_tokens:
            raise ConfigError(
                f"objective {self.label!r}: necessity needs a task with a fixed set of answers "
                "(chance is uniform over them)"
            )

    def sites(self) -> list[str]:
        if self.graph is not None:  # the senders, for their ablated values
            layers = range(self.graph.n_layers)
            return ["embed"] + [f"blocks.{i}.{s}" for i in layers for s in ("attn.heads", "mlp.out")]
        names = {ref.name for ref in (*self.universe, *self.nodes)}
        return sorted(names | {"blocks.0.resid_pre"})  # the ablated run resumes from block 0's input

    def _edge_logits(self, ctx: StepContext) -> Tensor:
        """``(V * B, A, vocab)``: C alone, then (with necessity) M \\ C, by edges."""
        batch, graph = ctx.batch, self.graph
        layers = range(graph.n_layers)
        senders = Record(
            ctx.cache["embed"],
            [ctx.cache[f"blocks.{i}.attn.heads"] for i in layers],
            [ctx.cache[f"blocks.{i}.mlp.out"] for i in layers],
        ).map(Tensor.detach)
        if self.ablation == "resample":
            values = senders.map(lambda t: t.roll(1, dims=0))
        else:
            values = corrupt_record(self.ablation, senders, None, batch.get("attention_mask"))
        corrupt = values.wide(parts_of(ctx.model))
        missing = [graph.real & ~self.edge_mask] + ([self.edge_mask] if self.necessity_weight else [])
        logits, _ = graph_forward(
            ctx.model,
            batch["input_ids"],
            batch.get("attention_mask"),
            answer_positions(batch),
            missing=torch.stack(missing).float(),
            corrupt=corrupt,
            variants=len(missing),
        )
        return logits

    def term(self, ctx: StepContext) -> Tensor:
        batch = ctx.batch
        B = batch["input_ids"].shape[0]
        if self.graph is not None:
            logits = self._edge_logits(ctx)
        else:
            universe, nodes = tuple(self.universe), self.nodes
            knockouts = [Knockout(universe, nodes)] + ([Knockout(nodes)] if self.necessity_weight else [])
            sites = {ref.name for ref in (*universe, *nodes)}
            clean = {name: ctx.cache[name].detach() for name in sites}
            values = AblationValues.from_reference(self.ablation, clean, batch.get("attention_mask"))
            edits = knockout_edits(knockouts, values, batch, clean)
            logits = run_variants(ctx.model, batch, len(knockouts), edits, cache=ctx.cache)  # (V * B, A, vocab)
        circuit = logits[:B]
        terms = {}
        if "task" in self.sufficiency:
            terms["task"] = answer_loss(circuit, answer_targets(batch), answer_mask(batch))
        if "kl" in self.sufficiency:
            full = first_answer_logits(ctx.answers().detach()).float().log_softmax(-1)
            terms["kl"] = (full.exp() * (full - circuit[:, 0].float().log_softmax(-1))).sum(-1).mean()
        if "logits" in self.sufficiency:
            terms["logits"] = centred_logit_gap(
                circuit[:, 0], first_answer_logits(ctx.answers().detach()), self.answer_tokens
            )
        suff = sum(terms.values())
        self.parts = {"sufficiency": suff.detach()}
        if len(terms) > 1:
            self.parts |= {f"sufficiency/{k}": v.detach() for k, v in terms.items()}
        if not self.necessity_weight:
            return suff
        tokens = torch.as_tensor(self.answer_tokens, device=logits.device)
        log_p = logits[B:, 0][:, tokens].float().log_softmax(-1)  # (B, answers)
        nec = (-log_p.mean(-1) - torch.log(torch.tensor(float(len(tokens))))).mean()  # KL(uniform || p)
        self.parts["necessity"] = nec.detach()
        return suff + self.necessity_weight * nec

    def hypothesis(self) -> Hypothesis:
        found = Hypothesis.circuit(self.label, self.nodes, self.granularity, self.ablation, "logit_diff")
        if self.graph is not None:
            found.edges, found.granularity = self.graph.names(self.edge_mask), None
        return found
