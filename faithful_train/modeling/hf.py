"""Hugging Face causal LMs behind the same canonical sites as our own transformer.

``HFAdapter`` wraps a ``transformers`` causal LM (gpt2, llama, mixtral, qwen2_moe, olmoe),
returns plain logits from ``forward`` and maps each canonical site name onto a forward hook
of the wrapped model (see ``faithful_train.intervene.sites``):

    embed                      (B, T, D)     residual stream entering block 0 (gpt2: output of
                                             ``transformer.drop``, after token + position embeddings;
                                             others: output of ``model.embed_tokens``)
    blocks.{i}.resid_pre       (B, T, D)     input of decoder layer i
    blocks.{i}.attn.heads      (B, T, H, Dh) input of the attention output projection, per head
    blocks.{i}.attn.out        (B, T, D)     attention output
    blocks.{i}.mlp.in          (B, T, D)     input of the MLP or sparse MoE block (after its norm)
    blocks.{i}.mlp.out         (B, T, D)     output of the MLP or sparse MoE block
    blocks.{i}.moe.router      (B, T, E)     raw router logits (sparse MoE layers only)
    blocks.{i}.moe.weights     (B, T, E)     routing weights, zero off the top-k (sparse MoE layers only)
    blocks.{i}.resid_post      (B, T, D)     output of decoder layer i
    final                      (B, T, D)     after the final norm

Writing ``moe.router`` recomputes the routing (top-k experts and their weights) from the
edited logits exactly as the family's router does, so patching router logits changes which
experts run. An edit of ``moe.weights`` may leave at most top-k nonzero weights per token
(HF experts run exactly top-k experts per token; more raises ``ConfigError``). The sparse
block's input tells the ``moe.*`` sites the (B, T) shape that the router's flattened
``(B*T, E)`` output comes from (in the forward and in a checkpoint's recomputation alike).

Resuming (``forward_to`` / ``forward_from``, what the engine runs edited variants with): the
residual stream entering a decoder layer, and each layer called as the family's model calls it
(the same causal or sliding-window mask, position ids counted over real tokens, rotary
position embeddings, no KV cache). A forward that reads a few positions runs the last layer's
attention at every position but its MLP (and everything after) at those positions only.

Absent on purpose: ``blocks.{i}.resid_mid``. HF decoder layers add the attention output to
the residual stream inline (no module boundary), so a hook could read it (the input of the
post-attention norm) but an edit would reach only the norm, not the residual that skips
it: patching it would silently be unfaithful. Qwen2-MoE layers without a sparse block
(``mlp_only_layers``, ``decoder_sparse_step``) have no ``moe.*`` sites.

Models use eager attention and eager experts, so outputs are deterministic and every
computation passes through hookable modules.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from faithful_train.errors import ConfigError, UnknownNameError, first_line
from faithful_train.modeling.affine import affine_weights
from faithful_train.modeling.checkpointing import checkpoint_block, should_checkpoint
from faithful_train.modeling.hooks import HookPoint, SitePoint
from faithful_train.modeling.sharding import is_shard_unit
from faithful_train.tasks.batch import gather_positions, position_ids

Route = Callable[[nn.Module, Tensor, "Tensor | None"], tuple[Tensor, Tensor]]


def _top_k(probs: Tensor, logits: Tensor, k: int, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """The family's ``topk(probs)``; with a selection bias, choose by ``logits + bias`` and keep
    the unbiased probabilities as weights (DeepSeek-V3)."""
    if bias is None:
        return torch.topk(probs, k, dim=-1)
    indices = (logits.float() + bias.to(logits.device, torch.float32)).topk(k, dim=-1).indices
    return probs.gather(-1, indices), indices


def _route_mixtral(gate: nn.Module, logits: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``MixtralTopKRouter``: float softmax, top-k, renormalise; scores stay float32."""
    probs = F.softmax(logits.float(), dim=-1)
    top, indices = _top_k(probs, logits, gate.top_k, bias)
    return top / top.sum(dim=-1, keepdim=True), indices


def _route_qwen(gate: nn.Module, logits: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``Qwen2MoeTopKRouter`` / ``OlmoeTopKRouter``: as Mixtral, renormalising only if
    ``norm_topk_prob``, then casting the scores to the logits' dtype."""
    probs = F.softmax(logits, dtype=torch.float, dim=-1)
    top, indices = _top_k(probs, logits, gate.top_k, bias)
    if gate.norm_topk_prob:
        top = top / top.sum(dim=-1, keepdim=True)
    return top.to(logits.dtype), indices


@dataclass(frozen=True)
class _Family:
    """Where a family keeps things: paths from the HF model (``layers``, ``embed``, ``final``)
    or from one decoder layer (the rest)."""

    layers: str  # the ModuleList of decoder layers
    embed: str  # module whose output is the residual stream entering layer 0
    final: str  # final norm
    attn: str  # attention module; output[0] is (B, T, D)
    o_proj: str  # attention output projection; its input holds the per-head outputs
    mlp: str  # MLP or sparse MoE block
    norm_attn: str = "input_layernorm"  # the layer's norm before attention
    norm_mlp: str = "post_attention_layernorm"  # and before the MLP
    router: str | None = None  # router of a sparse MoE block, missing on dense layers
    route: Route | None = None  # the router's logits -> (scores, indices) computation


_LLAMA_STYLE = dict(
    layers="model.layers",
    embed="model.embed_tokens",
    final="model.norm",
    attn="self_attn",
    o_proj="self_attn.o_proj",
    mlp="mlp",
)

FAMILIES: dict[str, _Family] = {
    "gpt2": _Family(
        layers="transformer.h",
        embed="transformer.drop",
        final="transformer.ln_f",
        attn="attn",
        o_proj="attn.c_proj",
        mlp="mlp",
        norm_attn="ln_1",
        norm_mlp="ln_2",
    ),
    "llama": _Family(**_LLAMA_STYLE),
    "mixtral": _Family(**_LLAMA_STYLE, router="mlp.gate", route=_route_mixtral),
    "qwen2_moe": _Family(**_LLAMA_STYLE, router="mlp.gate", route=_route_qwen),
    "olmoe": _Family(**_LLAMA_STYLE, router="mlp.gate", route=_route_qwen),
}
SUPPORTED_FAMILIES: tuple[str, ...] = tuple(FAMILIES)

PATTERN_ATTENTION = "faithful_eager"
_LOAD_KWARGS = {"attn_implementation": "eager", "experts_implementation": "eager"}


def _pattern_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """The family's own eager attention, unless the layer's ``attn.pattern`` site is recorded or
    edited: then the same computation written out, with the probabilities ``(B, H, T, T)``
    passed through the site's hook before they weight the values (softmax in float32)."""
    hook = getattr(module, "hook_pattern", None)
    if hook is None or not (hook._forward_hooks or hook._forward_pre_hooks):
        family_eager = sys.modules[type(module).__module__].eager_attention_forward
        return family_eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = (query @ key.transpose(-1, -2)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    pattern = hook(scores.softmax(-1, dtype=torch.float32).to(query.dtype))
    pattern = F.dropout(pattern, p=dropout, training=module.training)
    return (pattern @ value).transpose(1, 2).contiguous(), pattern


def _register_pattern_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(PATTERN_ATTENTION, _pattern_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PATTERN_ATTENTION, eager_mask)


def _family(name: str) -> _Family:
    if name not in FAMILIES:
        raise UnknownNameError("model family", name, SUPPORTED_FAMILIES)
    return FAMILIES[name]


def _first(raw: Any) -> Tensor:
    """The hidden states of a module output that may be a tensor or a tuple."""
    return raw[0] if isinstance(raw, tuple) else raw


def _replace_first(raw: Any, new: Tensor) -> Any:
    return (new, *raw[1:]) if isinstance(raw, tuple) else new


@contextmanager
def quiet_progress() -> Iterator[None]:
    """``transformers``' progress bars off (loading and saving), as they were after."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _through_resid_pre(layer: nn.Module, args: tuple) -> tuple:
    """A decoder layer's input through its ``resid_pre`` hook point."""
    return (layer.hook_resid_pre(args[0]), *args[1:])


def _through_resid_post(layer: nn.Module, _args: tuple, out: Any) -> Any:
    """A decoder layer's output (its hidden states) through its ``resid_post`` hook point."""
    return _replace_first(out, layer.hook_resid_post(_first(out)))


def _remember_tokens_shape(block: nn.Module, args: tuple) -> None:
    """The (B, T) of a sparse MoE block's input, for the router sites that see (B*T, E)."""
    block.tokens_shape = tuple(args[0].shape[:2])


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


class HFAdapter(nn.Module):
    """A Hugging Face causal LM with our interface: ``forward(ids) -> logits`` and ``site_points``."""

    per_token_logits = True  # next-token logits at every position (a bottleneck's are not)

    def __init__(self, hf_model: PreTrainedModel):
        super().__init__()
        self.family = hf_model.config.model_type
        self._spec = _family(self.family)
        self.hf_model = hf_model
        self.activation_checkpointing = False
        # attention through our eager function, so each layer's pattern is a site (hook_pattern)
        _register_pattern_attention()
        hf_model.set_attn_implementation(PATTERN_ATTENTION)
        for layer in self.decoder_layers():
            layer.get_submodule(self._spec.attn).hook_pattern = HookPoint()
            # the layer's input and output pass through hook points (the resid_pre / resid_post
            # sites), which a resumed forward that narrows the last layer calls itself
            layer.hook_resid_pre, layer.hook_resid_post = HookPoint(), HookPoint()
            layer.register_forward_pre_hook(_through_resid_pre)
            layer.register_forward_hook(_through_resid_post)
        # per-expert selection bias of each sparse MoE layer (bias balancing); zero = the
        # family's own routing. Saved in our checkpoints, not by save_pretrained.
        for i, gate in self._gates().items():
            self.register_buffer(f"selection_bias_{i}", torch.zeros(gate.weight.shape[0]))
            gate.register_forward_hook(self._biased_routing(gate, i))
            # (batch, seq) of the block's input: the router sees its tokens flattened to (B*T, D)
            self.decoder_layers()[i].get_submodule(self._spec.mlp).register_forward_pre_hook(_remember_tokens_shape)

    def _gates(self) -> dict[int, nn.Module]:
        spec = self._spec
        gates = {
            i: _submodule(layer, spec.router) if spec.router else None for i, layer in enumerate(self.decoder_layers())
        }
        return {i: g for i, g in gates.items() if g is not None}

    def _biased_routing(self, gate: nn.Module, layer: int) -> Callable:
        def hook(_module: nn.Module, _args: tuple, out: tuple) -> tuple | None:
            bias = self._active_bias(layer)
            return None if bias is None else (out[0], *self._spec.route(gate, out[0], bias))

        return hook

    def _active_bias(self, layer: int) -> Tensor | None:
        """The selection bias of MoE layer ``layer``, or ``None`` while it is zero (the family's
        own routing, bit for bit). One host sync per MoE layer and forward on GPU."""
        bias = self.selection_bias(layer)
        return bias if bias.any() else None

    def moe_layers(self) -> dict[int, tuple[int, int]]:
        """``{layer: (n_experts, top_k)}`` of the sparse MoE layers."""
        return {i: (gate.weight.shape[0], gate.top_k) for i, gate in self._gates().items()}

    def selection_bias(self, layer: int) -> Tensor:
        """The per-expert bias buffer that steers top-k selection in MoE layer ``layer``."""
        return getattr(self, f"selection_bias_{layer}")

    @classmethod
    def from_config(
        cls, family: str, config: dict[str, Any], vocab_size: int | None = None, seed: int | None = None
    ) -> HFAdapter:
        """A randomly initialised model of ``family`` from config keys (``vocab_size`` overrides).

        ``seed`` makes the weights reproducible without touching the global RNG.
        """
        _family(family)
        config = {**config, **({"vocab_size": vocab_size} if vocab_size is not None else {})}
        defaults = AutoConfig.for_model(family)
        vocab = config.get("vocab_size", defaults.vocab_size)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # a family default outside a small vocabulary
            value = getattr(defaults, key, None)
            if isinstance(value, int) and value >= vocab and key not in config:
                config[key] = None
        hf_config = AutoConfig.for_model(family, **config)
        if seed is None:
            return cls(AutoModelForCausalLM.from_config(hf_config, **_LOAD_KWARGS))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(AutoModelForCausalLM.from_config(hf_config, **_LOAD_KWARGS))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> HFAdapter:
        """Load from a local directory written by ``save_pretrained`` (never the Hub); the family
        comes from ``config.model_type``. A directory that is missing or holds no model is a
        one-line ``ConfigError``."""
        where = Path(path)
        if not where.is_dir():
            raise ConfigError(
                f"model.path {str(path)!r} is not a directory (a local save_pretrained directory; "
                "nothing is downloaded)"
            )
        if not (where / "config.json").is_file():
            raise ConfigError(
                f"model.path {str(path)!r} holds no config.json: not a directory written by save_pretrained"
            )
        try:
            hf_config = AutoConfig.from_pretrained(where, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.path {str(path)!r}: {first_line(e)}") from None
        _family(hf_config.model_type)
        try:
            with quiet_progress():  # transformers 5 draws a bar per load: not on our terminal
                hf_model = AutoModelForCausalLM.from_pretrained(
                    where, config=hf_config, local_files_only=True, **_LOAD_KWARGS
                )
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.path {str(path)!r} holds no loadable weights: {first_line(e)}") from None
        return cls(hf_model)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        with quiet_progress():
            self.hf_model.save_pretrained(path)

    @property
    def n_layers(self) -> int:
        return len(self.decoder_layers())

    def decoder_layers(self) -> nn.ModuleList:
        """The wrapped model's decoder layers, in order."""
        return self.hf_model.get_submodule(self._spec.layers)

    def enable_activation_checkpointing(self, enabled: bool = True) -> None:
        """``transformers``' activation checkpointing (non-reentrant), with our checkpoint function
        per layer (``modeling.checkpointing``): edits act the same in the recomputation, records
        once, and the layer's own hooks stay outside the checkpoint as ``transformers`` keeps them."""
        hf = self.hf_model
        if enabled:  # transformers 5 renamed gradient_checkpointing_enable (deprecated, same arguments)
            enable = getattr(hf, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            for layer in self.decoder_layers():
                layer._gradient_checkpointing_func = partial(checkpoint_block, layer)
        else:
            getattr(hf, "activation_checkpointing_disable", hf.gradient_checkpointing_disable)()
        self.activation_checkpointing = enabled

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        positions: Tensor | None = None,
        narrow: bool = True,
    ) -> Tensor:
        """Next-token logits ``(B, T, vocab)``, or ``(B, P, vocab)`` at ``positions`` (B, P); with
        ``narrow`` the last layer's MLP, the final norm and the unembedding run at those positions only.

        With an ``attention_mask``, position ids count real tokens only (Hugging Face models
        count from the start of the row otherwise), so left padding does not shift positions.
        """
        if positions is not None and narrow:
            return self.forward_from(0, self.embed(input_ids, attention_mask), attention_mask, positions)
        kwargs = {}
        if attention_mask is not None:
            kwargs["position_ids"] = position_ids(attention_mask, input_ids.shape[1], input_ids.device)
        hidden = self.hf_model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs
        )[0]
        if positions is not None:
            hidden = gather_positions(hidden, positions)
        return self.hf_model.get_output_embeddings()(hidden)

    # -- resuming a forward at a layer (the engine) --------------------------------------------

    def embed(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The residual stream entering layer 0 (the ``embed`` site), as the family computes it."""
        base = self.hf_model.base_model
        if self.family == "gpt2":
            positions = position_ids(attention_mask, input_ids.shape[1], input_ids.device)
            return base.drop(base.wte(input_ids) + base.wpe(positions))
        return base.embed_tokens(input_ids)

    def _layer_inputs(self, resid: Tensor, attention_mask: Tensor | None) -> list[dict[str, Any]]:
        """The keyword arguments the family's model passes each decoder layer for a residual
        stream ``resid`` (B, T, D) with padding ``attention_mask``: its causal (or sliding-window)
        mask, position ids over real tokens, rotary embeddings; never a cache."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        base, config = self.hf_model.base_model, self.hf_model.config
        ids = position_ids(attention_mask, resid.shape[1], resid.device)
        makers = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
        kinds = list(getattr(config, "layer_types", None) or [])[: self.n_layers]
        if not kinds:
            sliding = self.family == "mixtral" and getattr(config, "sliding_window", None) is not None
            kinds = ["sliding_attention" if sliding else "full_attention"] * self.n_layers
        masks = {
            kind: makers[kind](
                config=config, inputs_embeds=resid, attention_mask=attention_mask, cache=None, position_ids=ids
            )
            for kind in set(kinds)
        }
        shared: dict[str, Any] = {"position_ids": ids, "use_cache": False}
        if self.family != "gpt2":
            shared["position_embeddings"] = base.rotary_emb(resid, ids)
        return [{**shared, "attention_mask": masks[kind]} for kind in kinds]

    def forward_to(self, layer: int, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The residual stream entering decoder layer ``layer`` (``blocks.{layer}.resid_pre``)."""
        return self.run_layers(0, layer, self.embed(input_ids, attention_mask), attention_mask)

    def run_layers(self, start: int, stop: int, resid: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Decoder layers ``start .. stop - 1`` on the residual stream entering layer ``start``."""
        inputs = self._layer_inputs(resid, attention_mask)
        layers = self.decoder_layers()
        for i in range(start, stop):
            resid = layers[i](resid, **inputs[i])
        return resid

    def forward_from(
        self,
        layer: int,
        resid: Tensor,
        attention_mask: Tensor | None = None,
        positions: Tensor | None = None,
        narrow: bool = True,
        last_only: bool = False,
    ) -> Tensor:
        """Resume the forward at decoder layer ``layer`` from its input residual stream ``resid``.

        ``positions`` (B, P): the caller needs only these positions' logits ``(B, P, vocab)``;
        with ``narrow`` the last layer's MLP (and the sites after its attention, the final norm
        and the unembedding) runs at those positions only. ``last_only``: the last position.
        """
        if last_only and positions is None:
            positions = torch.full((resid.shape[0], 1), resid.shape[1] - 1, dtype=torch.long, device=resid.device)
        layers = self.decoder_layers()
        last = len(layers) - 1
        inputs = self._layer_inputs(resid, attention_mask)
        # the last layer narrowed calls its submodules itself: not a sharded layer (FSDP gathers in its own forward)
        narrowed = positions is not None and narrow and layer <= last and not is_shard_unit(layers[last])
        for i in range(layer, last + 1 if not narrowed else last):
            resid = layers[i](resid, **inputs[i])
        if narrowed:
            resid = self._narrowed_layer(layers[last], resid, positions, inputs[last])
        elif positions is not None:
            resid = gather_positions(resid, positions)
        return self.hf_model.get_output_embeddings()(self.hf_model.get_submodule(self._spec.final)(resid))

    def _narrowed_layer(self, layer: nn.Module, resid: Tensor, positions: Tensor, inputs: dict[str, Any]) -> Tensor:
        """A decoder layer whose attention runs at every position and the rest at ``positions``
        only: the family's layer written out (pre-norm attention, residual, pre-norm MLP,
        residual), its ``resid_pre``/``resid_post`` hook points called as the layer's hooks would."""
        spec = self._spec

        def body(x: Tensor) -> Tensor:
            attended = layer.get_submodule(spec.attn)(layer.get_submodule(spec.norm_attn)(x), **inputs)[0]
            x = gather_positions(x + attended, positions)
            return x + layer.get_submodule(spec.mlp)(layer.get_submodule(spec.norm_mlp)(x))

        resid = layer.hook_resid_pre(resid)
        if should_checkpoint(layer, getattr(layer, "gradient_checkpointing", False)):
            out = checkpoint_block(layer, body, resid)
        else:
            out = body(resid)
        return layer.hook_resid_post(out)

    def graph_parts(self) -> HFGraphParts:
        """The decoder layers taken apart for edge-level forwards (``modeling.interface.GraphParts``)."""
        return HFGraphParts(self)

    def site_points(self) -> dict[str, SitePoint]:
        spec = self._spec
        points = {
            "embed": SitePoint(self.hf_model.get_submodule(spec.embed)),
            "final": SitePoint(self.hf_model.get_submodule(spec.final)),
        }
        for i, layer in enumerate(self.decoder_layers()):
            points |= {f"blocks.{i}.{name}": p for name, p in self._layer_points(i, layer).items()}
        return points

    def _layer_points(self, index: int, layer: nn.Module) -> dict[str, SitePoint]:
        spec = self._spec
        n_heads = self.hf_model.config.num_attention_heads
        points = {
            "resid_pre": SitePoint(layer.hook_resid_pre),
            "attn.pattern": SitePoint(layer.get_submodule(spec.attn).hook_pattern),
            "attn.heads": SitePoint(
                layer.get_submodule(spec.o_proj),
                kind="input",
                read=lambda raw: raw.unflatten(-1, (n_heads, -1)),
                write=lambda raw, new: new.flatten(-2),
            ),
            "attn.out": SitePoint(layer.get_submodule(spec.attn), read=_first, write=_replace_first),
            "mlp.in": SitePoint(layer.get_submodule(spec.mlp), kind="input"),
            "mlp.out": SitePoint(layer.get_submodule(spec.mlp)),
            "resid_post": SitePoint(layer.hook_resid_post),
        }
        gate = _submodule(layer, spec.router) if spec.router else None
        if gate is not None:
            points |= self._router_points(gate, index)
        return points

    def _router_points(self, gate: nn.Module, layer: int) -> dict[str, SitePoint]:
        """``moe.router`` and ``moe.weights`` on the router's ``(logits, scores, indices)`` output."""
        route = self._spec.route

        block = self.decoder_layers()[layer].get_submodule(self._spec.mlp)

        def unflatten(flat: Tensor) -> Tensor:  # (B*T, E) -> (B, T, E)
            shape = getattr(block, "tokens_shape", None)
            if shape is None or flat.shape[0] != shape[0] * shape[1]:
                raise RuntimeError(f"moe sites of layer {layer}: the router's input is not the sparse block's tokens")
            return flat.view(*shape, flat.shape[-1])

        def write_router(raw: tuple, new: Tensor) -> tuple:
            logits = new.reshape(-1, new.shape[-1]).to(raw[0].dtype)
            scores, indices = route(gate, logits, self._active_bias(layer))
            return logits, scores, indices

        def read_weights(raw: tuple) -> Tensor:
            logits, scores, indices = raw
            dense = torch.zeros(logits.shape, dtype=scores.dtype, device=scores.device)
            return unflatten(dense.scatter(-1, indices, scores))

        def write_weights(raw: tuple, new: Tensor) -> tuple:
            logits, scores, _ = raw
            dense = new.reshape(-1, new.shape[-1])
            if (dense != 0).sum(-1).max() > gate.top_k:
                raise ConfigError(
                    f"an edit of moe.weights leaves more than top_k={gate.top_k} nonzero weights for a token; "
                    "Hugging Face experts run exactly top_k experts per token"
                )
            indices = dense.abs().topk(gate.top_k, dim=-1).indices
            return logits, dense.gather(-1, indices).to(scores.dtype), indices

        return {
            "moe.router": SitePoint(gate, read=lambda raw: unflatten(raw[0]), write=write_router),
            "moe.weights": SitePoint(gate, read=read_weights, write=write_weights),
        }


class HFGraphParts:
    """``GraphParts`` of a Hugging Face family: attention rewritten so that each head's query,
    key and value come from its own input, with the family's projections (gpt2's fused
    ``c_attn``; ``q_proj``/``k_proj``/``v_proj``, with their biases and, for olmoe, the
    ``q_norm``/``k_norm`` over all heads), rotary embeddings, scaling and mask; the softmax in
    float32 as the families' eager attention. Under grouped-query attention each query head
    computes its own keys and values with its group's weights (so an edge into ``<k>`` of one
    head leaves the other heads of its group alone)."""

    def __init__(self, adapter: HFAdapter):
        self.adapter, self.spec = adapter, adapter._spec
        config = adapter.hf_model.config
        self.n_layers, self.n_heads = adapter.n_layers, config.num_attention_heads
        self.layers = adapter.decoder_layers()

    def embed(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        return self.adapter.embed(input_ids, attention_mask)

    def contexts(self, resid: Tensor, attention_mask: Tensor | None) -> list[dict[str, Any]]:
        return self.adapter._layer_inputs(resid, attention_mask)

    def attn_norm(self, layer: int, x: Tensor) -> Tensor:
        return self.layers[layer].get_submodule(self.spec.norm_attn)(x)

    def _projections(self, attn: nn.Module) -> list[tuple[Tensor, Tensor | None]]:
        """Query, key and value weights ``(out, D)`` and biases, key/value per key/value head."""
        if self.adapter.family == "gpt2":
            w, b = affine_weights(attn.c_attn)  # (3D, D): q, k, v stacked
            D = w.shape[1]
            return [(w[i * D : (i + 1) * D], b[i * D : (i + 1) * D]) for i in range(3)]
        return [affine_weights(p) for p in (attn.q_proj, attn.k_proj, attn.v_proj)]

    def _heads(self, layer: int, index: int, x: Tensor) -> Tensor:
        """Query (0), key (1) or value (2) per query head ``(B, H, T, Dh)`` from per-head inputs
        ``(B, T, H, D)`` (keys and values with their group's weights)."""
        attn = self.layers[layer].get_submodule(self.spec.attn)
        H, Dh = self.n_heads, attn.head_dim
        groups = getattr(attn, "num_key_value_groups", 1)
        weight, bias = self._projections(attn)[index]
        norm = (getattr(attn, "q_norm", None), getattr(attn, "k_norm", None), None)[index]
        per_group = (1, groups, groups)[index]
        if norm is not None:  # a norm over every head's projection: project fully, take own head
            full = norm(F.linear(x, weight, bias)).unflatten(-1, (-1, Dh))  # (B, T, H, heads, Dh)
            heads = torch.arange(H, device=x.device) // per_group
            out = full[:, :, torch.arange(H, device=x.device), heads]
        else:
            w = weight.view(-1, Dh, weight.shape[-1]).repeat_interleave(per_group, 0)  # (H, Dh, D)
            out = torch.einsum("bthd,hed->bthe", x, w)
            if bias is not None:
                out = out + bias.view(-1, Dh).repeat_interleave(per_group, 0)
        return out.transpose(1, 2)  # (B, H, T, Dh)

    def pattern(self, layer: int, q_in: Tensor, k_in: Tensor, context: dict[str, Any]) -> Tensor:
        attn = self.layers[layer].get_submodule(self.spec.attn)
        q, k = self._heads(layer, 0, q_in), self._heads(layer, 1, k_in)
        if "position_embeddings" in context:
            rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb
            q, k = rotary(q, k, *context["position_embeddings"])
        scores = (q @ k.transpose(-1, -2)) * attn.scaling
        mask = context.get("attention_mask")
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        return scores.softmax(-1, dtype=torch.float32).to(q.dtype)

    def values(self, layer: int, v_in: Tensor) -> Tensor:
        return self._heads(layer, 2, v_in)

    def attend(self, layer: int, q_in: Tensor, k_in: Tensor, v_in: Tensor, context: dict[str, Any]) -> Tensor:
        pattern = self.pattern(layer, q_in, k_in, context)
        return (pattern @ self.values(layer, v_in)).transpose(1, 2)  # (B, T, H, Dh)

    def norm_module(self, layer: int | None, where: str) -> nn.Module:
        if where == "final":
            return self.adapter.hf_model.get_submodule(self.spec.final)
        return self.layers[layer].get_submodule(self.spec.norm_attn if where == "attn" else self.spec.norm_mlp)

    def unembed(self, states: Tensor) -> Tensor:
        return self.adapter.hf_model.get_output_embeddings()(states)

    def head_weights(self, layer: int) -> tuple[Tensor, Tensor | None]:
        weight, bias = affine_weights(self.layers[layer].get_submodule(self.spec.o_proj))  # (D, H * Dh)
        return weight.T.reshape(self.n_heads, -1, weight.shape[0]), bias

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        block = self.layers[layer]
        out = block.get_submodule(self.spec.mlp)(block.get_submodule(self.spec.norm_mlp)(x))
        return _first(out)

    def logits(self, resid: Tensor) -> Tensor:
        hf = self.adapter.hf_model
        return hf.get_output_embeddings()(hf.get_submodule(self.spec.final)(resid))
