"""The ``Audit`` callback: a causal test run every N steps (and at the end of fit) on a fixed,
seeded held-out set.

Subclasses implement ``measure(model, task, batch)``, returning per-example values for each
figure (or ``Total`` counts, summed over the set and turned into figures by ``summarise``,
for figures that are not means: mutual information, load balance; torchmetrics' SumMetric
sums to a scalar, hence ``TensorSum``). The base class runs it over the audit set in eval
mode without gradients, shards the set across ranks, averages with torchmetrics (which
syncs across processes), logs ``audit/<label>/<figure>``, checks pre-registered thresholds,
and appends a record to ``<run dir>/audits.jsonl`` (rank zero). Audits never touch the weights, the optimizer, the
global RNG or the training data stream.
"""

from __future__ import annotations

import operator
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric

from faithful_train.errors import ConfigError, UnknownNameError
from faithful_train.intervene.hypotheses import HypothesisFiles, data_hash, weights_hash
from faithful_train.io.files import append_jsonl
from faithful_train.modeling.sharding import whole_model
from faithful_train.tasks.base import Batch, Task, take
from faithful_train.tasks.batch import trim_padding

_OPERATORS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
_THRESHOLD = re.compile(r"^\s*(>=|<=|>|<)?\s*([-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)\s*$")


def parse_threshold(spec: Any) -> tuple[str, float]:
    """``">= 0.9"``, ``"<0.1"`` or a bare number (meaning ``>=``) -> ``(op, value)``."""
    match = _THRESHOLD.match(str(spec))
    if not match:
        raise ConfigError(f"threshold {spec!r} is not of the form '>= 0.9', '< 0.1' or a number")
    return match.group(1) or ">=", float(match.group(2))


def meets(value: float, spec: str) -> bool:
    """Whether ``value`` meets a threshold such as ``">= 0.9"``."""
    op, bound = parse_threshold(spec)
    return bool(_OPERATORS[op](value, bound))


@dataclass
class Total:
    """Counts of one chunk of the audit set (any shape), summed over chunks and ranks."""

    value: Tensor


class TensorSum(Metric):
    """A tensor summed over updates and synced across processes by summing."""

    def __init__(self, shape: tuple[int, ...], **kwargs: Any):
        super().__init__(**kwargs)
        self.add_state("total", default=torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, value: Tensor) -> None:
        self.total += value.to(self.total)

    def compute(self) -> Tensor:
        return self.total


class Audit(Callback, ABC):
    name: str = "audit"

    def __init__(
        self,
        every_n_steps: int = 100,
        n_examples: int = 512,
        batch_size: int = 256,
        seed: int | None = None,
        thresholds: dict[str, Any] | None = None,
        at_start: bool = False,
        label: str | None = None,
    ):
        if every_n_steps < 0 or n_examples < 1 or batch_size < 1:
            raise ConfigError(
                f"audit {self.name!r}: every_n_steps >= 0, n_examples >= 1, batch_size >= 1 required, "
                f"got {every_n_steps}, {n_examples}, {batch_size}"
            )
        self.every_n_steps, self.n_examples, self.batch_size = every_n_steps, n_examples, batch_size
        self.seed, self.at_start = seed, at_start
        self.label = label or self.name
        self.thresholds = {str(k): parse_threshold(v) for k, v in (thresholds or {}).items()}
        self.latest: dict[str, float] = {}
        self.latest_step: int = -1
        self.latest_verdicts: dict[str, dict[str, Any]] = {}
        self._data: Batch | None = None

    # -- what a subclass provides -------------------------------------------------------------

    @abstractmethod
    def metric_names(self, task: Task) -> list[str]:
        """Names of the figures this audit reports on ``task`` (thresholds must use these)."""

    @abstractmethod
    def measure(self, model: nn.Module, task: Task, batch: Batch) -> dict[str, Tensor]:
        """Per-example values ``(n,)`` of each figure on one chunk of the audit set, or
        ``(values, weights)`` pairs for a weighted mean (weight 0 leaves an example out)."""

    def summarise(self, totals: dict[str, Tensor], task: Task) -> dict[str, float]:
        """Figures from the ``Total`` counts of the whole audit set (default: none)."""
        return {}

    def write_artifacts(self, model: nn.Module, task: Task, run_dir: Path, step: int, loggers: list[Any]) -> None:
        """Files beside the figures (rank zero, after each run of the audit); default: none."""

    def warnings(self) -> list[str]:
        """Lines for the summary when the latest figures should not be taken at face value
        (e.g. attributions that miss the output change they explain). Default: none."""
        return []

    def build_data(self, task: Task, seed: int) -> Batch:
        """The fixed audit set; subclasses may add keys (e.g. paired sources)."""
        return task.sample(self.n_examples, seed)

    # -- shared machinery ---------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        return f"audit/{self.label}"

    def bind(self, model: nn.Module, task: Task, run_seed: int = 0) -> None:
        """Check names against the model and task before training; fix the audit set's seed."""
        valid = self.metric_names(task)
        for metric in self.thresholds:
            if metric not in valid:
                raise UnknownNameError(f"metric of audit {self.label!r}", metric, valid)
        task.check_sample_size(self.n_examples, f"audit {self.label!r}")
        if self.seed is None:
            self.seed = run_seed + 1_000_003
        self._data = None

    def use_hypotheses(self, files: HypothesisFiles) -> None:
        """Where to find the hypotheses this audit reads by path (checked now). Default: none read."""

    def attach(self, pl_module: LightningModule) -> None:
        """Take what the audit needs from the module before it runs (e.g. an objective's
        learned rotation, ``pl_module.objective_modules[label]``). Default: nothing."""

    def data(self, task: Task) -> Batch:
        if self._data is None:
            self._data = self.build_data(task, self.seed if self.seed is not None else 1_000_003)
        return self._data

    def evaluate(self, model: nn.Module, task: Task, rank: int = 0, world_size: int = 1) -> dict[str, float]:
        """Run the audit on this rank's shard; figures are averaged over all ranks' examples."""
        data = self.data(task)
        device = next(model.parameters()).device
        indices = torch.arange(self.n_examples)[rank::world_size]
        metrics: dict[str, MeanMetric] = {}
        sums: dict[str, TensorSum] = {}
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for chunk in indices.split(self.batch_size):
                    batch = {k: v.to(device) for k, v in trim_padding(take(data, chunk)).items()}
                    for key, values in self.measure(model, task, batch).items():
                        if isinstance(values, Total):
                            sums.setdefault(
                                key, TensorSum(tuple(values.value.shape), sync_on_compute=world_size > 1).to(device)
                            )
                            sums[key].update(values.value)
                            continue
                        metrics.setdefault(key, MeanMetric(sync_on_compute=world_size > 1).to(device))
                        value, weight = values if isinstance(values, tuple) else (values, 1.0)
                        metrics[key].update(value.float(), weight)
        finally:
            model.train(was_training)
        results = {key: float(metric.compute()) for key, metric in metrics.items()}
        results |= self.summarise({key: metric.compute().cpu() for key, metric in sums.items()}, task)
        return dict(sorted(results.items()))

    def verdicts(self, results: dict[str, float]) -> dict[str, dict[str, Any]]:
        return {
            metric: {
                "threshold": f"{op} {value:g}",
                "value": results[metric],
                "pass": bool(_OPERATORS[op](results[metric], value)),
            }
            for metric, (op, value) in self.thresholds.items()
        }

    def measured_on(self, model: nn.Module, task: Task, step: int) -> dict[str, Any]:
        """How the latest figures were measured, for a hypothesis file: the task, the audit set
        (size, seed, data hash), the weights' hash, the step, the figures."""
        return {
            "task": task.name,
            "data_hash": data_hash(self.data(task)),
            "n_examples": self.n_examples,
            "seed": self.seed,
            "weights_hash": weights_hash(model),
            "step": step,
            "figures": dict(self.latest),
        }

    def remember(self, results: dict[str, float], step: int) -> dict[str, Any]:
        """Keep ``results`` as the latest (checkpointed, summarised); return the audits.jsonl record."""
        self.latest, self.latest_step, self.latest_verdicts = results, step, self.verdicts(results)
        return {"step": step, "audit": self.label, "metrics": results, "verdicts": self.latest_verdicts}

    def run(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        step = trainer.global_step
        self.attach(pl_module)
        with whole_model(pl_module) as model:  # a sharded model's weights, gathered on every rank
            results = self.evaluate(model, pl_module.task, trainer.global_rank, trainer.world_size)
            record = self.remember(results, step)
            logged = {f"audit/{self.label}/{k}": v for k, v in results.items()}
            for logger in trainer.loggers:
                logger.log_metrics(logged, step=step)
            if trainer.is_global_zero:
                append_jsonl(Path(trainer.default_root_dir) / "audits.jsonl", record)
                self.write_artifacts(model, pl_module.task, Path(trainer.default_root_dir), step, trainer.loggers)
        return results

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.at_start and self.latest_step < 0:
            self.run(trainer, pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self.latest_step:
            self.run(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step != self.latest_step:
            self.run(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"latest": self.latest, "latest_step": self.latest_step, "latest_verdicts": self.latest_verdicts}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.latest = dict(state_dict.get("latest", {}))
        self.latest_step = int(state_dict.get("latest_step", -1))
        self.latest_verdicts = dict(state_dict.get("latest_verdicts", {}))
