"""Interchange-intervention accuracy (IIA; Geiger et al. 2021, 2022).

For each aligned variable ``v`` and each (base, source) pair of a fixed, seeded held-out set:

    hit_v = [ argmax M(base | site_v <- site_v(source)) == C(base | v <- v(source)) ]

``iia/<v>`` is the mean of ``hit_v``; ``iia`` the mean over variables. Chance is about 0.5
on balanced binary tasks. ``iia_changed/<v>`` counts only the pairs where the
counterfactual label differs from the base label: the pairs where a model that ignores the
site would always fail.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from faithful_train.audits.base import Audit
from faithful_train.causal import counterfactual_targets, interchange_forward, interchange_hits, parse_alignment
from faithful_train.sites import run_with
from faithful_train.tasks.base import Batch, Task

SOURCE = "source."


class InterchangeAudit(Audit):
    name = "interchange"

    def __init__(self, alignment: dict[str, Any], **kwargs: Any):
        super().__init__(**kwargs)
        self.alignment = parse_alignment(alignment)

    def bind(self, model: nn.Module, task: Task, run_seed: int = 0) -> None:
        parse_alignment({v: ref.to_dict() for v, ref in self.alignment.items()}, model, task)
        super().bind(model, task, run_seed)

    def metric_names(self, task: Task) -> list[str]:
        names = ["iia"]
        for var in self.alignment:
            names += [f"iia/{var}", f"iia_changed/{var}"]
        return names

    def build_data(self, task: Task, seed: int) -> Batch:
        base, source = task.sample(self.n_examples, seed), task.sample(self.n_examples, seed + 1)
        return {**base, **{SOURCE + k: v for k, v in source.items()}}

    def measure(self, model: nn.Module, task: Task, batch: Batch) -> dict[str, Tensor]:
        base = {k: v for k, v in batch.items() if not k.startswith(SOURCE)}
        source = {k.removeprefix(SOURCE): v for k, v in batch.items() if k.startswith(SOURCE)}
        variables = list(self.alignment)
        sites = {ref.name for ref in self.alignment.values()}
        _, source_cache = run_with(model, source["input_ids"], record=sites)
        logits = interchange_forward(model, base["input_ids"], source_cache, self.alignment, variables)
        targets = counterfactual_targets(task, base, source, variables)
        hits = interchange_hits(logits[:, -1], targets).view(len(variables), -1)  # (V, B)
        changed = (targets != base["labels"].repeat(len(variables))).view(len(variables), -1)
        values = {"iia": hits.mean(dim=0)}
        for k, var in enumerate(variables):
            values[f"iia/{var}"] = hits[k]
            # MeanMetric over a subset: weight the hits by whether the pair changes the label
            values[f"iia_changed/{var}"] = (hits[k], changed[k].float())
        return values
