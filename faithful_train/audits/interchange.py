"""Interchange-intervention accuracy (IIA; Geiger et al. 2021, 2022), with the controls that tell
a real alignment from capacity, and strict IIA.

For each aligned variable ``v`` and each (base, source) pair of a fixed, seeded held-out set:

    hit_v = [ argmax M(base | site_v <- site_v(source)) == C(base | v <- v(source)) ]

Figures (argmax over the task's answer tokens, so chance is chance and not 0):

- ``iia/<v>`` the mean of ``hit_v``; ``iia`` the mean over variables; ``task_acc`` the model's
  accuracy on the audit's base inputs, unintervened (every answer token right).
- ``iia_changed/<v>``: only the pairs whose counterfactual label differs from the base label,
  where a model that ignores the site always fails.
- ``control/random_subspace/...``: the same swaps along a random orthonormal subspace of the
  same size at the same sites and positions. A learned rotation can find *some* subspace that
  works in almost any high-dimensional activation (Makelov et al. 2023); a real alignment must
  beat a random one clearly.
- ``control/random_model/...``: the same alignment (and rotation) on a randomly initialised
  model of the same architecture: what the alignment achieves without any training.
- with ``strict`` sites (not aligned to any variable): ``strict_iia``, the base label kept when
  they are all resampled from another input (SIIT, Gupta et al. 2024), and ``strict_changed``,
  how often that resample changes the model's answer at all.

``hypothesis: <path>`` audits an alignment hypothesis with a learned (DAS) rotation, e.g.
``hypotheses/das.json`` (paths are relative to the run directory): the file an interchange
objective labelled ``das`` writes, taken live from that objective while it trains, or any other
run's file; ``dims`` then name columns of the learned basis.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from faithful_train.audits.base import Audit
from faithful_train.errors import ConfigError, UnknownNameError
from faithful_train.functional.interchange import (
    SOURCE,
    Alignment,
    Swap,
    answer_predictions,
    counterfactual_targets,
    interchange_hits,
    paired_rows,
    parse_alignment,
    parse_sites,
    swap_forward,
    swap_positions,
    teacher_forced,
    variable_swaps,
)
from faithful_train.intervene.engine import plan_resume
from faithful_train.intervene.hypotheses import HypothesisFiles
from faithful_train.intervene.rotation import random_basis, rotated_sites, variable_bases
from faithful_train.intervene.sites import run_with
from faithful_train.modeling.randomise import randomly_initialised
from faithful_train.tasks.base import Batch, Task
from faithful_train.tasks.batch import (
    answer_mask,
    answer_positions,
    answer_targets,
    first_answer_logits,
    gather_positions,
    tile,
)

RESAMPLE = "resample."
CONTROLS = ("random_subspace", "random_model")


def control_alignment(alignment: Alignment, rotated: bool) -> tuple[Alignment, dict[str, int]]:
    """The alignment the random-subspace control swaps in: each variable keeps its site and
    positions, and takes as many random directions as it swaps (its ``dims`` size, or the
    site's whole width). Returns the alignment (``dims`` as basis columns) and each site's rank
    (``-1``: the site's width, known only once it is recorded)."""
    if rotated:
        return alignment, rotated_sites(alignment)
    refs, ranks = {}, {}
    for var, ref in alignment.items():
        if ref.dims is None:
            refs[var], ranks[ref.name] = ref, -1
            continue
        start = max(ranks.get(ref.name, 0), 0)
        size = ref.dims[1] - ref.dims[0]
        refs[var] = type(ref)(ref.name, ref.positions, ref.heads, (start, start + size))
        ranks[ref.name] = start + size
    return refs, ranks


class InterchangeAudit(Audit):
    name = "interchange"

    def __init__(
        self,
        alignment: dict[str, Any],
        hypothesis: str | None = None,
        controls: list[str] | tuple[str, ...] = CONTROLS,
        strict: list[Any] | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.alignment = parse_alignment(alignment)
        for control in controls:
            if control not in CONTROLS:
                raise UnknownNameError("interchange audit control", control, CONTROLS)
        self.controls = tuple(controls)
        self.hypothesis_path = hypothesis
        if hypothesis is not None:
            rotated_sites(self.alignment)  # every variable names its rotated coordinates
        self.strict = parse_sites(strict)
        self.files = HypothesisFiles()
        self._random_model: nn.Module | None = None
        self._random_bases: dict[str, Tensor] | None = None

    def bind(self, model: nn.Module, task: Task, run_seed: int = 0) -> None:
        parse_alignment({v: ref.to_dict() for v, ref in self.alignment.items()}, model, task)
        parse_sites([ref.to_dict() for ref in self.strict], model, task)
        super().bind(model, task, run_seed)
        self._random_model, self._random_bases = None, None

    def use_hypotheses(self, files: HypothesisFiles) -> None:
        self.files = files
        if self.hypothesis_path is not None:
            files.check(self.hypothesis_path, f"audit {self.label!r}")

    def metric_names(self, task: Task) -> list[str]:
        names = ["iia", "task_acc"]
        for var in self.alignment:
            names += [f"iia/{var}", f"iia_changed/{var}"]
        for control in self.controls:
            names += [f"control/{control}/iia", *(f"control/{control}/iia/{var}" for var in self.alignment)]
        if "random_model" in self.controls:
            names.append("control/random_model/task_acc")
        if self.strict:
            names += ["strict_iia", "strict_changed"]
        return names

    def build_data(self, task: Task, seed: int) -> Batch:
        base, source = task.sample(self.n_examples, seed), task.sample(self.n_examples, seed + 1)
        resample = task.sample(self.n_examples, seed + 2) if self.strict else {}
        return {**base, **{SOURCE + k: v for k, v in source.items()}, **{RESAMPLE + k: v for k, v in resample.items()}}

    def _bases(self) -> dict[str, Tensor] | None:
        """Each variable's basis from the hypothesis's rotations (``None``: no hypothesis)."""
        if self.hypothesis_path is None:
            return None
        found = self.files.load(self.hypothesis_path, kind="alignment")
        rotations = {k.removeprefix("rotation/"): v for k, v in found.tensors.items() if k.startswith("rotation/")}
        missing = sorted({ref.name for ref in self.alignment.values()} - set(rotations))
        if found.featurizer != "rotation" or missing:
            raise ConfigError(
                f"audit {self.label!r}: hypothesis {self.hypothesis_path} holds no learned rotation of "
                f"{missing[0] if missing else 'its sites'}"
            )
        return variable_bases(self.alignment, rotations)

    def _control_bases(self, widths: dict[str, int], device: torch.device) -> tuple[Alignment, dict[str, Tensor]]:
        refs, ranks = control_alignment(self.alignment, self.hypothesis_path is not None)
        if self._random_bases is None:
            generator = torch.Generator().manual_seed(int(self.seed or 0) + 7)
            self._random_bases = {
                name: random_basis(widths[name], widths[name] if rank < 0 else rank, generator)
                for name, rank in sorted(ranks.items())
            }
        site_bases = {name: b.to(device) for name, b in self._random_bases.items()}
        full = {
            var: (ref if ref.dims is not None else type(ref)(ref.name, ref.positions, ref.heads, (0, widths[ref.name])))
            for var, ref in refs.items()
        }
        return full, variable_bases(full, site_bases)

    def measure(self, model: nn.Module, task: Task, batch: Batch) -> dict[str, Tensor]:
        variables = list(self.alignment)
        resample = {k.removeprefix(RESAMPLE): v for k, v in batch.items() if k.startswith(RESAMPLE)}
        paired = paired_rows(task, batch, variables, [resample] if self.strict else [], other_sets=(RESAMPLE,))
        pairs, base, sources, stacked = paired.pairs, paired.base, paired.sources, paired.stacked
        V, B = len(variables), base["input_ids"].shape[0]
        targets, masks = counterfactual_targets(pairs, variables)
        changed = (targets != answer_targets(base).repeat(V, 1)).any(1).view(V, -1).float()
        values: dict[str, Tensor] = {}

        def record(prefix: str, answers: Tensor) -> None:
            hits = interchange_hits(answers, targets, masks, task).view(V, -1)
            values[f"{prefix}iia"] = hits.mean(dim=0)
            for k, var in enumerate(variables):
                values[f"{prefix}iia/{var}"] = hits[k]
                if not prefix:  # MeanMetric over a subset: weight by whether the pair changes the label
                    values[f"iia_changed/{var}"] = (hits[k], changed[k])

        swapped = {ref.name for ref in self.alignment.values()} | {ref.name for ref in self.strict}
        models = [("", model)]
        if "random_model" in self.controls:
            if self._random_model is None:
                self._random_model = randomly_initialised(model, int(self.seed or 0) + 11)
            models.append(("control/random_model/", self._random_model.to(base["input_ids"].device)))
        multi_token = targets.shape[1] > 1
        for prefix, net in models:
            plan = None if multi_token else plan_resume(net, swapped)
            record_sites = swapped | ({plan.site} if plan else set())
            logits, cache = run_with(
                net, stacked["input_ids"], record=record_sites, attention_mask=stacked.get("attention_mask")
            )
            base_cache = {k: v[:B] for k, v in cache.items()}
            activations = {v: paired.rows(cache, v) for v in variables}
            groups = variable_swaps(self.alignment, variables, base, sources, activations, self._bases())
            group_targets = [targets]
            if prefix == "":
                if "random_subspace" in self.controls:
                    widths = {name: act.shape[-1] for name, act in cache.items()}
                    refs, bases = self._control_bases(widths, stacked["input_ids"].device)
                    groups += variable_swaps(refs, variables, base, sources, activations, bases)
                    group_targets.append(targets)
                if self.strict:
                    start = paired.extra_offsets[0]
                    groups.append(
                        [
                            Swap(ref, cache[ref.name][start:], None, *swap_positions(ref, base, paired.extras[0]))
                            for ref in self.strict
                        ]
                    )
                    group_targets.append(answer_targets(base))
            variant_ids = None
            if multi_token:
                tiled = tile(base, len(groups), ("input_ids", "answer_pos", "answer_mask"))
                variant_ids = teacher_forced(tiled, torch.cat(group_targets))
            answers = swap_forward(net, base, groups, base_cache, variant_ids)
            record(prefix, answers[: V * B])
            clean_answers = gather_positions(logits[:B], answer_positions(base))
            values[f"{prefix}task_acc"] = interchange_hits(clean_answers, answer_targets(base), answer_mask(base), task)
            if prefix == "" and "random_subspace" in self.controls:
                record("control/random_subspace/", answers[V * B : 2 * V * B])
            if prefix == "" and self.strict:
                clean = answer_predictions(
                    first_answer_logits(gather_positions(logits[:B], answer_positions(base))), task
                )
                strict = answer_predictions(first_answer_logits(answers[-B:]), task)
                values["strict_iia"] = (strict == base["labels"]).float()
                values["strict_changed"] = (strict != clean).float()
        return values
