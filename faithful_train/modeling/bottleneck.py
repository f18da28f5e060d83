"""Concept bottlenecks inserted into a transformer (ours or an adapted Hugging Face model).

``BottleneckModel`` runs its backbone up to block ``layer``, reads the residual stream at the
last position (``blocks.{layer}.resid_post``) and answers *through* named concept units
(Koh et al. 2020): the blocks above ``layer`` are not run, so nothing reaches the answer
except what the bottleneck passes. Three modes:

    hard       the head reads only the concept units (probabilities; ``discrete: true`` makes
               them 0/1 with a straight-through gradient, which leaves nothing to leak)
    hybrid     the concept units plus a side channel of ``side_width`` units, which in training
               carries its value plus unit Gaussian noise, so the concepts objective's leakage
               penalty (its KL to N(0, I)) bounds what it can pass (a variational information
               bottleneck, Alemi et al. 2017)
    embedding  a concept embedding model (Espinosa Zarlenga et al. 2022): an embedding per
               concept value, scored by one shared layer into the concept's probability, mixed by
               it; the head reads the K mixed embeddings

New sites, each ``(B, 1, ...)`` (the one position the bottleneck reads)::

    bottleneck.logits      (B, 1, U)     concept logits (U units: 1 per binary concept, 1 per
                                         value of a categorical one; ``faithful_train.functional.concepts``)
    bottleneck.concepts    (B, 1, U)     concept probabilities as the head reads them: writing
                                         true values here is a test-time intervention
    bottleneck.side        (B, 1, W)     the side channel before its training noise (hybrid)
    bottleneck.embeddings  (B, 1, V, m)  one embedding per concept value (embedding)

``readout(concepts, side, embeddings)`` is the part after the bottleneck, so objectives and
audits that intervene on concepts run only the head, not the backbone.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from faithful_train.errors import ConfigError, UnknownNameError
from faithful_train.modeling.concept_layout import ConceptLayout
from faithful_train.modeling.hooks import HookPoint, SitePoint
from faithful_train.modeling.interface import can_resume, hidden_size
from faithful_train.tasks.batch import gather_positions, last_real_position

MODES = ("hard", "hybrid", "embedding")


class _Stop(Exception):
    """Raised by the hook that captures the bottleneck's input: the blocks above are not run."""

    def __init__(self, value: Tensor):
        self.value = value


class ConceptBottleneck(nn.Module):
    """Residual ``(B, 1, D)`` -> concept units -> head -> logits ``(B, 1, vocab)``."""

    def __init__(
        self,
        d_model: int,
        layout: ConceptLayout,
        vocab_size: int,
        mode: str = "hard",
        side_width: int = 8,
        side_noise: float = 1.0,
        embedding_dim: int = 16,
        head_hidden: int = 64,
        discrete: bool = False,
    ):
        super().__init__()
        if mode not in MODES:
            raise UnknownNameError("bottleneck mode", mode, MODES)
        if mode == "hybrid" and side_width < 1:
            raise ConfigError(f"a hybrid bottleneck needs side_width >= 1, got {side_width}")
        if discrete and mode != "hard":
            raise ConfigError("discrete concepts are a 'hard' bottleneck option")
        self.layout, self.mode, self.discrete = layout, mode, discrete
        self.side_noise = side_noise
        self.norm = nn.LayerNorm(d_model)
        if mode == "embedding":
            self.embedding_dim = embedding_dim
            self.value_embeddings = nn.Linear(d_model, layout.n_embeddings * embedding_dim)
            self.score = nn.Linear(embedding_dim, 1)  # shared across values and concepts
            head_in = layout.n_concepts * embedding_dim
        else:
            self.concept_logits = nn.Linear(d_model, layout.n_units)
            head_in = layout.n_units
        if mode == "hybrid":
            self.side = nn.Linear(d_model, side_width)
            head_in += side_width
        self.head = (
            nn.Sequential(nn.Linear(head_in, head_hidden), nn.GELU(), nn.Linear(head_hidden, vocab_size))
            if head_hidden
            else nn.Linear(head_in, vocab_size)
        )
        self.hook_logits, self.hook_concepts = HookPoint(), HookPoint()
        self.hook_side, self.hook_embeddings = HookPoint(), HookPoint()
        # training noise of the side channel is drawn from (draws, rank): a buffer, so a resumed
        # run draws exactly the noise the uninterrupted run would have
        self.register_buffer("noise_draws", torch.zeros((), dtype=torch.long))

    def forward(self, resid: Tensor) -> Tensor:
        h = self.norm(resid)
        side = self.hook_side(self.side(h)) if self.mode == "hybrid" else None
        embeddings = None
        if self.mode == "embedding":
            flat = F.leaky_relu(self.value_embeddings(h))
            embeddings = self.hook_embeddings(flat.view(*h.shape[:-1], self.layout.n_embeddings, self.embedding_dim))
            logits = self.hook_logits(self._embedding_logits(embeddings))
        else:
            logits = self.hook_logits(self.concept_logits(h))
        concepts = self.hook_concepts(self.layout.probabilities(logits))
        return self.readout(concepts, side, embeddings)

    def _embedding_logits(self, embeddings: Tensor) -> Tensor:
        """Per-value scores -> concept logits: ``s1 - s0`` for a binary concept (so its sigmoid is
        the softmax over its two values), the scores themselves for a categorical one."""
        scores = self.score(embeddings)[..., 0]  # (B, 1, n_embeddings)
        parts, start = [], 0
        for n in self.layout.n_values:
            s = scores[..., start : start + n]
            parts.append(s[..., 1:] - s[..., :1] if n == 2 else s)
            start += n
        return torch.cat(parts, dim=-1)

    def readout(self, concepts: Tensor, side: Tensor | None = None, embeddings: Tensor | None = None) -> Tensor:
        """The head: logits ``(B, 1, vocab)`` from the concept units (and side channel, or value
        embeddings); what runs downstream of ``bottleneck.concepts``."""
        return self.head(self.head_input(concepts, side, embeddings))

    def head_input(self, concepts: Tensor, side: Tensor | None = None, embeddings: Tensor | None = None) -> Tensor:
        """What the head reads: the (discretised) units and the (noisy, in training) side channel,
        or the K value embeddings mixed by the concept probabilities."""
        if self.mode == "embedding":
            weighted = self.layout.mixing_weights(concepts)[..., None] * embeddings  # (B, 1, n_embeddings, m)
            mixed, start = [], 0
            for n in self.layout.n_values:
                mixed.append(weighted[..., start : start + n, :].sum(-2))
                start += n
            return torch.cat(mixed, dim=-1)
        x = self.layout.discretize(concepts) if self.discrete else concepts
        return torch.cat([x, self._noisy(side)], dim=-1) if self.mode == "hybrid" else x

    def _noisy(self, side: Tensor) -> Tensor:
        if not (self.training and self.side_noise > 0):
            return side
        rank = (
            torch.distributed.get_rank()
            if torch.distributed.is_available() and torch.distributed.is_initialized()
            else 0
        )
        generator = torch.Generator(device=side.device).manual_seed(int(self.noise_draws) * 1_000_003 + rank)
        self.noise_draws += 1
        noise = torch.randn(side.shape, generator=generator, device=side.device, dtype=side.dtype)
        return side + self.side_noise * noise

    def site_points(self) -> dict[str, SitePoint]:
        points = {"bottleneck.logits": self.hook_logits, "bottleneck.concepts": self.hook_concepts}
        if self.mode == "hybrid":
            points["bottleneck.side"] = self.hook_side
        if self.mode == "embedding":
            points["bottleneck.embeddings"] = self.hook_embeddings
        return {name: SitePoint(module) for name, module in points.items()}


def bottleneck_of(model: nn.Module, owner: str) -> BottleneckModel:
    """``model`` if it has a concept bottleneck, else a config error naming ``owner``."""
    if not isinstance(model, BottleneckModel):
        raise ConfigError(
            f"{owner} needs a model with a concept bottleneck: add 'bottleneck: {{mode: hard}}' to the model section"
        )
    return model


class BottleneckModel(nn.Module):
    """A backbone cut after block ``layer`` (default: its last) and answered through a
    ``ConceptBottleneck``; ``forward(ids) -> logits (B, 1, vocab)``, the answer position only."""

    per_token_logits = False  # it answers only where it reads: no next-token logits elsewhere

    def __init__(
        self, backbone: nn.Module, layout: ConceptLayout, vocab_size: int, layer: int | None = None, **bottleneck: Any
    ):
        super().__init__()
        n = backbone.n_layers
        layer = n - 1 if layer is None else layer
        if not -n <= layer < n:
            raise ConfigError(f"bottleneck layer {layer} is out of range for a {n}-layer model")
        self.layer = layer % n
        self.backbone = backbone
        self.bottleneck = ConceptBottleneck(hidden_size(backbone), layout, vocab_size, **bottleneck)

    @property
    def layout(self) -> ConceptLayout:
        return self.bottleneck.layout

    @property
    def n_layers(self) -> int:
        """Blocks that run (those above the bottleneck are cut)."""
        return self.layer + 1

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        positions: Tensor | None = None,
        narrow: bool = True,
    ) -> Tensor:
        """Answer logits ``(B, P, vocab)`` through the concepts, read at ``positions`` (B, P)
        (default: each row's last real token). Every block below the bottleneck runs in full."""
        return self.bottleneck(self.features(input_ids, attention_mask, positions))

    def features(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, positions: Tensor | None = None
    ) -> Tensor:
        """The bottleneck's input: ``blocks.{layer}.resid_post`` at ``positions``, ``(B, P, D)``."""
        if positions is None:
            B, T = input_ids.shape
            positions = last_real_position(attention_mask, T, B, input_ids.device)[:, None]
        if can_resume(self.backbone):
            return gather_positions(self.backbone.forward_to(self.layer + 1, input_ids, attention_mask), positions)
        # other backbones run until the site is computed, then stop
        point = self.backbone.site_points()[f"blocks.{self.layer}.resid_post"]

        def stop(_module: nn.Module, _args: tuple, out: Any) -> None:
            raise _Stop(point.read(out))

        handle = point.module.register_forward_hook(stop)  # after any edit hook already there
        try:
            self.backbone(input_ids, attention_mask=attention_mask)
        except _Stop as stopped:
            return gather_positions(stopped.value, positions)
        finally:
            handle.remove()
        raise RuntimeError(f"blocks.{self.layer}.resid_post was never computed")

    def enable_activation_checkpointing(self, enabled: bool = True) -> None:
        """The backbone's blocks recompute their activations in the backward pass."""
        self.backbone.enable_activation_checkpointing(enabled)

    @property
    def forward_to(self):
        """The residual entering block ``layer`` (the backbone's, where it can resume)."""
        if not can_resume(self.backbone):
            raise AttributeError("forward_to")
        return self.backbone.forward_to

    @property
    def forward_from(self):
        """Resume at block ``layer`` from its input residual (partial forwards), where the
        backbone can, so ``hasattr(model, "forward_from")`` is False where it cannot."""
        if not can_resume(self.backbone):
            raise AttributeError("forward_from")

        def forward_from(
            layer: int,
            resid: Tensor,
            attention_mask: Tensor | None = None,
            positions: Tensor | None = None,
            narrow: bool = True,
            last_only: bool = False,
        ) -> Tensor:
            resid = self.backbone.run_layers(layer, self.layer + 1, resid, attention_mask)
            if positions is None:
                positions = last_real_position(attention_mask, resid.shape[1], resid.shape[0], resid.device)[:, None]
            return self.bottleneck(gather_positions(resid, positions))

        return forward_from

    def check_task(self, task: Any, owner: str) -> None:
        """Every concept of the bottleneck must be labelled by ``task``, whose answers are one token."""
        if task.answer_length > 1:
            raise ConfigError(
                f"{owner}: a concept bottleneck answers with one token; "
                f"task {task.name!r} has answers of up to {task.answer_length}"
            )
        for name in self.layout.names:
            task.check_concept(name, owner)

    def concept_labels(self, batch: dict[str, Tensor]) -> Tensor:
        """``(B, K)`` true values of the bottleneck's concepts in ``batch``."""
        return torch.stack([batch[f"concept/{name}"] for name in self.layout.names], dim=1)

    def readout_from(self, cache: dict[str, Tensor], concepts: Tensor) -> Tensor:
        """Answer logits ``(B, vocab)`` of the head on concept units ``(B, U)`` with the side
        channel / value embeddings recorded in ``cache`` (a partial forward from the concepts)."""
        side, embeddings = cache.get("bottleneck.side"), cache.get("bottleneck.embeddings")
        return self.bottleneck.readout(concepts[:, None], side, embeddings)[:, 0]

    def moe_layers(self) -> dict[int, tuple[int, int]]:
        moe = self.backbone.moe_layers() if hasattr(self.backbone, "moe_layers") else {}
        return {i: v for i, v in moe.items() if i <= self.layer}

    def selection_bias(self, layer: int) -> Tensor:
        return self.backbone.selection_bias(layer)

    def site_points(self) -> dict[str, SitePoint]:
        def runs(name: str) -> bool:
            if name == "final":
                return False
            return not name.startswith("blocks.") or int(name.split(".")[1]) <= self.layer

        points = {name: p for name, p in self.backbone.site_points().items() if runs(name)}
        return points | self.bottleneck.site_points()
