"""The router objective: MoE routing that is balanced, decisive and readable.

Independently weighted terms on the raw router logits recorded at ``blocks.{i}.moe.router``
in the step's forward (formulas and sources in ``faithful_train.functional.routing``):

- ``load_balance`` (Switch), pooled over layers exactly as transformers'
  ``load_balancing_loss_func`` (``pooling: pooled``) or averaged per layer
  (``pooling: per_layer``); padding is left out when the batch has an ``attention_mask``.
  ``f_e`` counts the experts the model actually chose: with bias balancing on, the biased
  top-k (transformers' count, the unbiased top-k, is the same while the bias is zero);
- ``z_loss`` (ST-MoE);
- ``entropy``: mean routing entropy (lower is more decisive);
- ``alignment``: experts specialise by a task concept (``concept``, e.g. ``domain``). With
  ``mapping: learned`` the term is ``-I(expert; concept)`` and the model picks the mapping;
  with ``mapping: {value: expert or [experts]}`` it is the cross-entropy of routing into the
  given experts.
- ``bias_rate``: DeepSeek-V3's auxiliary-loss-free balancing. After every optimizer step each
  expert's selection bias moves by ``bias_rate`` towards balance (load summed over ranks).
  The bias is a buffer of the model (``selection_bias``), so checkpoints, resume and audits
  see the routing the model was trained with.

Each term is logged unweighted as ``train/objective/<label>/<term>``; so is
``max_violation``, ``max_e load_e / mean load - 1`` of the step (DeepSeek-V3's MaxVio).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn

from faithful_train.errors import ConfigError, UnknownNameError
from faithful_train.functional.routing import (
    RouterRows,
    bias_update,
    expert_concept_mi_loss,
    mapped_alignment_loss,
    router_z_loss,
    routing_entropy,
    switch_load_balance,
)
from faithful_train.modeling.interface import router_layers
from faithful_train.objectives.base import Objective, StepContext
from faithful_train.tasks.base import Task

POOLINGS = ("pooled", "per_layer")


def parse_mapping(mapping: Mapping[str, Any], values: Sequence[str], n_experts: int, owner: str) -> Tensor:
    """``{concept value: expert or [experts]}`` as a boolean ``(C, E)`` table; every value needs one."""
    table = torch.zeros(len(values), n_experts, dtype=torch.bool)
    for value, experts in mapping.items():
        if value not in values:
            raise UnknownNameError(f"concept value in {owner}'s mapping", str(value), values)
        for expert in [experts] if isinstance(experts, int) else list(experts):
            if not 0 <= int(expert) < n_experts:
                raise ConfigError(f"{owner}: expert {expert} for {value!r} is not in [0, {n_experts})")
            table[values.index(value), int(expert)] = True
    missing = [v for v, row in zip(values, table) if not row.any()]
    if missing:
        raise ConfigError(f"{owner}: mapping gives no expert for concept value(s) {missing}")
    return table


class RouterObjective(Objective):
    name = "router"
    supports_activation_checkpointing = True

    def __init__(
        self,
        load_balance: float = 0.0,
        pooling: str = "pooled",
        z_loss: float = 0.0,
        entropy: float = 0.0,
        alignment: float = 0.0,
        concept: str | None = None,
        mapping: str | Mapping[str, Any] = "learned",
        bias_rate: float = 0.0,
        layers: Sequence[int] | None = None,
        weight: float = 1.0,
        schedule: Any = None,
        label: str | None = None,
    ):
        super().__init__(weight, schedule, label)
        if pooling not in POOLINGS:
            raise UnknownNameError("load-balance pooling", pooling, POOLINGS)
        if isinstance(mapping, str) and mapping != "learned":
            raise ConfigError(
                f"objective {self.label!r}: mapping must be 'learned' or {{value: expert}}, got {mapping!r}"
            )
        self.coefficients = {"load_balance": load_balance, "z_loss": z_loss, "entropy": entropy, "alignment": alignment}
        self.require_non_negative(**self.coefficients, bias_rate=bias_rate)
        self.pooling, self.concept, self.mapping, self.bias_rate = pooling, concept, mapping, bias_rate
        self.requested_layers = None if layers is None else [int(i) for i in layers]
        self.layers: dict[int, tuple[int, int]] = {}
        self.table: Tensor | None = None  # given mapping, (C, E)
        self.n_concepts = 0
        self._pending_load: Tensor | None = None

    def bind(self, model: nn.Module, task: Task, run_seed: int = 0) -> None:
        owner = f"objective {self.label!r}"
        self.layers = router_layers(model, self.requested_layers, owner)
        if len(set(self.layers.values())) > 1:
            raise ConfigError(f"{owner}: its layers must share (n_experts, top_k); got {self.layers}; choose 'layers'")
        if self.coefficients["alignment"] > 0:
            self.concept = task.check_concept(self.concept, owner)
            values = task.concepts[self.concept]
            self.n_concepts = len(values)
            if not isinstance(self.mapping, str):
                self.table = parse_mapping(self.mapping, values, next(iter(self.layers.values()))[0], owner)

    def sites(self) -> list[str]:
        return [f"blocks.{i}.moe.router" for i in self.layers]

    def term(self, ctx: StepContext) -> Tensor:
        logits = torch.stack([ctx.cache[site] for site in self.sites()])  # (L, B, T, E)
        rows = RouterRows.of(logits, ctx.batch.get("attention_mask"))  # softmax etc. once, for every term
        top_k = next(iter(self.layers.values()))[1]
        with torch.no_grad():  # (L, E) assignments as the model chose them (selection bias included)
            load = rows.load(top_k, torch.stack([ctx.model.selection_bias(i) for i in self.layers]))
        compute = {
            "load_balance": lambda: switch_load_balance(rows, top_k, pooled=self.pooling == "pooled", counts=load),
            "z_loss": lambda: router_z_loss(rows),
            "entropy": lambda: routing_entropy(rows),
            "alignment": lambda: self._alignment(rows, ctx),
        }
        total = None
        self.parts = {}
        for name, coefficient in self.coefficients.items():
            if coefficient > 0:
                value = compute[name]()
                self.parts[name] = value.detach()
                total = coefficient * value if total is None else total + coefficient * value
        self.parts["max_violation"] = (load.max(-1).values / load.mean(-1).clamp_min(1e-9) - 1).mean()
        self._pending_load = load if self.bias_rate > 0 else None
        return logits.sum() * 0.0 if total is None else total

    def _alignment(self, rows: RouterRows, ctx: StepContext) -> Tensor:
        concept = ctx.batch[f"concept/{self.concept}"]
        if self.table is None:
            return expert_concept_mi_loss(rows, concept, self.n_concepts)
        return mapped_alignment_loss(rows, concept, self.table)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if self._pending_load is None:
            return
        load = (
            trainer.strategy.reduce(self._pending_load, reduce_op="sum")
            if trainer.world_size > 1
            else self._pending_load
        )
        with torch.no_grad():
            for row, layer in zip(load, self.layers):
                bias = pl_module.model.selection_bias(layer)
                bias.copy_(bias_update(bias, row, self.bias_rate))
        self._pending_load = None
