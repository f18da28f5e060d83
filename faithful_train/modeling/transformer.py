"""Our decoder-only transformer, dense or mixture-of-experts, in the spirit of nanoGPT.

Pre-norm GPT blocks. Every interesting activation passes through a ``HookPoint`` and is a
canonical site (see ``site_points``):

    embed                      (B, T, D)   token + position embedding
    blocks.{i}.resid_pre       (B, T, D)
    blocks.{i}.attn.pattern    (B, H, T, T)  attention probabilities (query, key); computed
                                             explicitly only when recorded or edited
    blocks.{i}.attn.heads      (B, T, H, Dh) per-head outputs, before the output projection
    blocks.{i}.attn.out        (B, T, D)
    blocks.{i}.resid_mid       (B, T, D)
    blocks.{i}.mlp.in          (B, T, D)   the feed-forward sublayer's input (after ln2): what a
                                           transcoder reads
    blocks.{i}.mlp.out         (B, T, D)   the feed-forward sublayer (dense MLP or MoE)
    blocks.{i}.moe.router      (B, T, E)   raw router logits (MoE only)
    blocks.{i}.moe.weights     (B, T, E)   routing weights, zero off the top-k (MoE only)
    blocks.{i}.resid_post      (B, T, D)
    final                      (B, T, D)   after the final norm

Patching ``moe.router`` changes which experts are chosen; patching ``moe.weights`` forces
routing directly (a zero column masks an expert).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from faithful_train.modeling.affine import affine_weights
from faithful_train.modeling.checkpointing import checkpoint_block, should_checkpoint
from faithful_train.modeling.hooks import HookPoint, SitePoint
from faithful_train.tasks.batch import gather_positions, position_ids


@dataclass
class TransformerConfig:
    vocab_size: int
    max_seq_len: int = 64
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_mlp: int = 256
    n_experts: int = 0  # 0: dense MLP; >0: mixture of experts in every block
    top_k: int = 2
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads", "d_mlp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_experts < 0:
            raise ValueError(f"n_experts must be >= 0 (0: a dense MLP), got {self.n_experts}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} must be divisible by n_heads {self.n_heads}")
        if self.n_experts and not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k {self.top_k} must be in [1, n_experts={self.n_experts}]")


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.hook_pattern = HookPoint()
        self.hook_heads = HookPoint()
        self.hook_out = HookPoint()

    def forward(self, x: Tensor, mask: Tensor | None = None, positions: Tensor | None = None) -> Tensor:
        """``mask`` (B, T): 1 on real tokens (padding is never attended to). ``positions`` (B, P):
        compute only these query positions (each attends causally to the tokens up to it);
        returns ``(B, P, D)`` then, else ``(B, T, D)``.

        Attention stays fused (``scaled_dot_product_attention``) unless the pattern site
        (``hook_pattern``) is recorded or edited; then the pattern ``(B, H, T or P, T)`` is
        computed explicitly, passed through the hook, and applied to the values."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.d_head).unbind(dim=2)  # (B, T, H, Dh) each
        if positions is not None:
            q = gather_positions(q, positions)
        if self.hook_pattern._forward_hooks or self.hook_pattern._forward_pre_hooks:
            scores = q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2) / math.sqrt(self.d_head)
            allowed = allowed_keys(mask, positions, B, T, x.device)
            pattern = self.hook_pattern(scores.masked_fill(~allowed, float("-inf")).softmax(-1))
            z = pattern @ v.transpose(1, 2)
        elif mask is None and positions is None:
            z = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        else:
            z = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                attn_mask=allowed_keys(mask, positions, B, T, x.device),
            )
        z = self.hook_heads(z.transpose(1, 2))  # (B, T or P, H, Dh)
        return self.hook_out(self.proj(z.reshape(B, q.shape[1], D)))


def allowed_keys(mask: Tensor | None, positions: Tensor | None, B: int, T: int, device: torch.device) -> Tensor:
    """``(B, 1, P, T)`` boolean: query ``p`` attends to keys at or before it that are real tokens,
    and always to itself (a padding query then has one key, not none: finite, never read)."""
    keys = torch.arange(T, device=device)
    queries = keys[None].expand(B, T) if positions is None else positions
    causal = keys[None, None, :] <= queries[:, :, None]
    allowed = causal if mask is None else causal & mask.bool()[:, None, :]
    return (allowed | (keys[None, None, :] == queries[:, :, None]))[:, None]


class MLP(nn.Module):
    def __init__(self, d_model: int, d_mlp: int):
        super().__init__()
        self.up = nn.Linear(d_model, d_mlp)
        self.down = nn.Linear(d_mlp, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))


class MoE(nn.Module):
    """Top-k mixture of experts (Mixtral routing: softmax, top-k, renormalise).

    ``selection_bias`` (a buffer, zero unless the router objective's bias balancing moves it)
    is added to the logits only to choose the top-k experts; their weights come from the
    unbiased probabilities (DeepSeek-V3's auxiliary-loss-free balancing).
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.top_k
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(cfg.d_model, cfg.d_mlp) for _ in range(cfg.n_experts))
        self.hook_router = HookPoint()
        self.hook_weights = HookPoint()
        self.register_buffer("selection_bias", torch.zeros(cfg.n_experts))

    def routing_weights(self, logits: Tensor) -> Tensor:
        """(B, T, E) weights: softmax over experts, keep the top-k (of logits + selection bias),
        renormalise them to sum 1."""
        probs = logits.float().softmax(dim=-1)
        idx = (logits.float() + self.selection_bias).topk(self.top_k, dim=-1).indices
        top = probs.gather(-1, idx)
        return torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True)).to(logits.dtype)

    def forward(self, x: Tensor) -> Tensor:
        logits = self.hook_router(self.router(x))  # (B, T, E)
        weights = self.hook_weights(self.routing_weights(logits))  # (B, T, E)
        flat_x, flat_w = x.reshape(-1, x.shape[-1]), weights.reshape(-1, self.n_experts)
        out = torch.zeros_like(flat_x)
        for e, expert in enumerate(self.experts):
            rows = flat_w[:, e].nonzero(as_tuple=True)[0]  # tokens routed to expert e
            # an expert with no tokens still runs (on zero rows), so it gets a (zero) gradient:
            # DDP needs every parameter in every step's graph
            out = out.index_add(
                0, rows, (expert(flat_x[rows]) * flat_w[rows, e, None]).to(out.dtype)
            )  # autocast: bf16 experts
        return out.view_as(x)


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.mlp = MoE(cfg) if cfg.n_experts else MLP(cfg.d_model, cfg.d_mlp)
        self.hook_resid_pre, self.hook_resid_mid = HookPoint(), HookPoint()
        self.hook_mlp_in, self.hook_mlp_out, self.hook_resid_post = HookPoint(), HookPoint(), HookPoint()
        self.activation_checkpointing = False

    def forward(self, x: Tensor, mask: Tensor | None = None, positions: Tensor | None = None) -> Tensor:
        """``positions`` (B, P): this block computes only those positions (the last block of a
        forward whose caller reads only them); its sites past ``resid_pre`` then have P positions.

        With activation checkpointing the body runs under ``checkpoint_block`` (hooks on the
        block itself, e.g. a sharding wrapper's, stay outside it, as ``transformers`` keeps them)."""
        if should_checkpoint(self, self.activation_checkpointing):
            return checkpoint_block(self, self._forward, x, mask, positions)
        return self._forward(x, mask, positions)

    def _forward(self, x: Tensor, mask: Tensor | None, positions: Tensor | None) -> Tensor:
        x = self.hook_resid_pre(x)
        attended = self.attn(self.ln1(x), mask, positions)
        x = self.hook_resid_mid((x if positions is None else gather_positions(x, positions)) + attended)
        return self.hook_resid_post(x + self.hook_mlp_out(self.mlp(self.hook_mlp_in(self.ln2(x)))))

    def site_points(self) -> dict[str, SitePoint]:
        points = {
            "resid_pre": self.hook_resid_pre,
            "attn.pattern": self.attn.hook_pattern,
            "attn.heads": self.attn.hook_heads,
            "attn.out": self.attn.hook_out,
            "resid_mid": self.hook_resid_mid,
            "mlp.in": self.hook_mlp_in,
            "mlp.out": self.hook_mlp_out,
            "resid_post": self.hook_resid_post,
        }
        if isinstance(self.mlp, MoE):
            points |= {"moe.router": self.mlp.hook_router, "moe.weights": self.mlp.hook_weights}
        return {name: SitePoint(module) for name, module in points.items()}


class Transformer(nn.Module):
    """Decoder-only transformer returning next-token logits ``(B, T, vocab)``."""

    per_token_logits = True  # next-token logits at every position (a bottleneck's are not)

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.unembed = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.unembed.weight = self.tok_emb.weight
        self.hook_embed, self.hook_final = HookPoint(), HookPoint()
        self.activation_checkpointing = False
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith(("attn.proj.weight", "down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def n_layers(self) -> int:
        return self.cfg.n_layers

    def embed(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Token + position embeddings; positions count real tokens only, so padding (left or
        right) does not move an example's positions."""
        T = input_ids.shape[1]
        if T > self.cfg.max_seq_len:  # padding may run past the position table; real tokens may not
            longest = T if attention_mask is None else int(attention_mask.sum(1).max())
            if longest > self.cfg.max_seq_len:
                raise ValueError(f"sequence length {longest} exceeds max_seq_len {self.cfg.max_seq_len}")
        return self.hook_embed(
            self.tok_emb(input_ids) + self.pos_emb(position_ids(attention_mask, T, input_ids.device))
        )

    def enable_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them
        (``modeling.checkpointing``: edits act the same in the recomputation, records once)."""
        self.activation_checkpointing = enabled
        for block in self.blocks:
            block.activation_checkpointing = enabled

    def forward_to(self, layer: int, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The residual stream entering block ``layer`` (``blocks.{layer}.resid_pre``): the clean
        prefix a resumed forward starts from."""
        return self.run_layers(0, layer, self.embed(input_ids, attention_mask), attention_mask)

    def run_layers(self, start: int, stop: int, resid: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Blocks ``start .. stop - 1`` on the residual stream entering block ``start``."""
        for block in self.blocks[start:stop]:
            resid = block(resid, attention_mask)
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
        """Resume the forward pass at block ``layer`` from its input residual stream.

        ``positions`` (B, P): the caller needs only these positions' logits ``(B, P, vocab)``.
        With ``narrow`` the last block computes only them (every site of the last block but
        ``resid_pre``, and ``final``, then has P positions); without, every position runs (and
        ``final`` has them all) and only the unembedding is taken at ``positions``. ``last_only``:
        the last position of every row.
        """
        if last_only and positions is None:
            positions = torch.full((resid.shape[0], 1), resid.shape[1] - 1, dtype=torch.long, device=resid.device)
        last = self.cfg.n_layers - 1
        for i in range(layer, self.cfg.n_layers):
            resid = self.blocks[i](resid, attention_mask, positions if narrow and i == last else None)
        final = self.hook_final(self.ln_f(resid))  # every position unless the last block was narrowed
        if positions is not None and not (narrow and layer <= last):
            final = gather_positions(final, positions)
        return self.unembed(final)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        positions: Tensor | None = None,
        narrow: bool = True,
    ) -> Tensor:
        """Next-token logits ``(B, T, vocab)``, or ``(B, P, vocab)`` at ``positions`` only.
        ``attention_mask`` (B, T): 1 on real tokens; an example's logits do not depend on its padding."""
        return self.forward_from(0, self.embed(input_ids, attention_mask), attention_mask, positions, narrow)

    def moe_layers(self) -> dict[int, tuple[int, int]]:
        """``{layer: (n_experts, top_k)}`` of the mixture-of-experts blocks."""
        return {i: (b.mlp.n_experts, b.mlp.top_k) for i, b in enumerate(self.blocks) if isinstance(b.mlp, MoE)}

    def selection_bias(self, layer: int) -> Tensor:
        """The per-expert bias buffer that steers top-k selection in MoE block ``layer``."""
        return self.blocks[layer].mlp.selection_bias

    def graph_parts(self) -> TransformerGraphParts:
        """The blocks taken apart for edge-level forwards (``modeling.interface.GraphParts``)."""
        return TransformerGraphParts(self)

    def site_points(self) -> dict[str, SitePoint]:
        points = {"embed": SitePoint(self.hook_embed), "final": SitePoint(self.hook_final)}
        for i, block in enumerate(self.blocks):
            points |= {f"blocks.{i}.{name}": p for name, p in block.site_points().items()}
        return points


class TransformerGraphParts:
    """``GraphParts`` of our transformer: each head's query, key and value from its own input,
    through the block's ``ln1`` and its slice of the fused ``qkv`` projection."""

    def __init__(self, model: Transformer):
        self.model = model
        self.n_layers, self.n_heads = model.cfg.n_layers, model.cfg.n_heads

    def embed(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        return self.model.embed(input_ids, attention_mask)

    def contexts(self, resid: Tensor, attention_mask: Tensor | None) -> list[Tensor]:
        B, T = resid.shape[:2]
        allowed = allowed_keys(attention_mask, None, B, T, resid.device)
        return [allowed] * self.n_layers

    def attn_norm(self, layer: int, x: Tensor) -> Tensor:
        return self.model.blocks[layer].ln1(x)

    def attend(self, layer: int, q_in: Tensor, k_in: Tensor, v_in: Tensor, context: Tensor) -> Tensor:
        attn = self.model.blocks[layer].attn
        H, Dh = attn.n_heads, attn.d_head
        weight, bias = affine_weights(attn.qkv)
        weight, bias = weight.reshape(3, H, Dh, -1), bias.reshape(3, H, Dh)
        q, k, v = (
            torch.einsum("bthd,hed->bhte", x, weight[i]) + bias[i][None, :, None]
            for i, x in enumerate((q_in, k_in, v_in))
        )
        z = F.scaled_dot_product_attention(q, k, v, attn_mask=context)
        return z.transpose(1, 2)

    def _qkv(self, layer: int, index: int, x: Tensor) -> Tensor:
        """Query (0), key (1) or value (2) per head ``(B, H, T, Dh)`` from inputs ``(B, T, H, D)``."""
        attn = self.model.blocks[layer].attn
        weight, bias = affine_weights(attn.qkv)
        weight, bias = weight.reshape(3, attn.n_heads, attn.d_head, -1), bias.reshape(3, attn.n_heads, attn.d_head)
        return torch.einsum("bthd,hed->bhte", x, weight[index]) + bias[index][None, :, None]

    def pattern(self, layer: int, q_in: Tensor, k_in: Tensor, context: Tensor) -> Tensor:
        q, k = self._qkv(layer, 0, q_in), self._qkv(layer, 1, k_in)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if context is not None:
            scores = scores.masked_fill(~context, float("-inf"))
        return scores.softmax(-1)

    def values(self, layer: int, v_in: Tensor) -> Tensor:
        return self._qkv(layer, 2, v_in)

    def norm_module(self, layer: int | None, where: str) -> nn.Module:
        if where == "final":
            return self.model.ln_f
        return self.model.blocks[layer].ln1 if where == "attn" else self.model.blocks[layer].ln2

    def unembed(self, states: Tensor) -> Tensor:
        return self.model.unembed(states)

    def head_weights(self, layer: int) -> tuple[Tensor, Tensor | None]:
        weight, bias = affine_weights(self.model.blocks[layer].attn.proj)
        return weight.T.reshape(self.n_heads, -1, weight.shape[0]), bias

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        block = self.model.blocks[layer]
        return block.mlp(block.ln2(x))

    def logits(self, resid: Tensor) -> Tensor:
        return self.model.unembed(self.model.ln_f(resid))
