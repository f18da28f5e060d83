"""What the library asks of a model, declared in one place.

Every model takes ``forward(input_ids, attention_mask=None, positions=None, narrow=True)`` and
names its sites (``site_points``): that is ``SiteModel``. The rest are capabilities a model may
have; the functions below answer for any model, with the default for one that lacks them, so no
code outside ``faithful_train/modeling/`` checks a model's class or probes its attributes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from faithful_train.errors import ConfigError, UnknownNameError

if TYPE_CHECKING:
    from faithful_train.modeling.hooks import SitePoint


@runtime_checkable
class SiteModel(Protocol):
    """The interface every model satisfies (ours, the Hugging Face adapter, the concept
    bottleneck, and a user's own). Optional capabilities, read through the functions below:
    ``n_layers``, ``moe_layers()``, ``forward_from(layer, resid, ...)`` (resume a forward at a
    block), ``blocks`` (an ``nn.ModuleList`` of its blocks), ``per_token_logits``."""

    def site_points(self) -> dict[str, SitePoint]: ...

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        positions: Tensor | None = None,
        narrow: bool = True,
    ) -> Tensor: ...


def n_layers(model: nn.Module) -> int | None:
    """The number of blocks, or ``None`` if the model does not say."""
    return getattr(model, "n_layers", None)


def moe_layers(model: nn.Module) -> dict[int, tuple[int, int]]:
    """``{layer: (n_experts, top_k)}`` of its mixture-of-experts layers; ``{}`` for a dense model."""
    layers = getattr(model, "moe_layers", None)
    return layers() if callable(layers) else {}


def per_token_logits(model: nn.Module) -> bool:
    """Whether the model answers at every position (a concept bottleneck answers only where it reads)."""
    return bool(getattr(model, "per_token_logits", True))


def can_resume(model: nn.Module) -> bool:
    """Whether the model can resume a forward at a block (``forward_from``): our transformer can."""
    return callable(getattr(model, "forward_from", None)) and callable(getattr(model, "forward_to", None))


def unembed(model: nn.Module, states: Tensor) -> Tensor:
    """Logits from final hidden states (the ``final`` site, after the last norm): ``(..., vocab)``."""
    hf = getattr(model, "hf_model", None)
    return hf.get_output_embeddings()(states) if hf is not None else model.unembed(states)


def final_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """The ``final`` site's values at every position ``(B, T, D)``, from a forward that unembeds
    only the last position: what a per-token loss over the whole vocabulary starts from without
    holding every position's logits at once (``functional`` losses unembed them in chunks)."""
    point = model.site_points()["final"]
    kept: dict[str, Tensor] = {}

    def keep(_module: nn.Module, args: tuple, out: Any) -> None:
        kept["final"] = point.read(args[0] if point.kind == "input" else out)

    handle = point.module.register_forward_hook(keep)
    try:
        last = torch.full((input_ids.shape[0], 1), input_ids.shape[1] - 1, dtype=torch.long, device=input_ids.device)
        model(input_ids, attention_mask=attention_mask, positions=last, narrow=False)
    finally:
        handle.remove()
    return kept["final"]


class GraphParts(Protocol):
    """What the edge-level forward (``intervene.edges``) needs of a model: its blocks taken apart
    so that every attention head reads its own query, key and value input and writes its own
    output into the residual stream (TransformerLens's ``use_split_qkv_input`` and
    ``use_attn_result``, for our transformer and each Hugging Face family)."""

    n_layers: int
    n_heads: int

    def embed(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        """The ``input`` node's output: the residual stream entering block 0 ``(B, T, D)``."""

    def contexts(self, resid: Tensor, attention_mask: Tensor | None) -> list[Any]:
        """Per block, what its attention needs besides its inputs (masks, rotary embeddings)."""

    def attn_norm(self, layer: int, x: Tensor) -> Tensor:
        """The block's norm before attention, on inputs ``(..., D)``."""

    def attend(self, layer: int, q_in: Tensor, k_in: Tensor, v_in: Tensor, context: Any) -> Tensor:
        """Per-head outputs ``z (B, T, H, Dh)`` (before the output projection) from per-head
        normed inputs ``(B, T, H, D)`` each: head ``h``'s query from ``q_in[:, :, h]``, its keys
        and values (its group's weights, under grouped-query attention) from ``k_in``/``v_in``."""

    def head_weights(self, layer: int) -> tuple[Tensor, Tensor | None]:
        """The output projection as ``(H, Dh, D)`` and its bias ``(D,)`` (or ``None``)."""

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        """The block's MLP (or MoE) output from its residual input (its norm included)."""

    def logits(self, resid: Tensor) -> Tensor:
        """Logits from the final residual stream (final norm and unembedding)."""

    # -- what the replacement model (``intervene.replacement``) needs besides ---------------------

    def norm_module(self, layer: int | None, where: str) -> nn.Module:
        """The norm before ``"attn"`` or ``"mlp"`` of block ``layer``, or the ``"final"`` norm."""

    def unembed(self, states: Tensor) -> Tensor:
        """Logits from final-normed states."""

    def pattern(self, layer: int, q_in: Tensor, k_in: Tensor, context: Any) -> Tensor:
        """Attention probabilities ``(B, H, T, T)`` (query, key) from per-head normed inputs."""

    def values(self, layer: int, v_in: Tensor) -> Tensor:
        """Per-head values ``(B, H, T, Dh)`` from per-head normed inputs ``(B, T, H, D)``;
        ``attend`` is ``pattern @ values``."""


def graph_parts(model: nn.Module) -> GraphParts | None:
    """The model's ``GraphParts`` (ours and the Hugging Face adapter have them), or ``None``."""
    parts = getattr(model, "graph_parts", None)
    return parts() if callable(parts) else None


def hidden_size(model: nn.Module) -> int | None:
    """Width of the residual stream (ours, a Hugging Face adapter's, a wrapped backbone's, or a
    ``d_model`` attribute), or ``None`` if the model does not say."""
    cfg = getattr(model, "cfg", None)
    if hasattr(cfg, "d_model"):
        return cfg.d_model
    hf = getattr(model, "hf_model", None)
    if hf is not None:
        return hf.config.hidden_size
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, nn.Module):
        return hidden_size(backbone)
    return getattr(model, "d_model", None)


def context_length(model: nn.Module) -> int | None:
    """The longest input the model takes (ours: ``max_seq_len``; a Hugging Face model: its
    position embeddings), or ``None`` if the model does not say."""
    hf = getattr(model, "hf_model", None)
    if hf is not None:
        return getattr(hf.config, "max_position_embeddings", None) or getattr(hf.config, "n_positions", None)
    return getattr(getattr(model, "cfg", None), "max_seq_len", None)


def n_heads(model: nn.Module) -> int | None:
    """Attention heads per block, or ``None`` if the model does not say."""
    cfg = getattr(model, "cfg", None)
    if hasattr(cfg, "n_heads"):
        return cfg.n_heads
    hf = getattr(model, "hf_model", None)
    if hf is not None:
        return hf.config.num_attention_heads
    backbone = getattr(model, "backbone", None)
    return n_heads(backbone) if isinstance(backbone, nn.Module) else None


def resid_before(model: nn.Module, layer: int, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """The residual stream entering block ``layer`` of a model that can resume (``forward_to``)."""
    return model.forward_to(layer, input_ids, attention_mask)


def block_list(model: nn.Module) -> nn.ModuleList | None:
    """The model's blocks in order (ours: ``blocks``; the Hugging Face adapter: its decoder
    layers), or ``None`` if it has none."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        layers = getattr(model, "decoder_layers", None)
        blocks = layers() if callable(layers) else None
    return blocks if isinstance(blocks, nn.ModuleList) and len(blocks) else None


def hugging_face_model(model: nn.Module) -> Any:
    """The ``transformers`` model a Hugging Face adapter wraps (for its own ``generate``), or
    ``None`` for any other model."""
    return getattr(model, "hf_model", None)


def hugging_face_form(model: nn.Module) -> Any:
    """The model as a ``transformers`` model (ours converts to the GPT-2 it equals), or ``None``."""
    from faithful_train.modeling.transformer import Transformer

    if isinstance(model, Transformer):
        from faithful_train.modeling.convert import to_gpt2

        return to_gpt2(model)
    return getattr(model, "hf_model", None)


def router_layers(model: nn.Module, layers: Sequence[int] | None, owner: str) -> dict[int, tuple[int, int]]:
    """``{layer: (n_experts, top_k)}`` of the requested MoE layers (default: all of them)."""
    moe = moe_layers(model)
    if not moe:
        raise ConfigError(f"{owner} needs a mixture-of-experts model (e.g. model: moe-tiny or mixtral-tiny)")
    if layers is None:
        return moe
    for layer in layers:
        if layer not in moe:
            raise UnknownNameError(f"MoE layer for {owner}", str(layer), [str(i) for i in moe])
    return {layer: moe[layer] for layer in layers}
