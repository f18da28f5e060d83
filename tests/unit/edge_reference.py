"""An independent reference for edge-level patching and attribution: the model's own forward
(not the edge-level one), one run per edge, with plain PyTorch hooks on its modules.

Knocking out one edge ``s->r`` changes only receiver ``r``'s input, by ``a_s(corrupt) - a_s``;
``s`` lies upstream of ``r`` and is unchanged, so ``a_s`` is its clean output. The receiver's
input is reached through the module that reads it: a head's query/key/value slice of the fused
(``qkv``, ``c_attn``) or separate (``q_proj``...) projection recomputed from the edited input
through the block's norm; the MLP's norm (a pre-hook adds to its input only, the residual that
skips it is untouched); the final norm for ``logits``. Sender outputs come from the sites
(``embed``, ``blocks.i.attn.heads`` through the output projection one head at a time, minus its
bias; ``blocks.i.mlp.out``). Attribution is the derivative of the metric along ``eps`` in
``input_r + eps * (a_s(corrupt) - a_s(clean))`` at ``eps = 0``, by autograd on the scalar.
"""

from __future__ import annotations

import torch
from torch import nn

from faithful_train.intervene.sites import hooked
from faithful_train.modeling.hf import HFAdapter
from faithful_train.tasks.batch import answer_positions


def _modules(model, layer):
    """(block, attention norm, projection(s) kind, projection modules, mlp norm, head dim)."""
    if isinstance(model, HFAdapter):
        block = model.decoder_layers()[layer]
        if model.family == "gpt2":
            return (
                block.ln_1,
                "fused",
                [block.attn.c_attn],
                block.ln_2,
                block.attn.c_proj,
                model.hf_model.transformer.ln_f,
            )
        attn = block.self_attn
        return (
            block.input_layernorm,
            "split",
            [attn.q_proj, attn.k_proj, attn.v_proj],
            block.post_attention_layernorm,
            attn.o_proj,
            model.hf_model.model.norm,
        )
    block = model.blocks[layer]
    return block.ln1, "fused", [block.attn.qkv], block.ln2, block.attn.proj, model.ln_f


def sender_outputs(model, input_ids, mask, n_heads):
    """``{sender name: (B, T, D)}`` of a plain forward."""
    layers = model.n_layers
    sites = ["embed"] + [f"blocks.{i}.{s}" for i in range(layers) for s in ("attn.heads", "mlp.out")]
    with torch.no_grad(), hooked(model, record=sites) as cache:
        model(input_ids, attention_mask=mask)
    out = {"input": cache["embed"]}
    for i in range(layers):
        proj = _modules(model, i)[4]
        z = cache[f"blocks.{i}.attn.heads"]
        zero = proj(torch.zeros_like(z.flatten(2)))
        for h in range(n_heads):
            only = torch.zeros_like(z)
            only[:, :, h] = z[:, :, h]
            out[f"a{i}.h{h}"] = proj(only.flatten(2)) - zero
        out[f"m{i}"] = cache[f"blocks.{i}.mlp.out"]
    return out


def _receiver_hooks(model, receiver, delta):
    """Hooks adding ``delta (B, T, D)`` to ``receiver``'s input alone; returns handles."""
    handles = []
    if receiver == "logits":
        final = _modules(model, 0)[5]
        handles.append(final.register_forward_pre_hook(lambda _m, args: (args[0] + delta, *args[1:])))
        return handles
    name, _, qkv = receiver.partition("<")
    if name.startswith("m"):
        norm = _modules(model, int(name[1:]))[3]
        handles.append(norm.register_forward_pre_hook(lambda _m, args: (args[0] + delta, *args[1:])))
        return handles
    layer, head = (int(x) for x in name[1:].split(".h"))
    which = "qkv".index(qkv[0])
    norm, kind, projections, *_ = _modules(model, layer)
    seen = {}
    handles.append(norm.register_forward_pre_hook(lambda _m, args: seen.update(x=args[0])))
    if kind == "fused":
        proj = projections[0]
        width, d_head = seen_width(model), head_dim(model)

        def edit(_m, _args, out):
            new = proj.forward(norm_only(norm, seen["x"] + delta))
            lo = which * width + head * d_head
            out = out.clone()
            out[..., lo : lo + d_head] = new[..., lo : lo + d_head]
            return out

        handles.append(proj.register_forward_hook(edit))
    else:
        proj = projections[which]
        d_head = head_dim(model)

        def edit(_m, _args, out):
            new = proj.forward(norm_only(norm, seen["x"] + delta))
            out = out.clone()
            out[..., head * d_head : (head + 1) * d_head] = new[..., head * d_head : (head + 1) * d_head]
            return out

        handles.append(proj.register_forward_hook(edit))
    return handles


def norm_only(norm, x):
    """The norm applied without firing its hooks (our pre-hook would see the edited input)."""
    return norm.forward(x)


def seen_width(model):
    return model.hf_model.config.hidden_size if isinstance(model, HFAdapter) else model.cfg.d_model


def model_heads(model):
    return model.hf_model.config.num_attention_heads if isinstance(model, HFAdapter) else model.cfg.n_heads


def head_dim(model):
    return seen_width(model) // model_heads(model)


def _differences(model, batch, corrupted):
    """``{sender: a(corrupt) - a(clean)}`` and the first answer positions ``(B, 1)``."""
    heads = model_heads(model)
    clean = sender_outputs(model, batch["input_ids"], batch.get("attention_mask"), heads)
    bad = sender_outputs(model, corrupted["input_ids"], corrupted.get("attention_mask"), heads)
    return {name: bad[name] - clean[name] for name in clean}, answer_positions(batch)[:, :1]


def knockout_logits(model, batch, corrupted, edges):
    """``(E, B, vocab)``: one hooked forward per edge ``(sender, receiver)`` names, the receiver
    reading the corrupted sender."""
    mask = batch.get("attention_mask")
    delta, read = _differences(model, batch, corrupted)
    out = []
    for sender, receiver in edges:
        handles = _receiver_hooks(model, receiver, delta[sender])
        try:
            with torch.no_grad():
                out.append(model(batch["input_ids"], attention_mask=mask, positions=read, narrow=False)[:, 0])
        finally:
            for h in handles:
                h.remove()
    return torch.stack(out)


def attribution(model, batch, corrupted, edges, metric, embeddings=None, during=None):
    """``(E,)`` per edge: d/deps of ``metric(logits).sum()`` at eps = 0 with the receiver's input
    moved by ``eps * (a_s(corrupt) - a_s(clean))``; ``embeddings (B, T, D)`` replaces the input
    embeddings (EAP-IG's interpolated inputs); ``during()`` registers more hooks for the metric's
    runs only (not the senders' recording) and returns their handles."""
    mask = batch.get("attention_mask")
    delta, read = _differences(model, batch, corrupted)
    out = []
    for sender, receiver in edges:
        eps = torch.zeros((), requires_grad=True)
        handles = _receiver_hooks(model, receiver, eps * delta[sender])
        if embeddings is not None:
            handles.append(_embed_module(model).register_forward_hook(lambda _m, _a, _o: embeddings))
        if during is not None:
            handles += during()
        try:
            logits = model(batch["input_ids"], attention_mask=mask, positions=read, narrow=False)
            value = metric(logits[:, 0][None]).sum()
            (grad,) = torch.autograd.grad(value, eps, allow_unused=True)  # None: a replaced sender cuts the path
            out.append(torch.zeros(()) if grad is None else grad)
        finally:
            for h in handles:
                h.remove()
    return torch.stack(out)


def _embed_module(model) -> nn.Module:
    return model.site_points()["embed"].module
