"""The ``sae`` audit: how well an SAE at a site describes the model, on a fixed held-out set.

    audits:
      - name: sae
        sae: sae                 # the label of the run's sae objective (read live), or
        # path: saes/sae         # a folder in SAELens's layout (relative to the run dir), with
        # site: blocks.1.resid_post   # the site it reads

Figures (over the real tokens of the audit set):

- ``fvu``: ``sum((x - x_hat)^2) / sum((x - mean(x))^2)`` over the whole set;
- ``l0``: active latents per token; ``dead``: the share of latents never active on the set;
- ``ce_recovered``: with the SAE's reconstruction spliced in at the site (every token),
  ``(CE_zero - CE_sae) / (CE_zero - CE_clean)`` on the answer, against zero-ablating the site
  (SAELens's ``ce_loss_score``); ``kl_recovered``: ``1 - KL(p_clean || p_sae) / KL(p_clean ||
  p_zero)`` on the answer's distribution; ``ce_clean``, ``ce_sae``, ``ce_zero`` too.

The spliced and the zero-ablated forwards run as two variants of one engine call. A
transcoder (an objective with ``target``) reports ``fvu`` against its target and no splice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from faithful_train.audits.base import Audit, Total
from faithful_train.batches import answer_positions, first_answer_logits, gather_positions
from faithful_train.engine import plan_resume, run_variants
from faithful_train.errors import ConfigError
from faithful_train.sae import SparseAutoencoder, load_saelens, site_rows, site_width
from faithful_train.sites import run_with, validate_sites
from faithful_train.tasks.base import Batch, Task

TOTALS = ("sse", "sum", "sum_sq", "rows", "fired", "ce_clean", "ce_sae", "ce_zero", "kl_sae", "kl_zero", "examples")


class SaeAudit(Audit):
    name = "sae"

    def __init__(self, sae: str | None = None, path: str | None = None, site: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        if (sae is None) == (path is None):
            raise ConfigError(f"audit {self.label!r}: give sae (an sae objective's label) or path (an SAE folder), one of them")
        if path is not None and site is None:
            raise ConfigError(f"audit {self.label!r}: an SAE read from a folder needs the site it reads (site: ...)")
        self.objective_label, self.path, self.site = sae, path, site
        self.target: str | None = None
        self.sae_module: SparseAutoencoder | None = None
        self._run_dir: Path | None = None

    def metric_names(self, task: Task) -> list[str]:
        return ["fvu", "l0", "dead", "ce_recovered", "kl_recovered", "ce_clean", "ce_sae", "ce_zero"]

    def bind(self, model: nn.Module, task: Task, run_seed: int = 0) -> None:
        if self.site is not None:
            validate_sites(model, [self.site])
            self._width = site_width(model, task, self.site)
        super().bind(model, task, run_seed)

    def attach(self, pl_module: Any) -> None:
        if self.objective_label is not None:
            module = pl_module.objective_modules[self.objective_label] if self.objective_label in pl_module.objective_modules else None
            if not isinstance(module, SparseAutoencoder):
                names = sorted(k for k, m in pl_module.objective_modules.items() if isinstance(m, SparseAutoencoder))
                raise ConfigError(f"audit {self.label!r}: no sae objective labelled {self.objective_label!r}; sae objectives: {names or 'none'}")
            self.sae_module, self.site, self.target = module, module.site, module.target
        elif self.sae_module is None:
            folder = Path(self.path)
            if not folder.exists() and self._run_dir is not None:
                folder = self._run_dir / folder
            self.sae_module, _ = load_saelens(folder, self._width, where=f"audit {self.label!r} path")
            self.sae_module.to(next(pl_module.model.parameters()).device)

    def use_hypotheses(self, files: Any) -> None:
        self._run_dir = files.run_dir

    def measure(self, model: nn.Module, task: Task, batch: Batch) -> dict[str, Any]:
        sae = self.sae_module
        was_training = sae.training
        sae.eval()
        try:
            return self._measure(model, task, batch, sae)
        finally:
            sae.train(was_training)

    def _measure(self, model: nn.Module, task: Task, batch: Batch, sae: SparseAutoencoder) -> dict[str, Any]:
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        sites = [self.site] + ([self.target] if self.target else [])
        plan = plan_resume(model, [self.site])  # the splice resumes from this forward's activations
        logits, cache = run_with(model, ids, record=sites + ([plan.site] if plan else []), attention_mask=mask)
        x = site_rows(cache[self.site], mask).float()
        y = site_rows(cache[self.target], mask).float() if self.target else x
        out = sae(x, y)
        totals = {
            "sse": (y - out.reconstruction).pow(2).sum(), "sum": y.sum(0), "sum_sq": y.pow(2).sum(0),
            "rows": torch.tensor(float(y.shape[0])), "fired": (out.latents > 0).sum(0).float(),
        }  # fmt: skip
        values: dict[str, Any] = {"l0": ((out.latents > 0).float().sum(-1).mean()[None], torch.tensor([float(y.shape[0])], device=y.device))}
        if self.target is None:
            clean_values = cache[self.site]
            recon = torch.zeros_like(clean_values, dtype=out.reconstruction.dtype)
            if mask is None:
                recon = out.reconstruction.view(clean_values.shape)
            else:
                recon[mask.bool()] = out.reconstruction
                recon = torch.where(mask.bool()[..., None], recon, clean_values.float())
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

            totals |= {"ce_clean": ce(logp), "ce_sae": ce(spliced), "ce_zero": ce(zeroed), "kl_sae": kl(spliced),
                       "kl_zero": kl(zeroed), "examples": torch.tensor(float(B))}  # fmt: skip
        return values | {k: Total(v.detach().double()) for k, v in totals.items()}

    def summarise(self, totals: dict[str, Tensor], task: Task) -> dict[str, float]:
        rows = float(totals["rows"])
        variance = (totals["sum_sq"] - totals["sum"].pow(2) / rows).sum()
        out = {"fvu": float(totals["sse"] / variance.clamp_min(1e-12)), "dead": float((totals["fired"] == 0).double().mean())}
        if "examples" in totals:
            n = float(totals["examples"])
            clean, spliced, zero = (float(totals[k]) / n for k in ("ce_clean", "ce_sae", "ce_zero"))
            out |= {"ce_clean": clean, "ce_sae": spliced, "ce_zero": zero}
            out["ce_recovered"] = (zero - spliced) / (zero - clean) if abs(zero - clean) > 1e-12 else float("nan")
            kl_zero = float(totals["kl_zero"])
            out["kl_recovered"] = 1 - float(totals["kl_sae"]) / kl_zero if kl_zero > 1e-12 else float("nan")
        return out
