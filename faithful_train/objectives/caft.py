"""The ``caft`` objective: concept ablation fine-tuning (CAFT; Casademunt et al. 2025, "Steering
out-of-distribution generalization with concept ablation fine-tuning"). While the model is
fine-tuned, the SAE latents aligned with an unwanted concept are ablated in the step's forward,
so the task cannot be learned through that concept; the model is then used without ablation.

    objectives:
      - name: caft
        sae: sae                  # the label of an sae objective (trained beside, or from a file)
        concept: decoy            # a variable or concept of the task that the model must not use
        positions: null           # where latents are read for alignment and ablated (default: every position)
        at: blocks.1.resid_pre    # where the ablation is applied (default: the SAE's site); the
                                  # same values one hook later lets the SAE keep learning the
                                  # clean activations while the model is fine-tuned
        min_auroc: 0.75           # ablate latents with max_c |AUROC_c - 1/2| >= min_auroc - 1/2 ...
        max_latents: 16           # ... at most this many, the most aligned first
        probe_examples: 1024      # the probe set: task.sample, where the concept varies freely
        refresh_every: 0          # re-choose the latents every N steps (0: once)
        ablation: projection      # project out their decoder directions (the paper's); or
                                  # latents: zero them, reconstruction error kept
        schedule: {kind: warmup, start: 500, steps: 0}   # when the ablation starts

Latents are chosen on a probe set drawn from the task's held-out distribution (``task.sample``,
its own seed), from the concept's values only (never the labels): for ``decoy_objects`` that is
where the tag varies apart from the answer, as a person reading the latents would need. A
latent's alignment is its best one-vs-rest AUROC over the concept's values
(``faithful_train.functional.latents``). The ablation is CAFT's linear projection: with ``Q`` an
orthonormal basis of the chosen latents' decoder directions, ``x <- x - (x Q) Q^T``, nothing
left along them whatever the encoder reads; or (``ablation: latents``) ``x <- x - sum_{i in A}
z_i(x) W_dec[i]``, exactly what those latents encode (the reconstruction error and every other
latent kept). Both use the SAE's parameters detached, so the task loss never trains the SAE.
The term is 0: the
objective acts through the forward; its parts log how many latents are ablated and their
mean alignment.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from faithful_train.errors import ConfigError, UnknownNameError
from faithful_train.functional.interchange import check_positions
from faithful_train.functional.latents import alignment_ranking, check_labelled, label_values, read_scores, value_aurocs
from faithful_train.intervene.engine import frozen_parameters
from faithful_train.intervene.sae import SparseAutoencoder, site_width
from faithful_train.intervene.sites import SiteRef, resolve_positions, validate_sites
from faithful_train.objectives.base import Objective, StepContext
from faithful_train.tasks.base import Task

ABLATIONS = ("projection", "latents")


class CaftObjective(Objective):
    name = "caft"
    supports_activation_checkpointing = True

    def __init__(
        self,
        concept: str,
        sae: str = "sae",
        positions: Any = None,
        min_auroc: float = 0.75,
        max_latents: int | None = None,
        probe_examples: int = 1024,
        refresh_every: int = 0,
        at: str | None = None,
        ablation: str = "projection",
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if not 0.5 < min_auroc <= 1:
            raise ConfigError(f"objective {self.label!r}: min_auroc must be in (0.5, 1], got {min_auroc}")
        if (max_latents is not None and max_latents < 1) or probe_examples < 2 or refresh_every < 0:
            raise ConfigError(
                f"objective {self.label!r}: max_latents >= 1, probe_examples >= 2, refresh_every >= 0 required"
            )
        self.concept, self.sae_label = str(concept), str(sae)
        self.positions = positions
        self.min_auroc, self.max_latents = float(min_auroc), max_latents
        self.probe_examples, self.refresh_every = int(probe_examples), int(refresh_every)
        if ablation not in ABLATIONS:
            raise UnknownNameError(f"ablation of objective {self.label!r}", ablation, ABLATIONS)
        self.at, self.ablation = at, ablation
        self.sae: SparseAutoencoder | None = None
        self.ablated: Tensor | None = None  # the chosen latents
        self.chosen_at = -1
        self.strength = 0.0

    def bind(self, model: nn.Module, task: Task, run_seed: int = 0) -> None:
        check_labelled(task, self.concept, f"objective {self.label!r}")
        if self.positions is not None:
            check_positions(
                SiteRef.parse({"site": f"objective {self.label!r} positions", "positions": self.positions}), task
            )
        task.check_sample_size(self.probe_examples, f"objective {self.label!r}")
        self.probe_seed, self._probe = run_seed + 2_000_029, None

    def attach(self, pl_module: LightningModule) -> None:
        module = pl_module.objective_modules[self.sae_label] if self.sae_label in pl_module.objective_modules else None
        if not isinstance(module, SparseAutoencoder) or module.transcoder:
            names = sorted(
                k
                for k, m in pl_module.objective_modules.items()
                if isinstance(m, SparseAutoencoder) and not m.transcoder
            )
            raise ConfigError(
                f"objective {self.label!r}: no sae objective labelled {self.sae_label!r} (an SAE of a site); "
                f"sae objectives: {names or 'none'}"
            )
        self.sae = module
        self.site = self.at or module.site
        if self.at is not None:
            validate_sites(pl_module.model, [self.at])
            width = site_width(pl_module.model, pl_module.task, self.at)
            if width != module.d_in:
                raise ConfigError(
                    f"objective {self.label!r}: at {self.at} has width {width}, the SAE reads {module.d_in}"
                )
        self.ref = SiteRef.parse(
            {"site": f"{module.site}.sae", **({} if self.positions is None else {"positions": self.positions})}
        )

    def choose(self, model: nn.Module, task: Task) -> Tensor:
        """The latents aligned with the concept on the probe set, most aligned first."""
        device = next(model.parameters()).device
        if self._probe is None:
            self._probe = task.sample(self.probe_examples, self.probe_seed)
        probe = {k: v.to(device) for k, v in self._probe.items()}
        was_training, sae_training = model.training, self.sae.training
        model.eval(), self.sae.eval()
        try:
            scores = read_scores(model, {self.concept: self.ref}, probe)[self.concept]
        finally:
            model.train(was_training), self.sae.train(sae_training)
        values = label_values(probe, self.concept)
        order, strength = alignment_ranking(value_aurocs(scores, values), scores, values)
        keep = strength >= self.min_auroc - 0.5
        chosen, strength = order[keep][: self.max_latents], strength[keep][: self.max_latents]
        self.strength = float(strength.mean() + 0.5) if len(strength) else 0.0
        return chosen

    def step_edits(self, model: nn.Module, task: Task, step: int, batch: Any) -> dict[str, Any]:
        due = self.ablated is None or (self.refresh_every and step - self.chosen_at >= self.refresh_every)
        if due:
            self.ablated, self.chosen_at = self.choose(model, task), step
        if not len(self.ablated):
            return {}
        sae, ablated, ref, projection = (
            self.sae,
            self.ablated.to(self.sae.W_dec.device),
            self.ref,
            self.ablation == "projection",
        )
        if projection:
            basis = torch.linalg.qr(sae.W_dec.detach()[ablated].T.float())[0]  # (D, n) orthonormal

        def ablate(x: Tensor) -> Tensor:
            if projection:
                removed = (x.float() @ basis) @ basis.T
            else:
                with frozen_parameters(sae):  # the task loss never trains the SAE
                    removed = sae.encode(x.float())[..., ablated] @ sae.W_dec[ablated]
            if ref.positions is not None:  # only where the latents were read
                at = resolve_positions(ref, batch)
                removed = removed * torch.zeros(x.shape[:2], device=x.device).scatter(1, at, 1.0)[..., None]
            return (x.float() - removed).to(x.dtype)

        return {self.site: ablate}

    def term(self, ctx: StepContext) -> Tensor:
        self.parts = {
            "ablated": torch.tensor(float(len(self.ablated) if self.ablated is not None else 0)),
            "auroc": torch.tensor(self.strength),
        }
        return ctx.logits.new_zeros(())

    def state_dict(self) -> dict[str, Any]:
        return {
            "ablated": None if self.ablated is None else self.ablated.tolist(),
            "chosen_at": self.chosen_at,
            "strength": self.strength,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ablated = state_dict.get("ablated")
        self.ablated = None if ablated is None else torch.tensor(ablated, dtype=torch.long)
        self.chosen_at, self.strength = int(state_dict.get("chosen_at", -1)), float(state_dict.get("strength", 0.0))
