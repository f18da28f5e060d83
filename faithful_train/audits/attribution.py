"""The ``attribution`` audit: are the model's per-token attributions faithful, stable and
about the weights?

Attributions are per token at the ``embed`` site (``faithful_train.functional.attribution.attribute_tokens``:
integrated gradients or gradient × input, features summed per position), of the answer's
``output`` (``logit`` or ``logprob``) at the last position, target ``batch["labels"]``.
"Removing" a token means, everywhere below, replacing its ``embed`` activation by the baseline
(zeros), with edits at the ``embed`` site; every set of removals of a chunk runs in ONE forward
over stacked copies of the chunk.

Figures:

- ``task_acc``: argmax over the task's answer tokens (``answer_predictions``).
- ``completeness_error``: mean of ``|delta| / (|f(x) - f(b)| + 1e-6)``, the completeness gap of
  the attributions relative to the output change they explain (integrated gradients'
  completeness axiom, Sundararajan et al. 2017; for gradient × input, ``b`` = 0 and the gap
  measures how far the model is from linear).
- ``steps``, ``trusted`` (integrated gradients with ``max_completeness_error``, default 0.05):
  the chunk's examples whose ``completeness_error`` exceeds the tolerance are attributed again
  with twice the points while the chunk's mean exceeds it, up to ``max_steps`` (default 512);
  ``steps`` is the mean of the points each example used, ``trusted`` 1 if the audit set's
  ``completeness_error`` is within the tolerance, else 0 (and the run's summary warns that
  every figure built on these attributions is not to be trusted). ``max_completeness_error:
  null`` keeps ``steps`` fixed.
- ``irrelevant_share`` (only if the task marks irrelevant tokens, ``batch["irrelevant"]``: noise,
  decoys): the share of each example's absolute attribution on those tokens,
  ``Σ_t |a_t| · irrelevant_t / Σ_t |a_t|``, the figure Ross et al. 2017's right-for-the-right-
  reasons penalty exists to lower.
- ``stability/spearman``, ``stability/topk`` (only if the task has aligned perturbations,
  ``Task.perturb_aligned``; the perturbed inputs and their alignment are drawn once with a
  generator seeded by the audit's seed + 1 and kept in the audit set): Spearman rank correlation
  between the attributions of the original tokens and of the tokens that stand for them in the
  perturbed input (aligned tokens only, ``source >= 0``), per example; and the top-k intersection
  ``|topk(orig) ∩ topk(pert)| / k`` on the aligned tokens by absolute attribution (``k`` =
  ``top_k``, at most the number of aligned tokens). Ghorbani, Abid & Zou 2019 ("Interpretation
  of neural networks is fragile") use exactly these two; see also Alvarez-Melis & Jaakkola 2018
  and Yeh et al. 2019. Examples with fewer than two aligned tokens are left out (weight 0).
  ``stability/cosine``: the cosine between the two attribution vectors on the aligned tokens
  (``faithful_train.functional.attribution.aligned_cosine``, what the ``stability`` objective trains),
  which weighs tokens by their attribution where Spearman weighs every rank swap alike (among
  tokens of equal importance a rank swap is a coin flip, and Spearman counts it in full).
- ``randomisation/top{n}`` for n = 1..S and ``randomisation/spearman`` (= stage S): cascading
  model randomisation (Adebayo et al. 2018, "Sanity checks for saliency maps"): Spearman between
  the trained model's ``|attribution|`` per token and that of a copy whose layers are
  re-initialised from the top down, cumulatively: stage 1 the head (final norm and unembedding),
  stage n the head and the last n - 1 blocks, stage S = n_blocks + 1 every block and the
  embeddings too. LOW is healthy (the attribution depends on what the model learned); near 1
  means the method would draw the same map for an untrained model. The copies are built once
  per ``evaluate`` from one fresh, seeded initialisation (seed: the audit's seed + 2; our
  ``Transformer``: its own constructor's init; other models: ``randomly_initialised``, i.e.
  ``init_weights`` or every module's ``reset_parameters``), so all ranks agree. Stages
  (``cascade_stages``): the blocks are ``modeling.interface.block_list`` (ours, or an adapter's decoder layers); the
  parameterised modules outside them are the head, except ``nn.Embedding``s, which go with the
  last stage. With tied embeddings the token embedding is re-drawn with the unembedding (stage
  1). A model without a block list gets one stage, everything re-initialised. Modules without
  ``reset_parameters`` in a non-``Transformer`` model (e.g. Hugging Face RMSNorm gains) keep
  their trained values.
- ``eraser/comprehensiveness``, ``eraser/sufficiency`` (DeYoung et al. 2020, ERASER; averaged
  over ``eraser_fractions`` like an AOPC, Samek et al. 2017): ``p(y|x) - p(y|x without its top
  tokens)`` and ``p(y|x) - p(y|only its top tokens kept)``. The top tokens are the
  ``ceil(fraction * T)`` with the highest SIGNED attribution (most evidence for ``y``; ties:
  the earlier position first), over all T positions. ``p`` is the softmax over the whole
  vocabulary at the last position (the model's own probability of the answer token). High
  comprehensiveness and low sufficiency are the faithful side.
- ``calibration``: Spearman, per example over the T positions, between each token's attribution
  and the actual effect of removing that token alone, ``f(x) - f(x without t)`` with the same
  ``output`` as the attribution (the "faithfulness" of Alvarez-Melis & Jaakkola 2018; Bhatt et
  al. 2020's faithfulness correlation with single-token subsets). 1: the attribution ranks
  tokens exactly as their removal does.

Cost per chunk of ``batch_size`` examples: one attribution call on the chunk and its
perturbations (``2 * batch_size * steps`` rows), one per cascade stage, and one forward of
``(1 + 2 * len(eraser_fractions) + T) * batch_size`` rows for every removal.

Rank correlations use average ranks for ties (``spearman``), and are 0 on a row where either
side is constant or fewer than two entries count (no order to agree on).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from faithful_train.audits.base import Audit
from faithful_train.errors import ConfigError, UnknownNameError
from faithful_train.functional.attribution import (
    METHODS,
    QUADRATURES,
    Attribution,
    aligned_attributions,
    aligned_cosine,
    attribute_tokens,
)
from faithful_train.functional.interchange import answer_predictions
from faithful_train.functional.ranking import spearman, top_k_members
from faithful_train.intervene.engine import run_variants
from faithful_train.intervene.sites import resolve_site
from faithful_train.modeling.randomise import cascade_stages, cascading_randomisation
from faithful_train.tasks.base import Batch, Task
from faithful_train.tasks.batch import (
    answer_position,
    answer_positions,
    as_variant,
    first_answer_logits,
    pad_columns,
    prefixed,
    stack_rows,
    unprefixed,
)

OUTPUTS: tuple[str, ...] = ("logit", "logprob")
SITE = "embed"
PERTURBED, SOURCE = "attribution.perturbed", "attribution.source"

AttributeFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


# --- pure helpers ---


def irrelevant_share(attr: Tensor, irrelevant: Tensor) -> Tensor:
    """Per example, the share of the attribution's absolute mass on the tokens marked
    irrelevant: ``Σ_t |a_t| · irrelevant_t / Σ_t |a_t|`` (0 where all attributions are 0)."""
    mass = attr.abs()
    total = mass.sum(1)
    return torch.where(total > 0, (mass * irrelevant).sum(1) / total.clamp_min(1e-30), torch.zeros_like(total))


def stability_figures(attr: Tensor, attr_perturbed: Tensor, source: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per example ``(spearman, top-k overlap, weight)`` between the attributions of the
    aligned tokens (signed for Spearman, absolute for top-k; ``k`` at most the number aligned);
    weight 0 where fewer than two tokens are aligned."""
    original, perturbed, aligned = aligned_attributions(attr, attr_perturbed, source)
    n = aligned.sum(1)
    rho = spearman(original, perturbed, aligned)
    k_row = n.clamp(max=k)
    overlap = (top_k_members(original.abs(), k_row, aligned) & top_k_members(perturbed.abs(), k_row, aligned)).sum(1)
    return rho, overlap.double() / k_row.clamp_min(1), (n >= 2).double()


def randomisation_correlation(
    attribute: AttributeFn,
    model: nn.Module,
    randomised: Sequence[nn.Module],
    input_ids: Tensor,
    target: Tensor,
    reference: Tensor | None = None,
) -> Tensor:
    """``(len(randomised), B)``: per example, Spearman between ``|attribute(model, ids, target)|``
    (or ``|reference|``, if given) and ``|attribute(r, ids, target)|`` for each randomised copy
    ``r``. An attribution that does not depend on the weights scores 1 at every stage."""
    trained = (attribute(model, input_ids, target) if reference is None else reference).abs()
    rows = [spearman(trained, attribute(r, input_ids, target).abs()) for r in randomised]
    return torch.stack(rows) if rows else torch.zeros(0, input_ids.shape[0], dtype=torch.float64)


def completeness_error(result: Attribution) -> Tensor:
    """Per example ``|delta| / (|f(x) - f(b)| + 1e-6)``: the share of the output change the
    attributions fail to account for (0 when complete)."""
    return result.delta.abs() / ((result.output - result.baseline_output).abs() + 1e-6)


def removal_logits(model: nn.Module, batch: Batch, keep: Tensor) -> Tensor:
    """Answer-position logits ``(V, B, vocab)`` of ``V`` variants of the batch, variant ``v``
    with the ``embed`` activation of the positions where ``keep[v]`` ``(B, T)`` is False set to
    zero (the baseline), in one forward over the ``V * B`` stacked rows."""
    V, B, T = keep.shape

    def erase(x: Tensor, variants: range) -> Tensor:
        k = keep[variants.start : variants.stop].reshape(len(variants) * B, T, *([1] * (x.dim() - 2)))
        return torch.where(k, x, torch.zeros((), dtype=x.dtype, device=x.device))

    logits = first_answer_logits(run_variants(model, batch, V, {SITE: erase}, read=answer_positions(batch)[:, :1]))
    return logits.reshape(V, B, -1)


def score(logits: Tensor, target: Tensor, output: str) -> Tensor:
    """``(..., B, vocab)`` -> ``(..., B)``: the logit or log-probability of ``target (B,)``."""
    if output == "logprob":
        logits = logits.log_softmax(-1)
    return logits.gather(-1, target.expand(logits.shape[:-1]).unsqueeze(-1)).squeeze(-1)


def top_count(fraction: float, length: int) -> int:
    """``ceil(fraction * length)`` (guarded against float fuzz: 0.3 * 10 is 3), in [1, length]."""
    return min(length, max(1, math.ceil(fraction * length - 1e-9)))


# --- the audit ---


class AttributionAudit(Audit):
    name = "attribution"

    def __init__(
        self,
        method: str = "integrated_gradients",
        steps: int = 32,
        quadrature: str = "gausslegendre",
        output: str = "logit",
        top_k: int = 2,
        eraser_fractions: Sequence[float] = (0.1, 0.2, 0.5),
        stability: bool = True,
        randomisation: bool = True,
        calibration: bool = True,
        max_completeness_error: float | None = 0.05,
        max_steps: int = 512,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if method not in METHODS:
            raise UnknownNameError("attribution method", method, METHODS)
        if output not in OUTPUTS:
            raise UnknownNameError("attribution output", output, OUTPUTS)
        if quadrature not in QUADRATURES:
            raise UnknownNameError("quadrature", quadrature, QUADRATURES)
        fractions = tuple(float(f) for f in eraser_fractions)
        if steps < 1 or top_k < 1 or not all(0 < f <= 1 for f in fractions):
            raise ConfigError(
                f"audit {self.label!r}: steps >= 1, top_k >= 1 and eraser_fractions in (0, 1] required, "
                f"got {steps}, {top_k}, {list(fractions)}"
            )
        if max_completeness_error is not None and not max_completeness_error > 0 or max_steps < steps:
            raise ConfigError(
                f"audit {self.label!r}: max_completeness_error > 0 (or null) and max_steps >= steps required, "
                f"got {max_completeness_error}, {max_steps}"
            )
        self.method, self.steps, self.quadrature, self.output = method, int(steps), quadrature, output
        self.max_completeness_error, self.max_steps = max_completeness_error, int(max_steps)
        self.top_k, self.eraser_fractions = int(top_k), fractions
        self.stability, self.randomisation, self.calibration = stability, randomisation, calibration
        self.n_stages = 0  # cascade stages, set by bind
        self._randomised: list[nn.Module] | None = None

    def bind(self, model: nn.Module, task: Task, run_seed: int = 0) -> None:
        resolve_site(model, SITE)  # an UnknownNameError listing the model's sites
        self.n_stages = len(cascade_stages(model)) if self.randomisation else 0
        super().bind(model, task, run_seed)

    def _stability_on(self, task: Task) -> bool:
        return self.stability and "aligned_perturbations" in task.provides

    @property
    def adaptive(self) -> bool:
        """Integrated gradients with a completeness tolerance: points are added until it holds."""
        return self.method == "integrated_gradients" and self.max_completeness_error is not None

    def metric_names(self, task: Task) -> list[str]:
        names = ["task_acc", "completeness_error"]
        if self.adaptive:
            names += ["trusted", "steps"]
        if "irrelevant" in task.provides:
            names.append("irrelevant_share")
        if self._stability_on(task):
            names += ["stability/spearman", "stability/topk", "stability/cosine"]
        if self.randomisation:
            names += ["randomisation/spearman", *(f"randomisation/top{n}" for n in range(1, self.n_stages + 1))]
        if self.eraser_fractions:
            names += ["eraser/comprehensiveness", "eraser/sufficiency"]
        if self.calibration:
            names.append("calibration")
        return names

    def build_data(self, task: Task, seed: int) -> Batch:
        data = task.sample(self.n_examples, seed)
        if self.stability:
            perturbed = task.perturb_aligned(data, torch.Generator().manual_seed(seed + 1))
            if perturbed is not None:
                variant, data[SOURCE] = perturbed
                data |= {PERTURBED: variant} if isinstance(variant, Tensor) else prefixed(variant, PERTURBED)
        return data

    def attribute(self, model: nn.Module, rows: Batch, target: Tensor, steps: int | None = None) -> Attribution:
        """Per-token attribution of ``model`` on a batch's rows (the audit's method and output)."""
        return attribute_tokens(
            model,
            rows["input_ids"],
            target,
            self.method,
            SITE,
            "zeros",
            steps or self.steps,
            self.quadrature,
            attention_mask=rows.get("attention_mask"),
            output=self.output,
            positions=answer_position(rows),
        )

    def attribute_within_tolerance(self, model: nn.Module, rows: Batch, target: Tensor) -> tuple[Attribution, Tensor]:
        """``attribute`` with as many integration points as completeness needs: while the rows'
        mean ``completeness_error`` exceeds ``max_completeness_error``, the rows above it are
        attributed again with twice the points, up to ``max_steps``. Returns the attribution
        and the points each row used ``(N,)``."""
        result = self.attribute(model, rows, target)
        used = torch.full_like(target, self.steps)
        if not self.adaptive:
            return result, used
        steps, tolerance = self.steps, self.max_completeness_error
        error = completeness_error(result)
        while float(error.mean()) > tolerance and steps < self.max_steps:
            steps = min(2 * steps, self.max_steps)
            redo = error > tolerance
            again = self.attribute(model, {k: v[redo] for k, v in rows.items()}, target[redo], steps)
            for name in ("values", "delta", "output", "baseline_output", "features"):
                getattr(result, name)[redo] = getattr(again, name)
            used[redo] = steps
            error = completeness_error(result)
        return result, used

    def randomised_models(self, model: nn.Module) -> list[nn.Module]:
        """The cascade's copies of ``model`` (seeded by the audit's seed + 2)."""
        return cascading_randomisation(model, (self.seed if self.seed is not None else 1_000_003) + 2)

    def evaluate(self, model: nn.Module, task: Task, rank: int = 0, world_size: int = 1) -> dict[str, float]:
        self._randomised = self.randomised_models(model) if self.randomisation else None
        try:
            results = super().evaluate(model, task, rank, world_size)
        finally:
            self._randomised = None
        if self.adaptive:  # 1: the attributions account for the output change they explain
            results["trusted"] = float(results["completeness_error"] <= self.max_completeness_error)
        return dict(sorted(results.items()))

    def warnings(self) -> list[str]:
        if not self.adaptive or self.latest.get("trusted", 1.0) == 1.0:
            return []
        return [
            f"audit/{self.label}: integrated gradients miss {self.latest['completeness_error']:.3g} of the output "
            f"change they explain (tolerance {self.max_completeness_error:g}, up to {self.max_steps} points): "
            "its figures are not trusted"
        ]

    def measure(self, model: nn.Module, task: Task, batch: Batch) -> dict[str, Any]:
        labels = batch["labels"]
        B = labels.shape[0]
        stable = self.stability and (PERTURBED in batch or any(k.startswith(PERTURBED + "/") for k in batch))
        parts = [batch]
        if stable:
            parts.append(as_variant(batch, batch[PERTURBED] if PERTURBED in batch else unprefixed(batch, PERTURBED)))
        rows = stack_rows(parts)
        T = rows["input_ids"].shape[1]
        clean = {k: v[:B] for k, v in rows.items()}
        real = clean.get("attention_mask", torch.ones_like(clean["input_ids"])).bool()
        result, used = self.attribute_within_tolerance(model, rows, labels.repeat(len(parts)))
        attr = result.values[:B].detach()
        out: dict[str, Any] = {"completeness_error": completeness_error(result)[:B]}
        if self.adaptive:
            out["steps"] = used[:B].double()
        if "irrelevant" in batch:
            out["irrelevant_share"] = irrelevant_share(attr, pad_columns(batch["irrelevant"], T, False))
        if stable:
            perturbed = result.values[B:].detach()
            source = pad_columns(batch[SOURCE], T, -1)
            rho, overlap, weight = stability_figures(attr, perturbed, source, self.top_k)
            out["stability/spearman"], out["stability/topk"] = (rho, weight), (overlap, weight)
            out["stability/cosine"] = (aligned_cosine(attr, perturbed, source).double(), weight)
        if self.randomisation:
            randomised = self._randomised if self._randomised is not None else self.randomised_models(model)

            def values(m, x, y):
                return self.attribute(m, x, y).values

            rhos = randomisation_correlation(values, model, randomised, clean, labels, attr)
            out |= {f"randomisation/top{n + 1}": rho for n, rho in enumerate(rhos)}
            out["randomisation/spearman"] = rhos[-1]
        # every removal in one forward: the clean batch, each fraction's top tokens removed and
        # kept, each single token removed (real tokens only: padding is never a candidate)
        n_real = real.sum(1)
        keep = [torch.ones(1, B, T, dtype=torch.bool, device=labels.device)]
        for fraction in self.eraser_fractions:
            counts = torch.clamp(torch.ceil(fraction * n_real - 1e-9), min=1).minimum(n_real).long()
            top = top_k_members(attr, counts, real)
            keep += [~top[None], (top | ~real)[None]]
        if self.calibration:
            keep.append(~torch.eye(T, dtype=torch.bool, device=labels.device)[:, None, :].expand(T, B, T))
        logits = removal_logits(model, clean, torch.cat(keep))
        out["task_acc"] = (answer_predictions(logits[0], task) == labels).float()
        F = len(self.eraser_fractions)
        if F:
            p = logits[: 1 + 2 * F].float().softmax(-1).gather(-1, labels.expand(1 + 2 * F, B)[..., None]).squeeze(-1)
            out["eraser/comprehensiveness"] = (p[0] - p[1::2]).mean(0)
            out["eraser/sufficiency"] = (p[0] - p[2::2]).mean(0)
        if self.calibration:
            scores = score(logits[[0, *range(1 + 2 * F, 1 + 2 * F + T)]], labels, self.output)
            effect = (scores[0] - scores[1:]).T  # (B, T): f(x) - f(x without t)
            out["calibration"] = spearman(attr, effect, real)
        return {k: (v[0].float(), v[1]) if isinstance(v, tuple) else v.float() for k, v in out.items()}
