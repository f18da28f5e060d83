"""The ``concepts`` audit: do a bottleneck's units mean their concepts, does the answer go
through them, and does anything leak around them?

Figures (answers are the argmax over the task's answer tokens):

- ``task_acc``; ``concept_acc`` (mean over concepts) and ``concept_acc/<name>``.
- ``tti/<k>`` for k = 0..K: task accuracy after a test-time intervention that sets ``k`` of the K
  concepts to their true values (Koh et al. 2020), in a fixed random order per example
  (``order: random``) or most-uncertain first (``order: uncertainty``; Shin et al. 2023);
  ``tti_area``: the area under that curve against k/K (1: right at every budget). Each point
  runs only the bottleneck's head on the recorded units.
- ``leakage``: how much better the label can be predicted from what the head reads than from
  the true concepts: held-out accuracy of an MLP probe on (true concepts ⊕ head input) minus
  that of the same probe when the head input is shuffled among examples with the same true
  concepts (a conditional permutation: same features, same relation to the concepts, nothing
  else about the example; both probes see as many dimensions, so overfitting cancels). Near 0
  when the concepts explain what the head reads; large when the rule depends on something the
  concepts do not carry and the bottleneck passes it anyway (Mahinpei et al. 2021, Havasi et
  al. 2022). ``leakage/side`` (hybrid): the same for the side channel alone;
  ``leakage/reference``: the probe on the true concepts alone (1 when they decide the label).

The probes are fitted on the even-numbered examples of the audit set and scored on the odd
ones, from features gathered over every rank (``Total``), so all ranks agree. Beside the
figures, each run writes the intervention curve to ``<run dir>/<label>/intervention_step*.csv``
and ``.png`` (and a wandb table).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from faithful_train.audits.base import Audit, Total
from faithful_train.errors import UnknownNameError
from faithful_train.functional.concepts import (
    first_k_mask,
    intervene,
    intervention_area,
    permute_within_groups,
    probe_accuracy,
)
from faithful_train.functional.interchange import answer_predictions
from faithful_train.functional.losses import answer_forward
from faithful_train.intervene.sites import hooked
from faithful_train.io.files import atomic_write_text
from faithful_train.modeling.bottleneck import BottleneckModel, bottleneck_of
from faithful_train.tasks.base import Batch, Task
from faithful_train.tasks.batch import first_answer_logits

ORDERS = ("random", "uncertainty")


class ConceptsAudit(Audit):
    name = "concepts"

    def __init__(self, order: str = "random", probe_steps: int = 300, **kwargs: Any):
        super().__init__(**kwargs)
        if order not in ORDERS:
            raise UnknownNameError("intervention order", order, ORDERS)
        self.order, self.probe_steps = order, probe_steps
        self.names: tuple[str, ...] = ()
        self.hybrid = False

    def bind(self, model: nn.Module, task: Task, run_seed: int = 0) -> None:
        owner = f"audit {self.label!r}"
        model = bottleneck_of(model, owner)
        model.check_task(task, owner)
        self.names, self.hybrid = model.layout.names, model.bottleneck.mode == "hybrid"
        super().bind(model, task, run_seed)

    def metric_names(self, task: Task) -> list[str]:
        names = ["task_acc", "concept_acc", *(f"concept_acc/{n}" for n in self.names)]
        names += [f"tti/{k}" for k in range(len(self.names) + 1)] + ["tti_area", "leakage", "leakage/reference"]
        return names + (["leakage/side"] if self.hybrid else [])

    def build_data(self, task: Task, seed: int) -> Batch:
        data = task.sample(self.n_examples, seed)
        gen = torch.Generator().manual_seed(seed + 1)
        data["index"] = torch.arange(self.n_examples)
        data["order"] = torch.rand(self.n_examples, len(self.names), generator=gen).argsort(dim=1)
        return data

    def measure(self, model: nn.Module, task: Task, batch: Batch) -> dict[str, Any]:
        model: BottleneckModel = model
        layout = model.layout
        with hooked(model, record=model.bottleneck.site_points()) as cache:
            logits = first_answer_logits(answer_forward(model, batch))
        labels, concepts = model.concept_labels(batch), cache["bottleneck.concepts"][:, 0]  # the position it reads
        out: dict[str, Any] = {"task_acc": (answer_predictions(logits, task) == batch["labels"]).float()}
        right = layout.predict(concepts) == labels  # (B, K)
        out["concept_acc"] = right.float().mean(1)
        out |= {f"concept_acc/{name}": right[:, k].float() for k, name in enumerate(layout.names)}
        order = (
            batch["order"] if self.order == "random" else layout.uncertainty(concepts).argsort(dim=1, descending=True)
        )
        for k in range(layout.n_concepts + 1):
            fixed = intervene(layout, concepts, labels, first_k_mask(order, k))
            out[f"tti/{k}"] = (answer_predictions(model.readout_from(cache, fixed), task) == batch["labels"]).float()
        # features for the leakage probes, as rows of the whole audit set (summed over chunks and ranks)
        features = {
            "true": layout.exact(labels),
            "head_input": self._probe_input(model, concepts, cache),
            "label": batch["labels"][:, None].float(),
        }
        if self.hybrid:
            features["side"] = cache["bottleneck.side"][:, 0]
        for key, value in features.items():
            rows = torch.zeros(self.n_examples, value.shape[1], device=value.device, dtype=torch.float64)
            out[f"rows/{key}"] = Total(rows.index_copy(0, batch["index"], value.double()))
        return out

    @staticmethod
    def _probe_input(model: BottleneckModel, concepts: Tensor, cache: dict[str, Tensor]) -> Tensor:
        """What the head reads, with probabilities as logits (a soft unit's 0.98 vs 0.99 is the
        leak; on the logit scale a probe sees it): the units (discretised if the head reads them
        so) and the side channel, or the mixed value embeddings."""
        bottleneck = model.bottleneck
        if bottleneck.mode == "embedding":
            return bottleneck.head_input(concepts[:, None], embeddings=cache["bottleneck.embeddings"])[:, 0]
        units = model.layout.discretize(concepts) if bottleneck.discrete else concepts
        logits = torch.logit(units.float(), eps=1e-6)
        return torch.cat([logits, cache["bottleneck.side"][:, 0]], 1) if bottleneck.mode == "hybrid" else logits

    def summarise(self, totals: dict[str, Tensor], task: Task) -> dict[str, float]:
        rows = {key.split("/", 1)[1]: value for key, value in totals.items() if key.startswith("rows/")}
        labels = rows["label"][:, 0].long()
        classes = torch.as_tensor(task.answer_tokens) if task.answer_tokens else labels.unique()
        target = torch.searchsorted(classes, labels)  # answer tokens -> 0..C-1
        train = torch.arange(len(labels)) % 2 == 0
        true = rows["true"]
        groups = torch.unique(true, dim=0, return_inverse=True)[1]  # examples with the same true concepts

        def probe(features: Tensor) -> float:
            return probe_accuracy(features, target, len(classes), train, steps=self.probe_steps, seed=0)

        def leakage(channel: Tensor) -> float:
            """Probe accuracy with the channel minus with the channel shuffled among examples
            that share their true concepts: the same features, less what is not about them."""
            shuffled = permute_within_groups(channel, groups, torch.Generator().manual_seed(0))
            return probe(torch.cat([true, channel], 1)) - probe(torch.cat([true, shuffled], 1))

        out = {"leakage/reference": probe(true), "leakage": leakage(rows["head_input"])}
        if "side" in rows:
            out["leakage/side"] = leakage(rows["side"])
        return out

    def evaluate(self, model: nn.Module, task: Task, rank: int = 0, world_size: int = 1) -> dict[str, float]:
        results = super().evaluate(model, task, rank, world_size)
        curve = [results[f"tti/{k}"] for k in range(len(self.names) + 1)]
        return dict(sorted((results | {"tti_area": intervention_area(curve)}).items()))

    def write_artifacts(self, model: nn.Module, task: Task, run_dir: Path, step: int, loggers: list[Any]) -> None:
        """The intervention curve of the latest run: a CSV table, a PNG, and a wandb table."""
        K = len(self.names)
        curve = [(k, k / K, self.latest[f"tti/{k}"]) for k in range(K + 1)]
        folder = run_dir / self.label
        text = "concepts_set,fraction,task_acc\n" + "".join(f"{k},{f:.4f},{a:.6f}\n" for k, f, a in curve)
        atomic_write_text(folder / f"intervention_step{step:06d}.csv", text)
        plot_intervention_curve(
            curve, self.latest.get("tti_area", float("nan")), folder / f"intervention_step{step:06d}.png", step
        )
        for logger in loggers:
            if hasattr(logger, "log_table"):  # WandbLogger
                logger.log_table(
                    key=f"audit/{self.label}/intervention",
                    columns=["concepts_set", "fraction", "task_acc"],
                    data=[list(c) for c in curve],
                    step=step,
                )


def plot_intervention_curve(curve: list[tuple[int, float, float]], area: float, path: Path, step: int) -> None:
    """Task accuracy against the number of concepts set to their true values, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3), dpi=100)
    ax.plot([c[0] for c in curve], [c[2] for c in curve], marker="o")
    ax.set(
        xlabel="concepts set to their true values",
        ylabel="task accuracy",
        ylim=(0, 1.02),
        title=f"step {step}: area {area:.3f}",
    )
    ax.set_xticks([c[0] for c in curve])
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".png.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)
