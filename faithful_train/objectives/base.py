"""The ``Objective`` callback: a weighted interventional loss term added to the task loss.

The FaithfulModule records, in the step's one forward pass, every site that its objectives
declare (``sites()``), then asks each objective for ``term(ctx)`` and adds
``weight_at(step) * term`` to the loss (DESIGN.md §3). An objective never runs the plain
forward itself; it may run extra forwards with edits (patched runs).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn

from faithful_train.errors import ConfigError, UnknownNameError
from faithful_train.intervene.hypotheses import Hypothesis, weights_hash
from faithful_train.tasks.base import Batch, Task
from faithful_train.tasks.batch import answer_positions, gather_positions


def _share(value: str, name: str) -> float:
    """``"30%"`` -> 0.3; anything else is a one-line error naming the key."""
    text = value.strip()
    try:
        share = float(text[:-1]) / 100 if text.endswith("%") else None
    except ValueError:
        share = None
    if share is None or not 0 <= share <= 1:
        raise ConfigError(f"schedule {name}: a number of steps or a share of the run such as '30%', got {value!r}")
    return share


@dataclass
class Schedule:
    """Weight multiplier over steps.

    constant: 1.  warmup: linear 0 -> 1 over ``[start, start + steps]``.
    anneal: linear 1 -> ``final`` over ``[start, start + steps]``.

    ``start`` and ``steps`` are steps, or shares of the run written ``"30%"`` (of
    ``trainer.max_steps``, resolved when the run is built), so a shorter run keeps the shape.
    """

    kind: str = "constant"
    start: int | str = 0
    steps: int | str = 0
    final: float = 0.0

    KINDS = ("constant", "warmup", "anneal")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise UnknownNameError("schedule kind", self.kind, self.KINDS)
        for name in ("start", "steps"):
            value = getattr(self, name)
            if isinstance(value, str):
                _share(value, name)
            elif value < 0:
                raise ConfigError(f"schedule start and steps must be >= 0, got {self.start}, {self.steps}")

    def resolve(self, max_steps: int) -> None:
        """Turn shares (``"30%"``) into steps of a run of ``max_steps``."""
        for name in ("start", "steps"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, round(_share(value, name) * max_steps))

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return 1.0
        start, steps = int(self.start), int(self.steps)  # resolved: shares are steps by now
        progress = 1.0 if steps == 0 else min(max((step - start) / steps, 0.0), 1.0)
        if step < start:
            progress = 0.0
        return progress if self.kind == "warmup" else 1.0 + (self.final - 1.0) * progress

    @classmethod
    def parse(cls, spec: Any) -> Schedule:
        if spec is None:
            return cls()
        if isinstance(spec, str):
            return cls(kind=spec)
        allowed = {"kind", "start", "steps", "final"}
        for key in spec:
            if key not in allowed:
                raise UnknownNameError("schedule key", key, allowed)
        return cls(**dict(spec))


@dataclass
class StepContext:
    """What the step's shared forward produced, handed to every objective."""

    batch: Batch
    # the step's logits: every position's (B, T, vocab) when an objective declares
    # needs_token_logits (or the LM loss is on), else those of the positions the step reads
    logits: Tensor
    cache: dict[str, Tensor]  # recorded sites, not detached
    model: nn.Module
    task: Task
    step: int
    generator: torch.Generator  # seeded by (run seed, step, rank): resumable randomness
    extras: dict[str, Any] = field(default_factory=dict)
    reference: nn.Module | None = None  # the frozen starting model, when an objective needs one
    answer_logits: Tensor | None = None  # (B, A, vocab) at the answer positions (the task loss's)
    read_logits: dict[str, Tensor] = field(default_factory=dict)  # label -> (B, k, vocab) at its ``reads``

    def answers(self) -> Tensor:
        """``(B, A, vocab)``: the step's logits at the answer positions."""
        if self.answer_logits is not None:
            return self.answer_logits
        return gather_positions(self.logits, answer_positions(self.batch))


class Objective(Callback, ABC):
    """Base class. Subclasses set ``name`` and implement ``sites`` and ``term``."""

    name: str = "objective"
    # whether the term needs a frozen copy of the starting model (``StepContext.reference``)
    needs_reference: bool = False
    # whether binding adds sites to the model (an SAE's ``<site>.sae``): such objectives are
    # bound first, so the others may name those sites wherever they sit in the list
    adds_sites: bool = False
    # whether the term is the same under activation checkpointing (``model.activation_checkpointing``):
    # its edits are functions of what the forward saw (no random draw inside a hook, no state
    # that changes before the backward pass), so a recomputed block is edited the same way.
    # Built-in objectives declare it (and are tested, tests/unit/modeling/test_checkpointing.py);
    # an objective that does not declare it is refused with checkpointing on.
    supports_activation_checkpointing: bool = False
    # whether the term reads every position's logits (``StepContext.logits`` as (B, T, vocab)); the
    # step otherwise unembeds only the positions it reads
    needs_token_logits: bool = False

    def __init__(self, weight: float = 1.0, schedule: Any = None, label: str | None = None):
        if weight < 0:
            raise ConfigError(f"objective {self.name!r}: weight must be >= 0, got {weight}")
        self.weight = float(weight)
        self.schedule = Schedule.parse(schedule)
        self.label = label or self.name
        # named components of the last term, logged as train/objective/<label>/<part>
        self.parts: dict[str, Tensor] = {}

    def require_non_negative(self, **values: float) -> None:
        """Raise a config error naming the first of ``values`` (coefficients, rates) below 0."""
        for key, value in values.items():
            if value < 0:
                raise ConfigError(f"objective {self.label!r}: {key} must be >= 0, got {value}")

    @property
    def state_key(self) -> str:
        return f"objective/{self.label}"

    def resolve_schedule(self, max_steps: int) -> None:
        self.schedule.resolve(max_steps)

    def weight_at(self, step: int) -> float:
        return self.weight * self.schedule(step)

    def bind(self, model: nn.Module, task: Task, run_seed: int = 0) -> None:
        """Check names against the model and task before training (raise FaithfulError)."""

    def attach(self, pl_module: LightningModule) -> None:
        """Take what the objective needs from the module before training (e.g. another
        objective's SAE, ``pl_module.objective_modules[label]``); raise a ``FaithfulError`` if it
        is not there. Default: nothing."""

    def module(self) -> nn.Module | None:
        """Trainable parameters of the objective (e.g. a DAS rotation). The FaithfulModule owns
        them (``objective_modules.<label>``), so the optimizer, checkpoints and DDP see them."""
        return None

    def sites(self) -> list[str]:
        """Site names the step's forward must record for this objective."""
        return []

    def reads(self, batch: Batch) -> Tensor | None:
        """``(B, k)`` positions (beyond the answer's) whose logits the term reads from the step's
        own forward, given to it as ``ctx.read_logits[label]``; ``None``: none. Default: none."""
        return None

    def validation_metrics(self, ctx: StepContext) -> dict[str, Tensor]:
        """Figures of this objective on a validation batch, logged as ``val/<name>`` (the batch's
        forward read at the answer and at ``reads``, in ``ctx``). Default: none."""
        return {}

    def step_edits(self, model: nn.Module, task: Task, step: int, batch: Batch) -> dict[str, Any]:
        """Edits (site name -> function of the activation) applied in the step's own forward on
        ``batch``, the
        one the task loss and every term read (e.g. CAFT's ablation); validation and audits run
        the plain model. Asked only while the objective is active. Default: none."""
        return {}

    @abstractmethod
    def term(self, ctx: StepContext) -> Tensor:
        """The unweighted loss term for this step."""

    def hypothesis(self) -> Hypothesis | None:
        """The explanation this objective trains the model towards, as a hypothesis (written to
        ``<run dir>/hypotheses/<label>.json`` at the start, at each checkpoint and at the end of
        training), or ``None``."""
        return None

    def _write_hypothesis(self, trainer: Trainer, pl_module: LightningModule) -> None:
        hypothesis = self.hypothesis()
        if hypothesis is None:
            return
        digest = weights_hash(pl_module.model)  # on every rank: a sharded model's weights are gathered
        if trainer.is_global_zero:
            hypothesis.step, hypothesis.weights_hash = trainer.global_step, digest
            hypothesis.save(Path(trainer.default_root_dir) / "hypotheses" / f"{self.label}.json")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write_hypothesis(trainer, pl_module)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._write_hypothesis(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write_hypothesis(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass
