"""Every objective in a small, seeded training step, for tests that compare one step under two
settings (activation checkpointing on and off, fp32 and bf16): ``CASES[name]()`` gives the
model, task, bound objectives, batch and reference; ``step_loss`` is the FaithfulModule's
training loss for them (the step's one recorded forward with the objectives' step edits, the
task loss, then every term)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from faithful_train.modeling import starting_point
from faithful_train.objectives.base import Objective
from faithful_train.tasks.base import Task
from faithful_train.training.module import step_loss as module_step_loss
from tests.conftest import tiny_transformer

ALIGN = {
    "left": {"site": "blocks.0.resid_post", "positions": [3], "dims": [0, 16]},
    "right": {"site": "blocks.0.resid_post", "positions": [3], "dims": [16, 32]},
}
CIRCUIT = [{"site": "blocks.0.attn.heads", "heads": [0, 1, 2]}, "blocks.0.mlp.out", "blocks.1.mlp.out"]


@dataclass
class Case:
    model: nn.Module
    task: Task
    objectives: list[Objective]
    batch: dict[str, Tensor]
    reference: nn.Module | None = None
    owned: dict[str, nn.Module] = field(default_factory=dict)  # objectives' own modules, by label


class _Module(nn.Module):
    """What ``Objective.attach`` reads from a FaithfulModule."""

    def __init__(self, model: nn.Module, task: Task, owned: dict[str, nn.Module]):
        super().__init__()
        self.model, self.task, self.objective_modules = model, task, nn.ModuleDict(owned)


def bound(
    model: nn.Module, task: Task, objectives: list[Objective], batch: dict[str, Tensor], reference: bool = False
) -> Case:
    for objective in sorted(objectives, key=lambda o: not o.adds_sites):
        objective.bind(model, task, 0)
    owned = {o.label: o.module() for o in objectives if o.module() is not None}
    for objective in objectives:
        objective.attach(_Module(model, task, owned))
    return Case(model, task, objectives, batch, starting_point(model) if reference else None, owned)


def _equality(**kwargs) -> tuple[nn.Module, Task]:
    from faithful_train.tasks.hierarchical_equality import HierarchicalEquality

    task = HierarchicalEquality()
    return tiny_transformer(vocab_size=task.vocab_size, **kwargs), task


def interchange() -> Case:
    from faithful_train.objectives.interchange import InterchangeObjective

    model, task = _equality()
    return bound(model, task, [InterchangeObjective(ALIGN)], task.sample(16, 0))


def das() -> Case:
    from faithful_train.objectives.interchange import InterchangeObjective

    model, task = _equality()
    align = {v: {**ref, "dims": [i * 8, (i + 1) * 8]} for i, (v, ref) in enumerate(ALIGN.items())}
    return bound(model, task, [InterchangeObjective(align, subspace="learned")], task.sample(16, 0))


def strict() -> Case:
    from faithful_train.objectives.interchange import InterchangeObjective

    model, task = _equality()
    objective = InterchangeObjective(ALIGN, strict=[{"site": "blocks.0.resid_post", "positions": [0, 1]}])
    return bound(model, task, [objective], task.sample(16, 0))


def circuit() -> Case:
    from faithful_train.objectives.circuit import CircuitObjective

    model, task = _equality()
    return bound(model, task, [CircuitObjective(CIRCUIT, ablation="mean", necessity_weight=1.0)], task.sample(16, 0))


def router() -> Case:
    from faithful_train.objectives.router import RouterObjective
    from faithful_train.tasks.domain_mixture import DomainMixture

    task = DomainMixture()
    model = tiny_transformer(vocab_size=task.vocab_size, max_seq_len=task.seq_len, n_experts=4)
    objective = RouterObjective(load_balance=1.0, z_loss=0.1, entropy=0.1, alignment=0.5, bias_rate=0.01)
    return bound(model, task, [objective], task.sample(16, 0))


def preserve() -> Case:
    from faithful_train.objectives.preserve import PreserveObjective

    model, task = _equality()
    case = bound(model, task, [PreserveObjective()], task.sample(16, 0), reference=True)
    with torch.no_grad():  # a fine-tune that has moved away from its start
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return case


def stability() -> Case:
    from faithful_train.objectives.stability import StabilityObjective
    from faithful_train.tasks.concept_objects import ConceptObjects

    task = ConceptObjects()
    model = tiny_transformer(task.vocab_size, max_seq_len=task.seq_len)
    return bound(model, task, [StabilityObjective(stability=1.0, right_reasons=2.0, fraction=0.5)], task.sample(16, 0))


def sae() -> Case:
    from faithful_train.objectives.sae import SaeObjective

    model, task = _equality()
    objective = SaeObjective(site="blocks.0.resid_post", expansion=2, k=4, joint=True)
    return bound(model, task, [objective], task.sample(16, 0))


def caft() -> Case:
    from faithful_train.objectives.caft import CaftObjective
    from faithful_train.objectives.sae import SaeObjective
    from faithful_train.tasks.decoy_objects import DecoyObjects

    task = DecoyObjects()
    model = tiny_transformer(vocab_size=task.vocab_size, max_seq_len=task.seq_len)
    objectives = [
        SaeObjective(site="blocks.0.resid_post", expansion=2, k=8),
        CaftObjective(concept="decoy", positions=[-2], min_auroc=0.55, probe_examples=256),
    ]
    return bound(model, task, objectives, task.sample(16, 0))


def concepts() -> Case:
    from omegaconf import OmegaConf

    from faithful_train.modeling import build_model
    from faithful_train.objectives.concepts import ConceptsObjective
    from faithful_train.tasks.concept_objects import ConceptObjects

    task = ConceptObjects()
    torch.manual_seed(0)
    section = OmegaConf.create(
        dict(arch="transformer", d_model=32, n_layers=2, n_heads=4, d_mlp=64, bottleneck={"mode": "hybrid"})
    )
    model = build_model(section, task.vocab_size, task.seq_len, concepts=task.concepts)
    objective = ConceptsObjective(concept=2.0, leakage=0.5, sparsity=0.1, intervention_prob=0.5, intervention=1.0)
    return bound(model, task, [objective], task.sample(16, 0))


def counterfactual_cot() -> Case:
    from faithful_train.objectives.counterfactual_cot import CounterfactualCotObjective
    from faithful_train.tasks.multistep_arithmetic import MultiStepArithmetic

    task = MultiStepArithmetic()
    model = tiny_transformer(vocab_size=task.vocab_size)
    return bound(model, task, [CounterfactualCotObjective(fraction=0.5)], task.sample(16, 0))


def counterfactual_context() -> Case:
    from faithful_train.objectives.counterfactual_context import CounterfactualContextObjective
    from faithful_train.tasks.kv_retrieval import KVRetrieval

    task = KVRetrieval(parametric=True)
    model = tiny_transformer(vocab_size=task.vocab_size, max_seq_len=task.seq_len)
    return bound(model, task, [CounterfactualContextObjective(fraction=0.5)], task.sample(16, 0))


def tool_call() -> Case:
    from faithful_train.objectives.tool_call import ToolCallObjective
    from faithful_train.tasks.tool_use import ToolUse

    task = ToolUse()
    model = tiny_transformer(vocab_size=task.vocab_size, max_seq_len=task.seq_len)
    return bound(model, task, [ToolCallObjective()], task.sample(16, 0))


def language_model() -> Case:
    from faithful_train.objectives.language_model import LanguageModelObjective

    model, task = _equality()
    return bound(model, task, [LanguageModelObjective()], task.sample(16, 0))


CASES: dict[str, Callable[[], Case]] = {
    "interchange": interchange,
    "das": das,
    "strict": strict,
    "circuit": circuit,
    "router": router,
    "preserve": preserve,
    "stability": stability,
    "sae": sae,
    "caft": caft,
    "concepts": concepts,
    "counterfactual_cot": counterfactual_cot,
    "counterfactual_context": counterfactual_context,
    "tool_call": tool_call,
    "language_model": language_model,
}


def step_loss(case: Case, step: int = 0, seed: int = 0) -> Tensor:
    """The FaithfulModule's training loss on ``case.batch``: answer loss plus every objective's term."""
    active = [(objective, 1.0) for objective in case.objectives]
    return module_step_loss(case.model, case.task, active, case.batch, step, seed, case.reference).loss


def gradients(case: Case, loss: Tensor) -> dict[str, Tensor]:
    """Every gradient the loss gives the model and the objectives' own modules."""
    params = {f"model.{n}": p for n, p in case.model.named_parameters() if p.requires_grad}
    params |= {f"{label}.{n}": p for label, m in case.owned.items() for n, p in m.named_parameters() if p.requires_grad}
    for p in params.values():
        p.grad = None
    loss.backward()
    return {name: p.grad.detach().clone() for name, p in params.items() if p.grad is not None}
