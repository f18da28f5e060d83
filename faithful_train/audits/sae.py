"""The ``sae`` audit: how well an SAE at a site describes the model, on a fixed held-out set.

    audits:
      - name: sae
        sae: sae                 # the label of the run's sae objective (read live), or
        # path: saes/sae         # a folder in SAELens's layout (relative to the run dir), with
        # site: blocks.1.resid_post   # the site it reads

Figures (over the real tokens of the audit set):

- ``fvu``: ``sum((x - x_hat)^2) / sum((x - mean(x))^2)`` over the whole set (its real tokens,
  or the positions the objective trains on);
- ``l0``: active latents per token; ``dead``: the share of latents never active on the set;
- ``ce_recovered``: with the SAE's reconstruction spliced in at the site (every token),
  ``(CE_zero - CE_sae) / (CE_zero - CE_clean)`` on the answer, against zero-ablating the site
  (SAELens's ``ce_loss_score``); ``kl_recovered``: ``1 - KL(p_clean || p_sae) / KL(p_clean ||
  p_zero)`` on the answer's distribution; ``ce_clean``, ``ce_sae``, ``ce_zero`` too.

The spliced and the zero-ablated forwards run as two variants of one engine call. A
transcoder (an objective with ``target``) reports ``fvu`` against its target and no splice.

Transcoders on several layers (an objective with ``layers``) report ``fvu/layer<i>``,
``l0/layer<i>``, ``dead/layer<i>`` and ``ce_recovered/layer<i>`` (that layer's MLP output
replaced by its transcoder's reconstruction, against zero-ablating that MLP), and ``fvu``,
``l0``, ``dead`` as means over the layers; ``ce_recovered`` and ``kl_recovered`` replace
*every* MLP at once (each transcoder reading the MLP input of that same forward: the
replacement model without error terms), against zero-ablating every MLP. All of them are
variants of one engine call.

Alignment with the task's variables and concepts (``variables: {name: positions}``, where the
latents are read; ``faithful_train.functional.latents``), measured on a seeded selection set of its own:

- ``auroc/<v>/<value>``: the best latent's AUROC for telling that value from the rest (either
  sign: a latent silent for exactly that value tells it too, as a one-latent probe does);
  ``auroc/<v>`` their mean over the values;
- ``latent_iia/<v>`` (task variables): interchange intervention accuracy when only the
  ``max_latents`` latents most aligned with ``v`` are swapped from a source input at ``v``'s
  positions of ``<site>.sae`` (the rest of the site, reconstruction error included, kept):
  the variable is *carried* by those few latents if the model then answers as the causal model
  says (Geiger et al. 2021; latents as the featurizer, Huang et al. 2024, RAVEL);
- with ``ladder: true``, ``latent_iia/<v>/top<n>`` for n = 1, 2, 4, ... up to every latent, and
  ``latents_needed/<v>``: the fewest of those that reach ``iia_bar`` (``inf``: none does).
- ``select: iia`` chooses the ``max_latents`` by what swapping them does rather than by AUROC:
  greedy forward selection on the selection set (``latents.greedy_selection``), among the
  ``candidates`` (default 32; ``null``: every latent) first in the AUROC ranking, which also
  orders the rest of the ladder. A latent can track a variable the answer never reads (AUROC
  picks it, the swap does not); conjunction latents (one per combination of two variables)
  carry neither alone, and no choice can fix that.

Every swap (variables x ladder) is one variant of the same engine call, resumed at the site.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from faithful_train.audits.base import Audit, Total
from faithful_train.errors import ConfigError, UnknownNameError
from faithful_train.functional.interchange import (
    SOURCE,
    Swap,
    check_positions,
    counterfactual_targets,
    interchange_hits,
    paired_rows,
    swap_forward,
    swap_positions,
    teacher_forced,
)
from faithful_train.functional.latents import (
    alignment_ranking,
    check_labelled,
    greedy_selection,
    label_values,
    latent_scores,
    one_hot_basis,
    read_scores,
    value_aurocs,
)
from faithful_train.intervene.engine import plan_resume, run_variants
from faithful_train.intervene.sae import SparseAutoencoder, attach_sae, load_saelens, site_rows, site_width, token_rows
from faithful_train.intervene.sites import SiteRef, run_with, validate_sites
from faithful_train.intervene.transcoders import Transcoders, spliced
from faithful_train.modeling.interface import n_layers
from faithful_train.tasks.base import Batch, Task
from faithful_train.tasks.batch import answer_positions, first_answer_logits, gather_positions, tile

SELECTIONS = ("auroc", "iia")


class SaeAudit(Audit):
    name = "sae"

    def __init__(
        self,
        sae: str | None = None,
        path: str | None = None,
        site: str | None = None,
        variables: dict[str, Any] | None = None,
        max_latents: int = 4,
        ladder: bool = False,
        iia_bar: float = 0.9,
        select: str = "auroc",
        candidates: int | None = 32,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if (sae is None) == (path is None):
            raise ConfigError(
                f"audit {self.label!r}: give sae (an sae objective's label) or path (an SAE folder), one of them"
            )
        if path is not None and site is None:
            raise ConfigError(f"audit {self.label!r}: an SAE read from a folder needs the site it reads (site: ...)")
        if max_latents < 1 or not 0 < iia_bar <= 1:
            raise ConfigError(
                f"audit {self.label!r}: max_latents >= 1 and 0 < iia_bar <= 1 required, got {max_latents}, {iia_bar}"
            )
        if select not in SELECTIONS:
            raise UnknownNameError(f"audit {self.label!r} select", select, SELECTIONS)
        if candidates is not None and candidates < 1:
            raise ConfigError(
                f"audit {self.label!r}: candidates must be >= 1 (or null: every latent), got {candidates}"
            )
        self.select, self.candidates = select, candidates
        self.objective_label, self.path, self.site = sae, path, site
        # where each variable's latents are read: positions of <site>.sae (the name is filled in on attach)
        self.variables = {
            str(v): SiteRef.parse({"site": "", **_positions(spec, f"audit {self.label!r} variables.{v}")})
            for v, spec in (variables or {}).items()
        }
        self.max_latents, self.ladder, self.iia_bar = int(max_latents), bool(ladder), float(iia_bar)
        self.target: str | None = None
        self.sae_module: SparseAutoencoder | None = None
        self.transcoders: Transcoders | None = None
        self._depth = 0
        self._run_dir: Path | None = None
        self._task_variables: tuple[str, ...] = ()
        self._chosen: dict[str, Tensor] = {}  # each variable's latents, most aligned first
        self._alignment: dict[str, float] = {}

    def metric_names(self, task: Task) -> list[str]:
        names = ["fvu", "l0", "dead", "ce_recovered", "kl_recovered", "ce_clean", "ce_sae", "ce_zero"]
        for i in range(self._depth):  # transcoders on several layers (known once attached)
            names += [f"{k}/layer{i}" for k in ("fvu", "l0", "dead", "ce_recovered")]
        for v in self.variables:
            names.append(f"auroc/{v}")
            if v in task.variables:
                names += [f"latent_iia/{v}"] + ([f"latents_needed/{v}"] if self.ladder else [])
        return names

    def bind(self, model: nn.Module, task: Task, run_seed: int = 0) -> None:
        self._depth = n_layers(model) or 0
        if self.site is not None:
            validate_sites(model, [self.site])
            self._width = site_width(model, task, self.site)
        for v, ref in self.variables.items():
            check_labelled(task, v, f"audit {self.label!r}")
            check_positions(replace(ref, name=f"variables.{v}"), task)
        super().bind(model, task, run_seed)

    def attach(self, pl_module: Any) -> None:
        if self.objective_label is not None:
            module = (
                pl_module.objective_modules[self.objective_label]
                if self.objective_label in pl_module.objective_modules
                else None
            )
            if isinstance(module, Transcoders):
                if self.variables:
                    raise ConfigError(
                        f"audit {self.label!r}: latent alignment needs an SAE of one site, not transcoders"
                    )
                self.transcoders = module
                return
            if not isinstance(module, SparseAutoencoder):
                names = sorted(
                    k for k, m in pl_module.objective_modules.items() if isinstance(m, (SparseAutoencoder, Transcoders))
                )
                raise ConfigError(
                    f"audit {self.label!r}: no sae objective labelled {self.objective_label!r}; sae objectives: "
                    f"{names or 'none'}"
                )
            self.sae_module, self.site, self.target = module, module.site, module.target
        elif self.sae_module is None:
            folder = Path(self.path)
            if not folder.exists() and self._run_dir is not None:
                folder = self._run_dir / folder
            self.sae_module, _ = load_saelens(folder, self._width, where=f"audit {self.label!r} path")
            self.sae_module.to(next(pl_module.model.parameters()).device)
        if self.variables:
            if self.target is not None:
                raise ConfigError(f"audit {self.label!r}: latent alignment needs an SAE of its site, not a transcoder")
            name = attach_sae(pl_module.model, self.site, self.sae_module, f"audit {self.label!r}")
            self.variables = {v: replace(ref, name=name) for v, ref in self.variables.items()}

    @property
    def iia_variables(self) -> list[str]:
        return [v for v in self.variables if v in self._task_variables]

    def build_data(self, task: Task, seed: int) -> Batch:
        self._task_variables = tuple(task.variables)
        base = task.sample(self.n_examples, seed)
        if not self.iia_variables:
            return base
        return base | {SOURCE + k: v for k, v in task.sample(self.n_examples, seed + 1).items()}

    def evaluate(self, model: nn.Module, task: Task, rank: int = 0, world_size: int = 1) -> dict[str, float]:
        """The latents most aligned with each variable are chosen first, on the selection set
        (whole on every rank, so every rank swaps the same latents); then the audit set."""
        self.data(task)
        if self.variables:
            self._align(model, task)
        results = super().evaluate(model, task, rank, world_size) | self._alignment
        if self.transcoders is not None:
            results = self.evaluate_layers_l0(results)
        for v in self.iia_variables if self.ladder else ():
            reached = [n for n in self._ladder() if results[f"latent_iia/{v}/top{n}"] >= self.iia_bar]
            results[f"latents_needed/{v}"] = float(min(reached)) if reached else math.inf
        return dict(sorted(results.items()))

    @property
    def _top(self) -> int:
        """How many latents ``latent_iia/<v>`` swaps: ``max_latents``, or every latent if fewer."""
        return min(self.max_latents, self.sae_module.n_latents)

    def _ladder(self) -> list[int]:
        width = self.sae_module.n_latents
        counts = {self._top} | ({min(2**i, width) for i in range(width.bit_length() + 1)} if self.ladder else set())
        return sorted(counts)

    def _align(self, model: nn.Module, task: Task) -> None:
        selection = task.sample(
            self.n_examples, int(self.seed) + 3
        )  # its own seed: chosen on other examples than measured
        device = next(model.parameters()).device
        selection = {k: v.to(device) for k, v in selection.items()}
        causal = self.select == "iia" and bool(self.iia_variables)
        was_training, sae_training = model.training, self.sae_module.training
        model.eval(), self.sae_module.eval()
        try:
            if causal:  # base and source rows in one forward per chunk: the scores and every swap read it
                chunks = self._selection_forwards(model, task, selection)
                scores = {
                    v: torch.cat([latent_scores(cache[ref.name].float(), ref, base) for base, _, _, cache in chunks])
                    for v, ref in self.variables.items()
                }
            else:
                scores = read_scores(model, self.variables, selection, self.batch_size)
            figures: dict[str, float] = {}
            for v, score in scores.items():
                values = label_values(selection, v)
                aurocs = value_aurocs(score, values)
                names = task.concepts.get(v) if v not in task.variables else None
                # either sign, as a 1-d probe
                best = {c: float(torch.maximum(a, 1 - a).max()) for c, a in aurocs.items()}
                for c, value in best.items():
                    figures[f"auroc/{v}/{names[c] if names else c}"] = value
                figures[f"auroc/{v}"] = sum(best.values()) / max(len(best), 1)
                self._chosen[v] = alignment_ranking(aurocs, score, values)[0]
            if causal:
                self._select_causally(model, task, chunks, selection["input_ids"].shape[0])
        finally:
            model.train(was_training), self.sae_module.train(sae_training)
        self._alignment = figures

    @torch.no_grad()
    def _selection_forwards(self, model: nn.Module, task: Task, selection: Batch) -> list[tuple]:
        """The selection set paired with sources of their own seed: ``(base rows, paired rows,
        source activations, base cache)`` per chunk of ``batch_size`` rows."""
        device = selection["input_ids"].device
        sources = task.sample(self.n_examples, int(self.seed) + 4)
        rows = selection | {SOURCE + k: v.to(device) for k, v in sources.items()}
        n = rows["input_ids"].shape[0]
        return [
            self._paired_forward(model, task, {k: t[i : i + self.batch_size] for k, t in rows.items()})[:4]
            for i in range(0, n, self.batch_size)
        ]

    @torch.no_grad()
    def _select_causally(self, model: nn.Module, task: Task, chunks: list[tuple], n: int) -> None:
        """``select: iia``: each variable's first ``max_latents`` latents chosen by greedy forward
        selection on the selection set's ``n`` pairs (``chunks``, ``_selection_forwards``): the
        latent whose swap, with those already chosen, gives the highest IIA
        (``latents.greedy_selection``); the AUROC ranking orders the candidates and the rest of
        the ladder."""
        for v in self.iia_variables:

            def accuracy(sets: list[Tensor], v: str = v) -> Tensor:
                hits = torch.zeros(len(sets))
                for chunk in chunks:
                    step = max(1, 16384 // chunk[0]["input_ids"].shape[0])  # variants per engine call
                    for i in range(0, len(sets), step):
                        found = self._swap_hits(model, task, *chunk, [(v, s) for s in sets[i : i + step]])
                        hits[i : i + len(found)] += torch.stack([h.sum() for h in found]).cpu()
                return hits / n

            self._chosen[v] = greedy_selection(self._chosen[v], self._top, accuracy, self.candidates)[0]

    def _paired_forward(
        self, model: nn.Module, task: Task, batch: Batch
    ) -> tuple[Batch, Any, dict, dict[str, Tensor], Tensor]:
        """``(base rows, paired rows, each variable's source activations, base cache, base
        logits)``: base and source rows in one recording forward, the swaps' starting point."""
        variables = self.iia_variables
        paired = paired_rows(task, batch, variables)
        sites = [self.site, next(iter(self.variables.values())).name]
        plan = plan_resume(model, sites)
        stacked = paired.stacked
        logits, cache = run_with(
            model,
            stacked["input_ids"],
            record=sites + ([plan.site] if plan else []),
            attention_mask=stacked.get("attention_mask"),
        )
        B = paired.base["input_ids"].shape[0]
        sources = {v: paired.rows(cache, v) for v in variables}
        return paired.base, paired, sources, {k: a[:B] for k, a in cache.items()}, logits[:B]

    def use_hypotheses(self, files: Any) -> None:
        self._run_dir = files.run_dir

    def measure(self, model: nn.Module, task: Task, batch: Batch) -> dict[str, Any]:
        if self.transcoders is not None:
            was_training = self.transcoders.training
            self.transcoders.eval()
            try:
                return self._measure_layers(model, batch, self.transcoders)
            finally:
                self.transcoders.train(was_training)
        sae = self.sae_module
        was_training = sae.training
        sae.eval()
        try:
            return self._measure(model, task, batch, sae)
        finally:
            sae.train(was_training)

    def _measure(self, model: nn.Module, task: Task, batch: Batch, sae: SparseAutoencoder) -> dict[str, Any]:
        paired = None
        if self.iia_variables:  # the splice and the swaps resume from this forward's activations
            batch, paired, sources, cache, logits = self._paired_forward(model, task, batch)
        else:
            sites = [self.site] + ([self.target] if self.target else [])
            plan = plan_resume(model, sites)
            logits, cache = run_with(
                model,
                batch["input_ids"],
                record=sites + ([plan.site] if plan else []),
                attention_mask=batch.get("attention_mask"),
            )
        ids = batch["input_ids"]
        rows = token_rows(batch, getattr(sae, "rows_at", None))  # the tokens the SAE reads (and is spliced in at)
        x = site_rows(cache[self.site], rows).float()
        y = site_rows(cache[self.target], rows).float() if self.target else x
        out = sae(x, y)
        totals = {
            "sse": (y - out.reconstruction).pow(2).sum(),
            "sum": y.sum(0),
            "sum_sq": y.pow(2).sum(0),
            "rows": torch.tensor(float(y.shape[0])),
            "fired": (out.latents > 0).sum(0).float(),
        }
        values: dict[str, Any] = {
            "l0": ((out.latents > 0).float().sum(-1).mean()[None], torch.tensor([float(y.shape[0])], device=y.device))
        }
        if self.target is None:
            clean_values = cache[self.site]
            recon = torch.zeros_like(clean_values, dtype=out.reconstruction.dtype)
            if rows is None:
                recon = out.reconstruction.view(clean_values.shape)
            else:
                recon[rows] = out.reconstruction
                recon = torch.where(rows[..., None], recon, clean_values.float())
            recon = recon.to(clean_values.dtype)

            def splice(t: Tensor, variants: range) -> Tensor:  # variant 0: the SAE's reconstruction; 1: zeros
                return torch.cat([recon if v == 0 else torch.zeros_like(recon) for v in variants]).view_as(t)

            varied = first_answer_logits(run_variants(model, batch, 2, {self.site: splice}, cache=cache)).float()
            clean = first_answer_logits(gather_positions(logits, answer_positions(batch))).float()
            B = ids.shape[0]
            labels = batch["labels"]
            logp = clean.log_softmax(-1)
            spliced, zeroed = varied[:B].log_softmax(-1), varied[B:].log_softmax(-1)

            def ce(lp: Tensor) -> Tensor:
                return -lp.gather(1, labels[:, None]).sum()

            def kl(lp: Tensor) -> Tensor:
                return (logp.exp() * (logp - lp)).sum()

            totals |= {
                "ce_clean": ce(logp),
                "ce_sae": ce(spliced),
                "ce_zero": ce(zeroed),
                "kl_sae": kl(spliced),
                "kl_zero": kl(zeroed),
                "examples": torch.tensor(float(B)),
            }
        if paired:
            values |= self._latent_iia(model, task, batch, paired, sources, cache)
        return values | {k: Total(v.detach().double()) for k, v in totals.items()}

    def _measure_layers(self, model: nn.Module, batch: Batch, transcoders: Transcoders) -> dict[str, Any]:
        """Per layer: the fit's sums and CE with that MLP replaced / zeroed; then every MLP
        replaced / zeroed at once. Variants: ``2 L + 2`` of one engine call."""
        pairs = [(i, sae, sae.site, sae.target) for i, sae in transcoders.items_by_layer()]
        sites = [name for _, _, site, target in pairs for name in (site, target)]
        logits, cache = run_with(model, batch["input_ids"], record=sites, attention_mask=batch.get("attention_mask"))
        rows = token_rows(batch, None)
        totals: dict[str, Tensor] = {}
        values: dict[str, Any] = {}
        for i, sae, site, target in pairs:
            x, y = site_rows(cache[site], rows).float(), site_rows(cache[target], rows).float()
            out = sae(x, y)
            totals |= {
                f"sse/layer{i}": (y - out.reconstruction).pow(2).sum(),
                f"sum/layer{i}": y.sum(0),
                f"sum_sq/layer{i}": y.pow(2).sum(0),
                f"fired/layer{i}": (out.latents > 0).sum(0).float(),
            }
            totals["rows"] = torch.tensor(float(y.shape[0]), device=y.device)
            values[f"l0/layer{i}"] = (
                (out.latents > 0).float().sum(-1).mean()[None],
                torch.tensor([float(y.shape[0])], device=y.device),
            )
        layers = [i for i, *_ in pairs]
        replaced = [[i] for i in layers] + [layers]
        edits = spliced(transcoders, replaced + [[] for _ in replaced])
        n = len(replaced)

        def zero(t: Tensor, variants: range, layer: int) -> Tensor:
            rows_ = t.view(len(variants), -1, *t.shape[1:])
            keep = torch.tensor([not (v >= n and layer in replaced[v - n]) for v in variants], device=t.device)
            return (rows_ * keep.view(-1, *([1] * (rows_.dim() - 1))).to(t.dtype)).view_as(t)

        for layer in layers:
            edits[f"blocks.{layer}.mlp.out"].append(lambda t, variants, layer=layer: zero(t, variants, layer))
        varied = first_answer_logits(run_variants(model, batch, 2 * n, edits)).float()
        clean = first_answer_logits(gather_positions(logits, answer_positions(batch))).float()
        B, labels = batch["input_ids"].shape[0], batch["labels"]
        logp = clean.log_softmax(-1)

        def ce(lp: Tensor) -> Tensor:
            return -lp.gather(1, labels[:, None]).sum()

        def kl(lp: Tensor) -> Tensor:
            return (logp.exp() * (logp - lp)).sum()

        totals |= {"ce_clean": ce(logp), "examples": torch.tensor(float(B), device=logp.device)}
        for v, chosen in enumerate(replaced):
            key = f"layer{chosen[0]}" if len(replaced) > 1 and v < n - 1 else "all"
            spliced_lp = varied[v * B : (v + 1) * B].log_softmax(-1)
            zeroed_lp = varied[(n + v) * B : (n + v + 1) * B].log_softmax(-1)
            totals |= {f"ce_sae/{key}": ce(spliced_lp), f"ce_zero/{key}": ce(zeroed_lp)}
            if key == "all":
                totals |= {"kl_sae": kl(spliced_lp), "kl_zero": kl(zeroed_lp)}
        return values | {k: Total(v.detach().double()) for k, v in totals.items()}

    def _summarise_layers(self, totals: dict[str, Tensor]) -> dict[str, float]:
        rows, n = float(totals["rows"]), float(totals["examples"])
        clean = float(totals["ce_clean"]) / n
        out: dict[str, float] = {"ce_clean": clean}

        def recovered(zero: float, spliced_: float) -> float:
            return (zero - spliced_) / (zero - clean) if abs(zero - clean) > 1e-12 else float("nan")

        for layer in self.transcoders.layers:
            variance = (totals[f"sum_sq/layer{layer}"] - totals[f"sum/layer{layer}"].pow(2) / rows).sum()
            out[f"fvu/layer{layer}"] = float(totals[f"sse/layer{layer}"] / variance.clamp_min(1e-12))
            out[f"dead/layer{layer}"] = float((totals[f"fired/layer{layer}"] == 0).double().mean())
            key = f"layer{layer}" if f"ce_sae/layer{layer}" in totals else "all"
            zero, spliced_ = (float(totals[f"{k}/{key}"]) / n for k in ("ce_zero", "ce_sae"))
            out[f"ce_recovered/layer{layer}"] = recovered(zero, spliced_)
        zero, spliced_ = (float(totals[f"{k}/all"]) / n for k in ("ce_zero", "ce_sae"))
        out |= {"ce_sae": spliced_, "ce_zero": zero, "ce_recovered": recovered(zero, spliced_)}
        kl_zero = float(totals["kl_zero"])
        out["kl_recovered"] = 1 - float(totals["kl_sae"]) / kl_zero if kl_zero > 1e-12 else float("nan")
        for key in ("fvu", "dead"):
            per = [out[f"{key}/layer{i}"] for i in self.transcoders.layers]
            out[key] = sum(per) / len(per)
        return out

    def evaluate_layers_l0(self, results: dict[str, float]) -> dict[str, float]:
        per = [results[f"l0/layer{i}"] for i in self.transcoders.layers if f"l0/layer{i}" in results]
        return results | ({"l0": sum(per) / len(per)} if per else {})

    def _latent_iia(
        self, model: nn.Module, task: Task, base: Batch, paired: Any, sources: dict, cache: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """Per-pair hits of every (variable, latent count) swap, all variants of one engine call."""
        keys = [(v, n) for v in self.iia_variables for n in self._ladder()]
        found = self._swap_hits(model, task, base, paired, sources, cache, [(v, self._chosen[v][:n]) for v, n in keys])
        values: dict[str, Tensor] = {}
        for (v, n), hits in zip(keys, found):
            if self.ladder:
                values[f"latent_iia/{v}/top{n}"] = hits
            if n == self._top:
                values[f"latent_iia/{v}"] = hits
        return values

    def _swap_hits(
        self,
        model: nn.Module,
        task: Task,
        base: Batch,
        paired: Any,
        sources: dict,
        cache: dict[str, Tensor],
        sets: list[tuple[str, Tensor]],
    ) -> list[Tensor]:
        """Per-pair IIA hits ``(B,)`` of swapping each ``(variable, latents)`` set of ``<site>.sae``
        from that variable's source rows (the rest kept, reconstruction error included), each
        set one variant of one engine call."""
        variables = self.iia_variables
        targets, masks = counterfactual_targets(paired.pairs, variables)
        B, width = base["input_ids"].shape[0], self.sae_module.n_latents
        where = {v: swap_positions(self.variables[v], base, paired.sources[v]) for v in {v for v, _ in sets}}
        groups, rows = [], []
        for v, latents in sets:
            ref = self.variables[v]
            basis = one_hot_basis(latents.to(targets.device), width)
            groups.append([Swap(ref, sources[v][ref.name], basis, *where[v])])
            rows.append(variables.index(v))
        variant_ids = None
        if targets.shape[1] > 1:  # a multi-token counterfactual answer is teacher-forced, as the interchange audit does
            tiled = tile(base, len(groups), ("input_ids", "answer_pos", "answer_mask"))
            variant_ids = teacher_forced(tiled, torch.cat([targets[k * B : (k + 1) * B] for k in rows]))
        answers = swap_forward(model, base, groups, cache, variant_ids)
        return [
            interchange_hits(
                answers[g * B : (g + 1) * B], targets[k * B : (k + 1) * B], masks[k * B : (k + 1) * B], task
            )
            for g, k in enumerate(rows)
        ]

    def summarise(self, totals: dict[str, Tensor], task: Task) -> dict[str, float]:
        if self.transcoders is not None:
            return self._summarise_layers(totals)
        rows = float(totals["rows"])
        variance = (totals["sum_sq"] - totals["sum"].pow(2) / rows).sum()
        out = {
            "fvu": float(totals["sse"] / variance.clamp_min(1e-12)),
            "dead": float((totals["fired"] == 0).double().mean()),
        }
        if "examples" in totals:
            n = float(totals["examples"])
            clean, spliced, zero = (float(totals[k]) / n for k in ("ce_clean", "ce_sae", "ce_zero"))
            out |= {"ce_clean": clean, "ce_sae": spliced, "ce_zero": zero}
            out["ce_recovered"] = (zero - spliced) / (zero - clean) if abs(zero - clean) > 1e-12 else float("nan")
            kl_zero = float(totals["kl_zero"])
            out["kl_recovered"] = 1 - float(totals["kl_sae"]) / kl_zero if kl_zero > 1e-12 else float("nan")
        return out


def _positions(spec: Any, where: str) -> dict[str, Any]:
    """A variable's entry: ``null`` (every real token), positions (ints, ``answer``, a span
    ``{span, token}``) or ``{positions: ...}``."""
    if spec is None:
        return {}
    if isinstance(spec, dict) or hasattr(spec, "keys"):
        if set(spec) <= {"span", "token"}:
            return {"positions": dict(spec)}
        unknown = set(spec) - {"positions"}
        if unknown:
            raise ConfigError(
                f"{where}: unknown key {sorted(unknown)[0]!r}; give positions (where its latents are read)"
            )
        return dict(spec)
    return {"positions": spec}
