"""The edge-level forward: a model run in which every receiver reads its own residual input.

A circuit of edges (``intervene.graph``) is evaluated as MIB and EAP-IG's ``evaluate_graph``
do (Hanna et al. 2024; Mueller et al. 2025): on the clean input, each receiver ``r`` (a head's
query, key or value input, an MLP, the logits) reads

    input_r = resid_r + Σ_{s→r ∉ C} (a_s(corrupt) − a_s)

where ``resid_r`` is the residual stream it would read and ``a_s`` the sender's output *in this
same run*, so an edge outside the circuit carries the corrupted (or mean) value and an edge
inside carries what its sender computes here. ``K`` circuits (or single-edge knockouts) run as
``K`` variants stacked into ``K * B`` rows (variant-major), as the engine stacks them.

Senders are recorded compactly (``Record``: the embeddings, each block's per-head outputs before
the output projection, each MLP's output) and widened to the residual stream only where a
computation needs it, so nothing of size (senders × d_model) per position is kept unless a
circuit is patched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from faithful_train.errors import ConfigError
from faithful_train.intervene.graph import Graph
from faithful_train.modeling.interface import GraphParts, block_list, graph_parts
from faithful_train.modeling.sharding import is_shard_unit
from faithful_train.tasks.batch import gather_positions

# edit a sender's output in the run: slot ("input", "a{L}" for the per-head outputs z, "m{L}"), value
SenderEdit = Callable[[str, Tensor], Tensor]
# see a receiver group's input (layer, kind "qkv" / "mlp" / "logits", tensor) e.g. to hook its gradient;
# a hook may be called with the gradient of a part of the group and the index of its first receiver
ReceiverHook = Callable[[int, str, Tensor], None]
RECEIVER_GROUP_BYTES = 64 << 20  # the heads' input gradients before their norm, built this much at a time


def parts_of(model: nn.Module) -> GraphParts:
    """The model's ``GraphParts`` or a one-line error naming what has them."""
    blocks = block_list(model)
    if blocks is not None and any(is_shard_unit(block) for block in blocks):
        raise ConfigError(
            "edge-level circuits call a block's attention and MLP apart, which a sharded (FSDP) block does "
            "not allow; train edge circuits with DDP or one device (audits gather the weights first)"
        )
    parts = graph_parts(model)
    if parts is None:
        raise ConfigError(
            "edge-level circuits need a model taken apart by heads (our transformer or a Hugging Face "
            "gpt2, llama, mixtral, qwen2_moe or olmoe); this model has no graph_parts()"
        )
    return parts


def model_graph(model: nn.Module) -> Graph:
    parts = parts_of(model)
    return Graph(parts.n_layers, parts.n_heads)


@dataclass
class Record:
    """A run's senders, compactly: ``input (N, T, D)``, per block ``z (N, T, H, Dh)`` (head outputs
    before the output projection) and ``mlp (N, T, D)``."""

    input: Tensor
    z: list[Tensor]
    mlp: list[Tensor]

    def map(self, fn: Callable[[Tensor], Tensor]) -> Record:
        return Record(fn(self.input), [fn(z) for z in self.z], [fn(m) for m in self.mlp])

    def minus(self, other: Record) -> Record:
        return Record(
            self.input - other.input,
            [a - b for a, b in zip(self.z, other.z)],
            [a - b for a, b in zip(self.mlp, other.mlp)],
        )

    def wide(self, parts: GraphParts, upto: int | None = None) -> Tensor:
        """The senders in the residual stream ``(N, T, S, D)`` in graph order (the first
        ``upto`` only): a head's output is its ``z`` through its slice of the output projection."""
        pieces = [self.input[:, :, None]]
        for layer, (z, m) in enumerate(zip(self.z, self.mlp)):
            pieces += [head_outputs(parts, layer, z), m[:, :, None]]
        out = torch.cat(pieces, 2)
        return out if upto is None else out[:, :, :upto]


class _NormedReceivers:
    """The heads' query, key and value inputs when they all read one stream ``x``: the norm runs
    once and every head reads a view of its output (so nothing of size 3H x d_model per position
    is kept for the backward, only ``x``). A hook sees what a hook on each receiver's own input
    would: the gradient at the input before the norm, ``(N, T, 3H, D)``, from the gradient at the
    normed views through the norm run again on a copy of ``x`` per receiver, built only while the
    backward passes this layer."""

    def __init__(self, normed: Tensor, norm: Callable[[Tensor], Tensor], x: Tensor):
        self.normed, self.norm, self.x = normed, norm, x

    @property
    def requires_grad(self) -> bool:
        return self.normed.requires_grad

    def register_hook(self, hook: Callable[..., None]) -> None:
        def before_norm(grad: Tensor) -> None:
            # a few receivers at a time (a copy of x, the norm's intermediates and its gradient
            # for each): the hook gets each group with the index of its first receiver
            size = max(1, RECEIVER_GROUP_BYTES // (4 * self.x.numel() * self.x.element_size()))
            for first in range(0, grad.shape[2], size):
                part = grad[:, :, first : first + size]
                with torch.enable_grad():  # the norm again, on a copy of x per receiver
                    x = self.x.detach()[:, :, None].repeat(1, 1, part.shape[2], 1).requires_grad_(True)
                    (before,) = torch.autograd.grad(self.norm(x), x, part)
                hook(before, first)

        self.normed.register_hook(before_norm)


def head_outputs(parts: GraphParts, layer: int, z: Tensor) -> Tensor:
    """``(N, T, H, D)``: each head's output in the residual stream (no bias)."""
    weight, _ = parts.head_weights(layer)
    return torch.einsum("nthe,hed->nthd", z, weight.to(z.dtype))


def graph_forward(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    read: Tensor,
    *,
    missing: Tensor | None = None,
    corrupt: Tensor | None = None,
    record: bool = False,
    edit_sender: SenderEdit | None = None,
    on_receivers: ReceiverHook | None = None,
    variants: int = 1,
    resume: tuple[int, Record] | None = None,
) -> tuple[Tensor, Record | None]:
    """Logits ``(K * B, P, vocab)`` at ``read (B, P)`` of ``K = variants`` runs of ``input_ids (B, T)``.

    ``missing (K, S, R)``: 1 where an edge is left out of variant ``k``'s circuit (it carries
    ``corrupt (1 or B, 1 or T, S, D)``, the senders' corrupted outputs in the residual stream;
    fractions interpolate). Without ``missing`` every edge is in (the model itself, computed
    head by head). ``record``: also return the senders of every row. ``edit_sender`` rewrites a
    sender's output as it is computed; ``on_receivers`` sees each receiver group's input.
    ``resume (layer, clean)``: no edit reaches blocks below ``layer``; start there from the clean
    run's senders ``clean`` (a ``Record`` of the same batch) instead of running them again."""
    parts = parts_of(model)
    graph = Graph(parts.n_layers, parts.n_heads)
    H, K = parts.n_heads, variants
    B, T = input_ids.shape
    mask = None if attention_mask is None else attention_mask.repeat(K, 1)
    resid = parts.embed(input_ids, attention_mask)
    if edit_sender is not None:
        resid = edit_sender("input", resid.repeat(K, 1, 1))
    elif K > 1:
        resid = resid.repeat(K, 1, 1)
    contexts = parts.contexts(resid, mask)
    kept = Record(resid, [], [])
    senders: list[Tensor] = [resid[:, :, None]] if missing is not None else []
    first = 0
    if resume is not None and resume[0] > 0:
        first, clean = resume
        if record or edit_sender is not None:
            raise ValueError("a resumed edge-level forward neither records nor edits senders")
        resid = clean.input
        for layer in range(first):
            heads = head_outputs(parts, layer, clean.z[layer])
            bias = parts.head_weights(layer)[1]
            resid = resid + (heads.sum(2) if bias is None else heads.sum(2) + bias)
            resid = resid + clean.mlp[layer]
            if missing is not None:
                senders += [heads.repeat(K, 1, 1, 1), clean.mlp[layer][:, :, None].repeat(K, 1, 1, 1)]
        resid = resid.repeat(K, 1, 1)
        if missing is not None:
            senders[0] = clean.input[:, :, None].repeat(K, 1, 1, 1)

    def patched(x: Tensor, receivers: slice) -> Tensor:
        """``x (KB, T, D)`` as the receivers ``receivers`` read it: ``(KB, T, R, D)``."""
        count = receivers.stop - receivers.start
        if missing is None:
            return x[:, :, None].expand(-1, -1, count, -1)
        current = torch.cat(senders, 2)  # (KB, T, n, D)
        n = current.shape[2]
        gone = missing[:, :n, receivers].to(x.dtype)  # (K, n, R)
        delta = corrupt[:, :, :n].to(x.dtype)[None] - current.view(K, B, T, n, -1)
        update = torch.einsum("kbtnd,knr->kbtrd", delta, gone).reshape(K * B, T, count, -1)
        return x[:, :, None] + update

    for layer in range(first, parts.n_layers):
        start = graph.receiver_index(f"a{layer}.h0", "q")
        if missing is None:  # every head reads the same stream: one norm, seen 3H times
            normed = parts.attn_norm(layer, resid)[:, :, None].expand(-1, -1, 3 * H, -1)
            if on_receivers is not None:
                on_receivers(layer, "qkv", _NormedReceivers(normed, partial(parts.attn_norm, layer), resid))
        else:
            inputs = patched(resid, slice(start, start + 3 * H))
            if on_receivers is not None:
                on_receivers(layer, "qkv", inputs)
            normed = parts.attn_norm(layer, inputs)
        q_in, k_in, v_in = normed.split(H, dim=2)
        z = parts.attend(layer, q_in, k_in, v_in, contexts[layer])
        if edit_sender is not None:
            z = edit_sender(f"a{layer}", z)
        weight, bias = parts.head_weights(layer)
        if missing is not None:
            heads = torch.einsum("nthe,hed->nthd", z, weight.to(z.dtype))
            senders.append(heads)
            attended = heads.sum(2)
        else:
            attended = z.flatten(2) @ weight.flatten(0, 1).to(z.dtype)
        resid = resid + (attended if bias is None else attended + bias)
        inputs = patched(resid, slice(start + 3 * H, start + 3 * H + 1))
        if on_receivers is not None:
            on_receivers(layer, "mlp", inputs)
        out = parts.mlp(layer, inputs[:, :, 0])
        if edit_sender is not None:
            out = edit_sender(f"m{layer}", out)
        if missing is not None:
            senders.append(out[:, :, None])
        resid = resid + out
        if record:
            kept.z.append(z)
            kept.mlp.append(out)
    final = patched(resid, slice(graph.n_receivers - 1, graph.n_receivers))
    if on_receivers is not None:
        on_receivers(parts.n_layers, "logits", final)
    logits = parts.logits(gather_positions(final[:, :, 0], read.repeat(K, 1)))
    return logits, (kept if record else None)
