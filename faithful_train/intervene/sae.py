"""Sparse autoencoders (and transcoders) over a site's activations, and their files.

    z = act(W_enc (x - b_dec) + b_enc)        (x - b_dec: not for a transcoder)
    x_hat = z W_dec + b_dec

Activations (``act``):

- ``topk``: ReLU, then keep each row's ``k`` largest (Gao et al. 2024; EleutherAI's sparsify);
- ``batch_topk``: ReLU, then keep the ``k * N`` largest of a batch of ``N`` rows (Bussmann et
  al. 2024); at evaluation a threshold (the running mean of the smallest kept value) replaces
  the batch, so one row's latents do not depend on the others;
- ``jumprelu``: ``pre * (pre > θ)`` with a learned threshold per latent, trained with a
  straight-through estimator of the L0 (Rajamanoharan et al. 2024);
- ``relu``: ReLU, with an L1 penalty on ``z * ||W_dec row||`` (Bricken et al. 2023).

The loss is the fraction of variance unexplained, sparsify's definition over the batch,

    FVU = sum((y - y_hat)^2) / sum((y - mean(y))^2)

plus ``auxk_alpha`` times the AuxK loss (Gao et al. 2024): the ``d/2`` dead latents with the
largest pre-activations reconstruct the residual ``y - y_hat`` (their decode without ``b_dec``,
which the residual already holds), scaled by ``min(#dead / (d/2), 1)``, over the same
denominator. As in sparsify, the AuxK term trains the decoder weights only. Decoder rows are
kept unit norm (``normalize_decoder``): the gradient along each row is removed before a step
and the rows renormalised after it.

Files follow SAELens (``cfg.json`` + ``sae_weights.safetensors``, v6 layout): ``W_enc``
``(d_in, d_sae)``, ``W_dec`` ``(d_sae, d_in)``, ``b_enc``, ``b_dec`` and, for JumpReLU (and a
BatchTopK SAE, saved as the JumpReLU it is at evaluation), ``threshold``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from faithful_train.errors import ConfigError, DataError, UnknownNameError, first_line
from faithful_train.intervene.sites import attach_featurizer, featurized_sites, resolve_positions, run_with
from faithful_train.modeling.hooks import recording_suspended
from faithful_train.tasks.base import Task

ACTIVATIONS = ("topk", "batch_topk", "jumprelu", "relu")
SAELENS_ARCHITECTURES = {"topk": "topk", "batch_topk": "jumprelu", "jumprelu": "jumprelu", "relu": "standard"}
SAELENS_VERSION = "6.18.0"  # the cfg.json layout written (and read: 6.x)
SPARSE_FROM = 256  # latents from which TopK runs sparse (measured: benchmarks/sae.py)


@dataclass
class SaeOutput:
    reconstruction: Tensor  # (N, d_out)
    fvu: Tensor
    auxk: Tensor
    sparsity: Tensor  # L1 (relu) or L0 surrogate (jumprelu); 0 for top-k
    l0: Tensor  # mean active latents per row
    dense: Tensor | None = None  # (N, F) latents, or the top-k pair below
    top_values: Tensor | None = None  # (N, k)
    top_indices: Tensor | None = None  # (N, k)
    n_latents: int = 0

    @property
    def latents(self) -> Tensor:
        """``(N, F)`` dense latents, zeros off the active set (built on demand from top-k)."""
        if self.dense is None:
            zeros = self.top_values.new_zeros(self.top_values.shape[0], self.n_latents)
            self.dense = zeros.scatter(-1, self.top_indices, self.top_values.detach())
        return self.dense

    def fired(self) -> Tensor:
        """``(F,)`` bool: the latents active on some row."""
        if self.dense is not None:
            return (self.dense > 0).any(0)
        active = self.top_indices[self.top_values > 0]
        return torch.zeros(self.n_latents, dtype=torch.bool, device=active.device).index_fill_(0, active, True)


class _TopKEncode(torch.autograd.Function):
    """``topk(ReLU(x W^T + b), k)`` with a sparse backward: each row's gradient reaches only its
    ``k`` selected latents' encoder rows (``index_add``), not the dense ``(N, F)`` product, as in
    sparsify's fused encoder (whose backward also passes gradient to a selected zero)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        pre = torch.relu(torch.nn.functional.linear(x, weight, bias))
        values, index = pre.topk(k, dim=-1, sorted=False)
        ctx.save_for_backward(x, weight, index)
        ctx.mark_non_differentiable(index, pre)
        return values, index, pre

    @staticmethod
    def backward(
        ctx: Any, grad_values: Tensor, grad_index: Any, grad_pre: Any
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        x, weight, index = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.functional.embedding_bag(
                index, weight, per_sample_weights=grad_values.to(weight.dtype), mode="sum"
            )
        if ctx.needs_input_grad[1]:
            rows = (grad_values.unsqueeze(-1) * x.unsqueeze(1)).reshape(-1, x.shape[-1]).to(weight.dtype)
            grad_w = torch.zeros_like(weight).index_add_(0, index.flatten(), rows)
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device).index_add_(
                0, index.flatten(), grad_values.flatten().to(weight.dtype)
            )
        return grad_x, grad_w, grad_b, None


class _JumpStep(torch.autograd.Function):
    """``1[pre > θ]`` with the pseudo-derivative ``-(1/ε) K((pre - θ)/ε)`` (rectangle kernel) for
    θ (Rajamanoharan et al. 2024, "Jumping ahead")."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        pre, threshold = ctx.saved_tensors
        near = ((pre - threshold).abs() < ctx.bandwidth / 2).to(pre.dtype)
        return None, (-(1.0 / ctx.bandwidth) * near * grad).sum(0), None


class _JumpReLU(torch.autograd.Function):
    """``pre * 1[pre > θ]``; gradient to ``pre`` where it passes, and ``-(θ/ε) K`` to θ."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        pre, threshold = ctx.saved_tensors
        near = ((pre - threshold).abs() < ctx.bandwidth / 2).to(pre.dtype)
        return grad * (pre > threshold).to(pre.dtype), (-(threshold / ctx.bandwidth) * near * grad).sum(0), None


def _full_precision(sae: nn.Module) -> Any:
    """The SAE computes in float32 under mixed precision (autocast off): its weights and its
    TopK selection stay fp32 whatever the model's matmuls run in."""
    return torch.autocast(sae.W_dec.device.type, enabled=False)


class SparseAutoencoder(nn.Module):
    """An SAE (``d_out`` = ``d_in``) or a transcoder (``d_out`` given: another site's output).
    It computes in float32 under mixed precision (``_full_precision``)."""

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        k: int = 16,
        activation: str = "topk",
        d_out: int | None = None,
        normalize_decoder: bool = True,
        jump_threshold: float = 1e-3,
        jump_bandwidth: float = 1e-3,
        sparse: bool | None = None,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise UnknownNameError("SAE activation", activation, ACTIVATIONS)
        if n_latents < 1 or not 0 < k <= n_latents:
            raise ConfigError(f"an SAE needs n_latents >= 1 and 0 < k <= n_latents, got {n_latents} and {k}")
        self.d_in, self.n_latents, self.k, self.activation = d_in, n_latents, int(k), activation
        self.d_out = d_in if d_out is None else d_out
        self.transcoder = d_out is not None
        self.normalize_decoder = bool(normalize_decoder) and not self.transcoder
        self.jump_bandwidth = float(jump_bandwidth)
        # the sparse TopK path pays off once the dense (N, F) products outweigh its gathers
        self.sparse = n_latents >= SPARSE_FROM if sparse is None else bool(sparse)
        self.encoder = nn.Linear(d_in, n_latents)
        self.encoder.bias.data.zero_()
        if self.transcoder:
            self.W_dec = nn.Parameter(torch.zeros(n_latents, self.d_out))
        else:
            self.W_dec = nn.Parameter(self.encoder.weight.data.clone())
        self.b_dec = nn.Parameter(torch.zeros(self.d_out))
        if activation == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((n_latents,), math.log(jump_threshold)))
        self.register_buffer("threshold_estimate", torch.zeros(()), persistent=True)  # batch_topk at evaluation
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool), persistent=True)
        if self.normalize_decoder:
            self.set_decoder_norm_to_unit_norm()

    # -- maths ------------------------------------------------------------------------------------

    def pre_acts(self, x: Tensor) -> Tensor:
        """``(N, F)``: ``ReLU(W_enc (x - b_dec) + b_enc)`` (a transcoder reads ``x`` as it is)."""
        return torch.relu(self.encoder(x if self.transcoder else x - self.b_dec))

    @property
    def threshold(self) -> Tensor:
        """Per-latent thresholds at evaluation (JumpReLU's learned one; BatchTopK's estimate)."""
        if self.activation == "jumprelu":
            return self.log_threshold.exp()
        return self.threshold_estimate.expand(self.n_latents)

    def latents(self, pre: Tensor) -> Tensor:
        """``(N, F)`` dense latents from pre-activations."""
        if self.activation == "topk":
            values, index = pre.topk(self.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter(-1, index, values)
        if self.activation == "batch_topk":
            if not self.training:
                return pre * (pre > self.threshold_estimate)
            flat = pre.flatten()
            values, index = flat.topk(min(self.k * pre.shape[0], flat.numel()), sorted=False)
            with torch.no_grad():  # the smallest kept value, averaged: the threshold at evaluation
                smallest = values[values > 0].min() if (values > 0).any() else values.new_zeros(())
                if recording_suspended():  # a checkpoint's recomputation: counted in the forward already
                    pass
                elif self.threshold_estimate > 0:  # a running mean once it has a first value
                    self.threshold_estimate.mul_(0.99).add_(0.01 * smallest)
                else:
                    self.threshold_estimate.copy_(smallest)
            return torch.zeros_like(flat).scatter(0, index, values).view_as(pre)
        if self.activation == "jumprelu":
            return _JumpReLU.apply(pre, self.log_threshold.exp(), self.jump_bandwidth)
        return pre

    def decode(self, latents: Tensor) -> Tensor:
        with _full_precision(self):
            return latents.float() @ self.W_dec + self.b_dec

    def encode(self, x: Tensor) -> Tensor:
        with _full_precision(self):
            return self.latents(self.pre_acts(x.float()))

    def forward(self, x: Tensor, y: Tensor | None = None, dead_mask: Tensor | None = None) -> SaeOutput:
        with _full_precision(self):
            return self._forward(x.float(), None if y is None else y.float(), dead_mask)

    def _forward(self, x: Tensor, y: Tensor | None = None, dead_mask: Tensor | None = None) -> SaeOutput:
        """Reconstruct ``y`` (default ``x``) from ``x`` ``(N, d_in)``; the loss terms of the batch.
        A wide TopK SAE runs sparse (``sparse``: the encoder's backward and the decode touch the
        ``k`` selected latents of each row); a narrow one runs dense matmuls, faster there."""
        y = x if y is None else y
        top_values = top_indices = z = None
        if self.activation == "topk" and self.sparse:
            top_values, top_indices, pre = _TopKEncode.apply(
                x if self.transcoder else x - self.b_dec, self.encoder.weight, self.encoder.bias, self.k
            )
            y_hat = (
                torch.nn.functional.embedding_bag(top_indices, self.W_dec, per_sample_weights=top_values, mode="sum")
                + self.b_dec
            )
            l0 = (top_values > 0).float().sum(-1).mean()
        else:
            pre = self.pre_acts(x)
            z = self.latents(pre)
            y_hat = self.decode(z)
            l0 = (z > 0).float().sum(-1).mean()
        error = y - y_hat
        total = (y - y.mean(0)).pow(2).sum().clamp_min(1e-12)
        fvu = error.pow(2).sum() / total
        auxk = fvu.new_zeros(())
        if dead_mask is not None and dead_mask.any():
            k_aux = y.shape[-1] // 2
            n_dead = int(dead_mask.sum())
            scale = min(n_dead / k_aux, 1.0)
            k_aux = min(k_aux, n_dead)
            dead_index = dead_mask.nonzero()[:, 0]
            candidates = pre.detach()[:, dead_index]  # the decoder learns; sparsify's encoder gets no AuxK gradient
            if n_dead > k_aux:  # the k_aux largest dead pre-activations of each row
                values, chosen = candidates.topk(k_aux, dim=-1, sorted=False)
                index = dead_index[chosen]
            else:  # every dead latent: no selection to make
                values, index = candidates, dead_index.expand(candidates.shape[0], -1)
            # the residual already holds b_dec: the dead latents' decode adds no bias (sparsify 1.3)
            e_hat = torch.nn.functional.embedding_bag(
                index, self.W_dec, per_sample_weights=values.clamp_min(0), mode="sum"
            )
            auxk = scale * (e_hat - error.detach()).pow(2).sum() / total
        if self.activation == "relu":
            sparsity = (z * self.W_dec.norm(dim=1)).sum(-1).mean()
        elif self.activation == "jumprelu":
            sparsity = _JumpStep.apply(pre, self.log_threshold.exp(), self.jump_bandwidth).sum(-1).mean()
        else:
            sparsity = fvu.new_zeros(())
        return SaeOutput(y_hat, fvu, auxk, sparsity, l0, z, top_values, top_indices, self.n_latents)

    @torch.no_grad()
    def initialise_from(self, x: Tensor, y: Tensor | None = None) -> None:
        """``b_dec`` = the mean of the first batch's targets (sparsify's start), once."""
        if bool(self.initialised):
            return
        self.b_dec.copy_((x if y is None else y).mean(0))
        self.initialised.fill_(True)

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        eps = torch.finfo(self.W_dec.dtype).eps
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True) + eps)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(1, keepdim=True)
        self.W_dec.grad.sub_(parallel * self.W_dec)


def site_rows(values: Tensor, mask: Tensor | None) -> Tensor:
    """``(N, D)``: a site's ``(B, T, D)`` values at the real tokens (padding left out)."""
    if mask is None:
        return values.reshape(-1, values.shape[-1])
    return values[mask.bool()]


def token_rows(batch: dict[str, Tensor], positions: Any = None) -> Tensor | None:
    """``(B, T)`` bool: the tokens whose values are an SAE's rows (the real ones, or those at
    ``positions``, a ``SiteRef``); ``None``: every token."""
    mask = batch.get("attention_mask")
    if positions is None:
        return None if mask is None else mask.bool()
    at = resolve_positions(positions, batch)
    return torch.zeros_like(batch["input_ids"], dtype=torch.bool).scatter(1, at, True)


def site_width(model: nn.Module, task: Task, site: str) -> int:
    """The width of ``site``'s values, from one recorded forward of one example."""
    probe = task.validation_set(1, 0)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _, cache = run_with(model, probe["input_ids"], record=[site], attention_mask=probe.get("attention_mask"))
    finally:
        model.train(was_training)
    return int(cache[site].shape[-1])


# -- files: SAELens's layout ----------------------------------------------------------------------


def attach_sae(model: nn.Module, site: str, sae: SparseAutoencoder, owner: str) -> str:
    """Make ``<site>.sae`` the latents of ``sae`` (``sites.attach_featurizer``); an error if
    another owner's SAE already holds that name (the same owner, bound again, replaces its
    own). Returns the name."""
    taken = featurized_sites(model).get(f"{site}.sae")
    if taken is not None and taken[1] is not sae and getattr(taken[1], "owner", None) != owner:
        raise ConfigError(
            f"{owner}: {site}.sae already holds another SAE's latents (an sae objective's); read that one by its label"
        )
    sae.owner = owner
    return attach_featurizer(model, site, sae)


def saelens_config(sae: SparseAutoencoder, hook_name: str, model_name: str = "faithful_train") -> dict[str, Any]:
    architecture = SAELENS_ARCHITECTURES[sae.activation]
    cfg: dict[str, Any] = {
        "d_in": sae.d_in,
        "d_sae": sae.n_latents,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": not sae.transcoder,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "architecture": architecture,
        "metadata": {
            "sae_lens_version": SAELENS_VERSION,
            "hook_name": hook_name,
            "model_name": model_name,
            "hook_head_index": None,
            "prepend_bos": False,
            "faithful_train_activation": sae.activation,
        },
    }
    if architecture == "topk":
        cfg |= {"k": sae.k, "rescale_acts_by_decoder_norm": False}
    if sae.transcoder:
        cfg["d_out"] = sae.d_out
    return cfg


def save_saelens(sae: SparseAutoencoder, folder: str | Path, hook_name: str) -> None:
    """``cfg.json`` + ``sae_weights.safetensors`` in ``folder``, each written atomically."""
    import os

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        "W_enc": sae.encoder.weight.detach().T.contiguous().cpu(),
        "b_enc": sae.encoder.bias.detach().cpu().clone(),
        "W_dec": sae.W_dec.detach().cpu().clone(),
        "b_dec": sae.b_dec.detach().cpu().clone(),
    }
    if SAELENS_ARCHITECTURES[sae.activation] == "jumprelu":
        tensors["threshold"] = sae.threshold.detach().cpu().clone().contiguous()
    tmp = folder / f".sae_weights.{os.getpid()}.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, folder / "sae_weights.safetensors")
    text = json.dumps(saelens_config(sae, hook_name), indent=2)
    tmp = folder / f".cfg.{os.getpid()}.tmp"
    tmp.write_text(text)
    os.replace(tmp, folder / "cfg.json")


def load_saelens(
    folder: str | Path, d_in: int | None = None, where: str = "sae"
) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """An SAE from SAELens's layout (v6 ``cfg.json``; topk, jumprelu or standard), checked
    against the site's width ``d_in``; anything else is a one-line ``DataError``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path, weights_path = folder / "cfg.json", folder / "sae_weights.safetensors"
    if not cfg_path.is_file() or not weights_path.is_file():
        found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise DataError(
            f"{where}: {folder} is not an SAE in SAELens's layout (cfg.json + sae_weights.safetensors); "
            f"found {found or 'nothing'}"
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: {cfg_path} is not JSON: {first_line(e)}") from None
    version = str((cfg.get("metadata") or {}).get("sae_lens_version", cfg.get("sae_lens_version", "")))
    if not version.startswith("6."):
        raise DataError(
            f"{where}: {cfg_path} is not a SAELens 6.x config (sae_lens_version {version or 'missing'}); "
            "convert it with SAELens 6"
        )
    architecture = cfg.get("architecture")
    if architecture not in ("topk", "jumprelu", "standard"):
        raise DataError(f"{where}: {cfg_path} architecture {architecture!r} is not one of topk, jumprelu, standard")
    try:
        tensors = load_file(str(weights_path))
    except Exception as e:  # safetensors raises several kinds for a bad file
        raise DataError(f"{where}: {weights_path} cannot be read: {first_line(e)}") from None
    needed = {"W_enc", "W_dec", "b_enc", "b_dec"} | ({"threshold"} if architecture == "jumprelu" else set())
    if needed - set(tensors):
        raise DataError(f"{where}: {weights_path} lacks {', '.join(sorted(needed - set(tensors)))}")
    d_in_file, d_sae = tensors["W_enc"].shape
    if (int(cfg.get("d_in", d_in_file)), int(cfg.get("d_sae", d_sae))) != (d_in_file, d_sae) or tensors["W_dec"].shape[
        0
    ] != d_sae:
        raise DataError(
            f"{where}: {folder}: cfg.json says d_in {cfg.get('d_in')}, d_sae {cfg.get('d_sae')}; "
            f"the tensors are W_enc {tuple(tensors['W_enc'].shape)}, W_dec {tuple(tensors['W_dec'].shape)}"
        )
    if d_in is not None and d_in_file != d_in:
        raise DataError(f"{where}: the SAE in {folder} reads {d_in_file} dimensions, the site has {d_in}")
    activation = (cfg.get("metadata") or {}).get("faithful_train_activation") or {
        "topk": "topk",
        "jumprelu": "jumprelu",
        "standard": "relu",
    }[architecture]
    d_out = tensors["W_dec"].shape[1]
    sae = SparseAutoencoder(
        d_in_file,
        d_sae,
        k=int(cfg.get("k", 1) or 1),
        activation=activation,
        d_out=None if d_out == d_in_file and cfg.get("apply_b_dec_to_input", True) else d_out,
        normalize_decoder=False,
    )
    with torch.no_grad():
        sae.encoder.weight.copy_(tensors["W_enc"].T)
        sae.encoder.bias.copy_(tensors["b_enc"])
        sae.W_dec.copy_(tensors["W_dec"])
        sae.b_dec.copy_(tensors["b_dec"])
        if activation == "jumprelu":
            sae.log_threshold.copy_(tensors["threshold"].clamp_min(1e-12).log())
        elif activation == "batch_topk":
            sae.threshold_estimate.copy_(tensors["threshold"][0])
        sae.initialised.fill_(True)
    return sae, cfg
