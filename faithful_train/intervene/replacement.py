"""The replacement model of one prompt (Ameisen et al. 2025, "Circuit tracing"; circuit-tracer's
``ReplacementModel``): every MLP replaced by its transcoder plus an error term,

    mlp.out_l = z_l W_dec,l + b_dec,l + error_l,    error_l = mlp.out_l(true) − (z_l W_dec,l + b_dec,l)

with attention patterns and norm scales frozen at the prompt's values, so that the residual
stream is affine in the features, the error terms and the token embeddings: every node's effect
on every later node's input is a fixed linear map, computed by backward passes.

``prompt_state`` runs the prompt once through the model's ``GraphParts`` (our transformer and
the Hugging Face families) and keeps what the frozen forward needs: residual streams (the norm
scales' references), attention patterns, MLP inputs and outputs, the transcoders' latents,
reconstructions and errors. ``linear_forward`` runs the frozen model on ``rows`` copies of the
prompt (one per backward target), the MLP outputs constant (``live=False``: features are nodes,
so attribution stops there) or recomputed from the transcoders with the prompt's active set
fixed (``live=True``: the linearised replacement model, whose gradients are total effects).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from faithful_train.errors import ConfigError
from faithful_train.intervene.edges import parts_of
from faithful_train.intervene.transcoders import Transcoders
from faithful_train.modeling.affine import frozen_norm
from faithful_train.modeling.interface import GraphParts, context_length


@dataclass
class PromptState:
    """One prompt ``(1, T)`` through the replacement model, at its clean values."""

    parts: GraphParts
    transcoders: Transcoders
    input_ids: Tensor
    embed: Tensor  # (1, T, D)
    resid_pre: list[Tensor]  # (1, T, D) entering each block: the attention norm's reference
    resid_mid: list[Tensor]  # (1, T, D) before each MLP: the MLP norm's reference
    resid_final: Tensor  # (1, T, D): the final norm's reference
    patterns: list[Tensor]  # (1, H, T, T)
    mlp_in: list[Tensor]  # (1, T, D)
    mlp_out: list[Tensor]  # (1, T, D), the true MLP outputs
    latents: list[Tensor]  # (T, F) the transcoders' latents
    reconstruction: list[Tensor]  # (T, D)
    logits: Tensor  # (T, vocab), the model's

    @property
    def n_layers(self) -> int:
        return len(self.mlp_out)

    @property
    def n_pos(self) -> int:
        return self.input_ids.shape[1]

    def error(self, layer: int) -> Tensor:
        """``(T, D)``: the true MLP output minus the transcoder's reconstruction."""
        return self.mlp_out[layer][0].float() - self.reconstruction[layer]


def check_transcoders(model: nn.Module, transcoders: Transcoders, where: str = "transcoders") -> GraphParts:
    """The model's parts, with a one-line error if a layer has no transcoder."""
    parts = parts_of(model)
    missing = sorted(set(range(parts.n_layers)) - set(transcoders.layers))
    if missing:
        raise ConfigError(
            f"{where}: a replacement model needs a transcoder at every layer; none at layers {missing} "
            "(train them with an sae objective with layers: all)"
        )
    return parts


@torch.no_grad()
def prompt_state(model: nn.Module, transcoders: Transcoders, input_ids: Tensor) -> PromptState:
    """The prompt's clean run through ``model``'s parts, with every transcoder read beside it."""
    parts = check_transcoders(model, transcoders)
    H = parts.n_heads
    resid = parts.embed(input_ids, None)
    contexts = parts.contexts(resid, None)
    state = PromptState(parts, transcoders, input_ids, resid, [], [], resid, [], [], [], [], [], resid)
    for layer in range(parts.n_layers):
        state.resid_pre.append(resid)
        normed = parts.attn_norm(layer, resid)[:, :, None].expand(-1, -1, H, -1)
        pattern = parts.pattern(layer, normed, normed, contexts[layer])
        z = (pattern @ parts.values(layer, normed)).transpose(1, 2)
        weight, bias = parts.head_weights(layer)
        attended = z.flatten(2) @ weight.flatten(0, 1).to(z.dtype)
        resid = resid + (attended if bias is None else attended + bias)
        state.resid_mid.append(resid)
        state.patterns.append(pattern)
        mlp_in = parts.norm_module(layer, "mlp")(resid)
        out = parts.mlp(layer, resid)
        sae = transcoders.at(layer)
        latents = sae.encode(mlp_in[0])
        state.mlp_in.append(mlp_in)
        state.mlp_out.append(out)
        state.latents.append(latents)
        state.reconstruction.append(sae.decode(latents))
        resid = resid + out
    state.resid_final = resid
    state.logits = parts.logits(resid)[0].float()
    return state


@dataclass
class LinearRun:
    """A frozen forward on ``rows`` copies: the embeddings (a leaf), each block's MLP input, the
    residual stream right after each block's MLP output is added (where features and error
    terms write), and the final-normed states (when every block ran)."""

    embed: Tensor
    mlp_in: list[Tensor]
    written: list[Tensor]
    final: Tensor | None


def linear_forward(state: PromptState, rows: int, positions: int, blocks: int, live: bool = False) -> LinearRun:
    """The replacement model with frozen patterns and norm scales on the first ``positions``
    tokens, ``blocks`` blocks deep (all of them: also the final norm). ``live``: each MLP output
    is ``(mlp_in W_enc + b_enc) * active W_dec + b_dec + error`` (the prompt's active latents
    fixed), so gradients carry every path through features; otherwise it is a constant."""
    parts, P = state.parts, positions
    H = parts.n_heads
    embed = state.embed[:, :P].detach().expand(rows, -1, -1).clone().requires_grad_(True)
    resid = embed
    mlp_ins, written = [], []
    for layer in range(blocks):
        normed = frozen_norm(parts.norm_module(layer, "attn"), resid, state.resid_pre[layer][:, :P])
        values = parts.values(layer, normed[:, :, None].expand(-1, -1, H, -1))
        # one product per head over every copy (the pattern is shared): (H, q, k) x (B, H, k, Dh)
        z = torch.einsum("hqk,bhkd->bqhd", state.patterns[layer][0, :, :P, :P].to(values.dtype), values)
        weight, bias = parts.head_weights(layer)
        attended = z.flatten(2) @ weight.flatten(0, 1).to(z.dtype)
        resid = resid + (attended if bias is None else attended + bias)
        mlp_in = frozen_norm(parts.norm_module(layer, "mlp"), resid, state.resid_mid[layer][:, :P])
        mlp_ins.append(mlp_in)
        if live:
            sae = state.transcoders.at(layer)
            active = (state.latents[layer][:P] > 0).to(mlp_in.dtype)
            pre = mlp_in.float() @ sae.encoder.weight.T + sae.encoder.bias
            out = (pre * active) @ sae.W_dec + sae.b_dec + state.error(layer)[:P]
        else:
            out = state.mlp_out[layer][:, :P].detach()
        resid = resid + out.to(resid.dtype)
        written.append(resid)
    final = None
    if blocks == parts.n_layers:
        final = frozen_norm(parts.norm_module(None, "final"), resid, state.resid_final[:, :P])
    return LinearRun(embed, mlp_ins, written, final)


def replacement_logits(state: PromptState, live: bool = True) -> Tensor:
    """``(T, vocab)`` logits of the replacement model with error terms on the prompt (equal to
    the model's: the check that the replacement is exact)."""
    with torch.no_grad():
        run = linear_forward(state, 1, state.n_pos, state.n_layers, live=live)
        return state.parts.unembed(run.final)[0].float()


def demeaned_unembedding(parts: GraphParts, tokens: Tensor, width: int, like: Tensor) -> Tensor:
    """``(k, D)``: ``W_U[:, t] − mean_v W_U[:, v]`` for each token ``t``, the direction whose dot
    product with the final-normed state is the token's logit minus the mean logit (the logit
    target of circuit-tracer), read through the unembedding by autograd (tied or not)."""
    with torch.enable_grad():
        probe = torch.zeros(len(tokens), width, dtype=like.dtype, device=like.device, requires_grad=True)
        logits = parts.unembed(probe).float()
        value = (logits.gather(1, tokens[:, None].to(logits.device)) - logits.mean(-1, keepdim=True)).sum()
        (grad,) = torch.autograd.grad(value, probe)
    return grad.detach().float()


def prompt_too_long(model: nn.Module, input_ids: Tensor) -> None:
    """A one-line error if the prompt is longer than the model's context."""
    limit = context_length(model)
    if limit is not None and input_ids.shape[1] > limit:
        raise ConfigError(f"prompt: {input_ids.shape[1]} tokens; the model's context is {limit}")
