"""The ``sae`` objective: a sparse autoencoder (or transcoder) trained beside the model, online,
from the activations the step's forward already recorded (no second pass, no cache on disk).

    objectives:
      - name: sae
        site: blocks.1.resid_post      # what it reads (and, without target, reconstructs)
        target: blocks.1.mlp.out       # optional: a transcoder, site -> target
        positions: null                # optional: train on these positions only (ints,
                                       # answer, a span): an SAE of the last token, say
        max_rows: null                 # optional: a random subset of this many tokens per
                                       # step (the step's generator): a cheaper step
        expansion: 8                   # n_latents = expansion * width (or n_latents: N)
        k: 16
        activation: topk               # batch_topk | jumprelu | relu
        lr: 1.0e-3                     # its own learning rate (default: the model's)
        auxk_alpha: 0.03125            # AuxK on latents dead for dead_after tokens
        joint: false                   # true: the model is trained to be reconstructable too
        # layers: all                # transcoders at every layer (or a list): site and target
        #                              then hold {i}, e.g. blocks.{i}.mlp.in -> blocks.{i}.mlp.out;
        #                              each layer's transcoder its own module, files in
        #                              saes/<label>/layer<i>/; figures per layer (fvu/layer<i>)
        # path: saes/elsewhere         # start from an SAE in SAELens's layout (width, k and
        #                                activation from the file), or keep it as it is:
        # train: false                 # a fixed SAE: its latents are the site <site>.sae

    term = FVU + auxk_alpha * AuxK  (+ l1 * L1 for relu, + l0 * L0 for jumprelu)

Detached by default: the term's gradient reaches the SAE only, and the model trains as without
it. A fixed SAE (``train: false``, usually from ``path``) is not trained; its fit is still
logged. Padding is masked (only real tokens are rows). Decoder rows stay unit norm (the gradient
along them removed before each step, the rows renormalised after). ``b_dec`` starts at the
first batch's mean. The SAE is written in SAELens's layout to ``<run dir>/saes/<label>/`` at
each checkpoint and at the end (``sae.save_saelens``). Formulas and sources: ``faithful_train/intervene/sae.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn

from faithful_train.errors import ConfigError
from faithful_train.functional.interchange import check_positions
from faithful_train.intervene.sae import (
    SparseAutoencoder,
    attach_sae,
    load_saelens,
    save_saelens,
    site_rows,
    site_width,
    token_rows,
)
from faithful_train.intervene.sites import SiteRef, validate_sites
from faithful_train.intervene.transcoders import Transcoders, save_transcoders
from faithful_train.modeling.interface import n_layers
from faithful_train.objectives.base import Objective, StepContext
from faithful_train.tasks.base import Task


class SaeObjective(Objective):
    name = "sae"
    supports_activation_checkpointing = True
    adds_sites = True  # <site>.sae, for the other objectives and audits

    def __init__(
        self,
        site: str,
        target: str | None = None,
        expansion: int = 8,
        n_latents: int | None = None,
        k: int = 16,
        activation: str = "topk",
        lr: float | None = None,
        auxk_alpha: float = 1 / 32,
        dead_after: int = 10_000,
        l1: float = 0.0,
        l0: float = 0.0,
        joint: bool = False,
        normalize_decoder: bool = True,
        path: str | None = None,
        train: bool = True,
        positions: Any = None,
        max_rows: int | None = None,
        layers: Any = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.require_non_negative(auxk_alpha=auxk_alpha, l1=l1, l0=l0, dead_after=dead_after)
        if lr is not None and lr <= 0:
            raise ConfigError(f"objective {self.label!r}: lr must be > 0, got {lr}")
        if expansion < 1:
            raise ConfigError(f"objective {self.label!r}: expansion must be >= 1, got {expansion}")
        self.site, self.target = site, target
        self.expansion, self.n_latents, self.k, self.activation = int(expansion), n_latents, int(k), activation
        self.lr, self.auxk_alpha, self.dead_after = lr, float(auxk_alpha), int(dead_after)
        self.l1, self.l0, self.joint, self.normalize_decoder = (
            float(l1),
            float(l0),
            bool(joint),
            bool(normalize_decoder),
        )
        if activation == "relu" and l1 == 0:
            raise ConfigError(f"objective {self.label!r}: a relu SAE needs an l1 coefficient > 0 (its only sparsity)")
        self.path, self.train = path, bool(train)
        self.rows_at = None if positions is None else SiteRef.parse({"site": site, "positions": positions})
        if max_rows is not None and max_rows < 1:
            raise ConfigError(f"objective {self.label!r}: max_rows must be >= 1, got {max_rows}")
        self.max_rows = max_rows
        if path is not None and target is not None:
            raise ConfigError(f"objective {self.label!r}: a transcoder (target) cannot be read from a folder (path)")
        if layers is not None:
            if layers != "all" and not (isinstance(layers, (list, tuple)) or hasattr(layers, "__len__")):
                raise ConfigError(f"objective {self.label!r}: layers must be all or a list of layers, got {layers!r}")
            for name, value in (("site", site), ("target", target)):
                if value is None or "{i}" not in value:
                    raise ConfigError(
                        f"objective {self.label!r}: with layers, {name} must hold {{i}} "
                        f"(e.g. blocks.{{i}}.mlp.in -> blocks.{{i}}.mlp.out), got {value!r}"
                    )
            if path is not None:
                raise ConfigError(f"objective {self.label!r}: layers and path do not go together")
        self.layers = layers
        self.sae: SparseAutoencoder | None = None
        self.transcoders: Transcoders | None = None

    def _layer_list(self, model: nn.Module) -> list[int]:
        depth = n_layers(model)
        if self.layers == "all":
            if depth is None:
                raise ConfigError(f"objective {self.label!r}: layers: all needs a model that says its depth")
            return list(range(depth))
        chosen = [int(i) for i in self.layers]
        for i in chosen:
            if depth is not None and not 0 <= i < depth:
                raise ConfigError(f"objective {self.label!r}: layers: {i} is not a layer of the model (0..{depth - 1})")
        return sorted(set(chosen))

    def _pairs(self) -> list[tuple[str, str | None, SparseAutoencoder]]:
        """``(site, target, sae)`` of each SAE this objective trains."""
        if self.transcoders is not None:
            return [
                (self.site.format(i=i), self.target.format(i=i), sae) for i, sae in self.transcoders.items_by_layer()
            ]
        return [(self.site, self.target, self.sae)]

    def bind(self, model: nn.Module, task: Task, run_seed: int = 0) -> None:
        if self.layers is not None:
            self._bind_layers(model, task, run_seed)
            return
        validate_sites(model, [self.site] + ([self.target] if self.target else []))
        if self.rows_at is not None:
            check_positions(self.rows_at, task)
        d_in = site_width(model, task, self.site)
        d_out = site_width(model, task, self.target) if self.target else None
        if self.path is not None:
            self.sae, _ = load_saelens(self.path, d_in, where=f"objective {self.label!r} path")
            self.sae.initialised.fill_(True)
            self.k, self.activation = self.sae.k, self.sae.activation
        else:
            with torch.random.fork_rng():
                torch.manual_seed(run_seed + 7919)  # the SAE's start depends on the run's seed only
                n_latents = self.n_latents or self.expansion * d_in
                self.sae = SparseAutoencoder(
                    d_in,
                    n_latents,
                    k=self.k,
                    activation=self.activation,
                    d_out=d_out,
                    normalize_decoder=self.normalize_decoder,
                )
        self.sae.register_buffer("tokens_since_fired", torch.zeros(self.sae.n_latents, dtype=torch.long))
        self.sae.requires_grad_(self.train)
        self.sae.lr = self.lr if self.train else None  # its own parameter group (FaithfulModule.configure_optimizers)
        self.sae.site, self.sae.target, self.sae.rows_at = (
            self.site,
            self.target,
            self.rows_at,
        )  # what the sae audit reads
        if self.target is None:  # its latents become a site: <site>.sae, for any objective or audit
            attach_sae(model, self.site, self.sae, f"objective {self.label!r}")

    def _bind_layers(self, model: nn.Module, task: Task, run_seed: int) -> None:
        """One transcoder per layer, ``site.format(i)`` -> ``target.format(i)``."""
        layers = self._layer_list(model)
        validate_sites(model, [name.format(i=i) for i in layers for name in (self.site, self.target)])
        by_layer = {}
        with torch.random.fork_rng():
            torch.manual_seed(run_seed + 7919)
            for i in layers:
                d_in = site_width(model, task, self.site.format(i=i))
                d_out = site_width(model, task, self.target.format(i=i))
                by_layer[i] = SparseAutoencoder(
                    d_in,
                    self.n_latents or self.expansion * d_in,
                    k=self.k,
                    activation=self.activation,
                    d_out=d_out,
                    normalize_decoder=self.normalize_decoder,
                )
        for i, sae in by_layer.items():
            sae.register_buffer("tokens_since_fired", torch.zeros(sae.n_latents, dtype=torch.long))
            sae.site, sae.target, sae.rows_at = self.site.format(i=i), self.target.format(i=i), self.rows_at
        self.transcoders = Transcoders(by_layer)
        self.transcoders.requires_grad_(self.train)
        self.transcoders.lr = self.lr if self.train else None
        self.transcoders.site, self.transcoders.target = self.site, self.target

    def module(self) -> nn.Module | None:
        return self.transcoders if self.transcoders is not None else self.sae

    def sites(self) -> list[str]:
        return [name for site, target, _ in self._pairs() for name in (site, target) if name is not None]

    def term(self, ctx: StepContext) -> Tensor:
        if self.transcoders is None:
            term, self.parts = self._term(ctx, self.site, self.target, self.sae)
            return term
        total, parts = None, {}
        for (site, target, sae), layer in zip(self._pairs(), self.transcoders.layers):
            term, own = self._term(ctx, site, target, sae)
            total = term if total is None else total + term
            parts |= {f"{k}/layer{layer}": v for k, v in own.items()}
        for key in ("fvu", "l0", "dead"):
            values = [v for k, v in parts.items() if k.startswith(key + "/")]
            if values:
                parts[key] = torch.stack(values).float().mean()
        self.parts = parts
        return total

    def _term(
        self, ctx: StepContext, site: str, target: str | None, sae: SparseAutoencoder
    ) -> tuple[Tensor, dict[str, Tensor]]:
        x, y = self._rows(ctx, site), self._rows(ctx, target) if target else None
        if self.max_rows is not None and x.shape[0] > self.max_rows:  # a random subset of the step's tokens
            keep = torch.randperm(x.shape[0], generator=ctx.generator)[: self.max_rows].to(x.device)
            x, y = x[keep], None if y is None else y[keep]
        if not self.joint:
            x, y = x.detach(), None if y is None else y.detach()
        x, y = x.float(), None if y is None else y.float()
        if not self.train:  # fixed: only its fit is logged
            with torch.no_grad():
                out = sae(x, y)
            return out.fvu.new_zeros(()), {"fvu": out.fvu, "l0": out.l0}
        sae.initialise_from(x, y)
        dead = sae.tokens_since_fired > self.dead_after
        out = sae(x, y, dead_mask=dead if self.auxk_alpha > 0 else None)
        with torch.no_grad():
            sae.tokens_since_fired.add_(x.shape[0]).masked_fill_(out.fired(), 0)
        term = out.fvu + self.auxk_alpha * out.auxk
        if self.activation == "relu":
            term = term + self.l1 * out.sparsity
        elif self.activation == "jumprelu":
            term = term + self.l0 * out.sparsity
        return term, {
            "fvu": out.fvu.detach(),
            "l0": out.l0.detach(),
            "dead": dead.float().mean(),
            "auxk": out.auxk.detach(),
        }

    def _rows(self, ctx: StepContext, site: str) -> Tensor:
        """The site's values at the real tokens (padding left out), or at ``positions`` only."""
        return site_rows(ctx.cache[site], token_rows(ctx.batch, self.rows_at))

    # -- unit-norm decoder and files ----------------------------------------------------------

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        for _, _, sae in self._pairs():
            if sae is not None and sae.normalize_decoder:
                sae.remove_gradient_parallel_to_decoder_directions()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        for _, _, sae in self._pairs():
            if sae is not None and sae.normalize_decoder and self.train:
                sae.set_decoder_norm_to_unit_norm()

    def folder(self, trainer: Trainer) -> Path:
        return Path(trainer.default_root_dir) / "saes" / self.label

    def _save(self, trainer: Trainer) -> None:
        if not trainer.is_global_zero:
            return
        if self.transcoders is not None:
            save_transcoders(self.transcoders, self.folder(trainer))
        elif self.sae is not None:
            save_saelens(self.sae, self.folder(trainer), self.site)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._save(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save(trainer)
