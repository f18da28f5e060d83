"""Attribution graphs over transcoder features (Ameisen et al. 2025, "Circuit tracing: revealing
computational graphs in language models"; circuit-tracer's ``attribute``).

Nodes, in circuit-tracer's order: active features ``(layer, position, feature)``, error nodes
``(layer, position)`` (layer-major), token embeddings (one per position), and the top logits of
the last position (the fewest, at most ``max_n_logits``, whose probabilities reach
``desired_logit_prob``). In the replacement model (``intervene.replacement``) the input of every
target is linear in the sources, so the edge weight is the direct effect

    A[t, s] = a_s · (∂ v_t / ∂ r_{l_s, p_s}) · d_s

with ``v_t`` the target's value (a feature's pre-activation ``W_enc[f] · mlp_in``, or a logit
minus the mean logit through the frozen final norm), ``r_{l, p}`` the residual stream where
block ``l``'s MLP output is added at position ``p``, and ``a_s d_s`` what the source writes there
(a feature's activation times its decoder row; an error node's error vector; a token's
embedding, read at the embeddings). One backward pass per *chunk* of targets (each target a row
of one batch of frozen forwards, cut at the target's layer and position) gives a whole row
block of ``A``.

Rows are computed in reverse topological order (logits, then features from the last layer
down), so each target's influence is final when its row is computed: node influence, the
replacement score and the completeness score are accumulated exactly, row by row, and only the
``max_sources`` largest entries of each row (by ``|A|``) are kept for pruning and the graph file:
the dense ``N × N`` matrix is never held (circuit-tracer holds it, and about four copies while
pruning). With ``max_sources`` at least the number of sources nothing is dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from faithful_train.functional.graph_pruning import Pruned, nodes_for, prune
from faithful_train.functional.ranking import spearman
from faithful_train.intervene.engine import run_variants
from faithful_train.intervene.replacement import (
    PromptState,
    demeaned_unembedding,
    linear_forward,
    prompt_state,
)
from faithful_train.intervene.transcoders import Transcoders, spliced

MEMORY_BUDGET = 256 * 2**20  # bytes of activations per backward chunk


@dataclass
class AttributionGraph:
    """One prompt's attribution graph; adjacency entries ``(rows, cols, weights)`` (targets,
    sources), each row's largest ``max_sources`` by magnitude (zeros where a row has fewer)."""

    input_ids: list[int]
    n_layers: int
    features: Tensor  # (n_features, 3): layer, position, feature index
    activations: Tensor  # (n_features,)
    logit_tokens: Tensor  # (n_logits,)
    logit_probabilities: Tensor  # (n_logits,)
    rows: Tensor  # int32
    cols: Tensor  # int32
    weights: Tensor  # float32
    node_influence: Tensor  # (N,) exact (every entry of every row)
    replacement_score: float
    completeness: float
    stored_share: float  # of Σ|A|, the share the kept entries hold
    pruned: Pruned | None = None
    thresholds: tuple[float, float] = (0.8, 0.98)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_pos(self) -> int:
        return len(self.input_ids)

    @property
    def n_features(self) -> int:
        return self.features.shape[0]

    @property
    def n_logits(self) -> int:
        return len(self.logit_tokens)

    @property
    def n_nodes(self) -> int:
        return self.n_features + self.n_layers * self.n_pos + self.n_pos + self.n_logits

    @property
    def logit_weights(self) -> Tensor:
        w = torch.zeros(self.n_nodes, dtype=torch.float64)
        w[-self.n_logits :] = self.logit_probabilities.double()
        return w

    def dense(self) -> Tensor:
        """The ``N × N`` adjacency (tests and small graphs only)."""
        out = torch.zeros(self.n_nodes, self.n_nodes, dtype=self.weights.dtype)
        out[self.rows, self.cols] = self.weights
        return out

    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
        self.thresholds = (node_threshold, edge_threshold)
        self.pruned = prune(
            self.rows,
            self.cols,
            self.weights,
            self.node_influence,
            self.logit_weights,
            self.n_features,
            self.n_pos,
            self.n_logits,
            node_threshold,
            edge_threshold,
        )
        return self.pruned

    def nodes_for(self, share: float = 0.8) -> int:
        return nodes_for(self.node_influence, share)

    def describe(self, index: int) -> tuple[str, int, int, int]:
        """``(kind, layer, position, id)`` of node ``index``: kind feature / error / token / logit."""
        F, L, T = self.n_features, self.n_layers, self.n_pos
        if index < F:
            layer, pos, feature = (int(v) for v in self.features[index])
            return "feature", layer, pos, feature
        if index < F + L * T:
            layer, pos = divmod(index - F, T)
            return "error", layer, pos, -1
        if index < F + L * T + T:
            pos = index - F - L * T
            return "token", -1, pos, self.input_ids[pos]
        return "logit", L, T - 1, int(self.logit_tokens[index - F - L * T - T])


def top_logits(logits: Tensor, max_n_logits: int = 10, desired_logit_prob: float = 0.95) -> tuple[Tensor, Tensor]:
    """circuit-tracer's salient logits: the most probable tokens, the fewest (at most
    ``max_n_logits``) whose probabilities reach ``desired_logit_prob``."""
    probs = logits.float().softmax(-1)
    top_p, top_idx = probs.topk(min(max_n_logits, probs.shape[-1]))
    cutoff = int(torch.searchsorted(top_p.cumsum(0), torch.tensor(desired_logit_prob))) + 1
    return top_idx[:cutoff], top_p[:cutoff]


def attribute(
    model: nn.Module,
    transcoders: Transcoders,
    input_ids: Tensor,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    max_sources: int | None = 1024,
    batch_size: int = 256,
    memory_budget: int = MEMORY_BUDGET,
) -> AttributionGraph:
    """The attribution graph of one prompt ``(1, T)``."""
    was_training = transcoders.training
    transcoders.eval()
    try:
        state = prompt_state(model, transcoders, input_ids)
        return _attribute(state, max_n_logits, desired_logit_prob, max_sources, batch_size, memory_budget)
    finally:
        transcoders.train(was_training)


def _attribute(
    state: PromptState,
    max_n_logits: int,
    desired_logit_prob: float,
    max_sources: int | None,
    batch_size: int,
    memory_budget: int,
) -> AttributionGraph:
    L, T = state.n_layers, state.n_pos
    D = state.embed.shape[-1]
    # per layer (n_l, 3): position, feature, activation, by position (nonzero is row-major)
    active = []
    for lat in state.latents:
        where = lat.nonzero()
        active.append(torch.cat([where.to(lat.dtype), lat[where[:, 0], where[:, 1]][:, None]], 1))
    features = torch.cat(
        [
            torch.cat([torch.full((len(a), 1), layer, device=a.device), a[:, :2].long()], 1)
            for layer, a in enumerate(active)
        ]
    ).cpu()
    activations = torch.cat([a[:, 2] for a in active]).float().cpu()
    starts = [0]
    for a in active:
        starts.append(starts[-1] + len(a))
    F = starts[-1]
    error_start, token_start = F, F + L * T
    logit_start = token_start + T
    tokens, probs = top_logits(state.logits[-1], max_n_logits, desired_logit_prob)
    N = logit_start + len(tokens)
    n_sources = logit_start
    keep = n_sources if max_sources is None else min(max_sources, n_sources)
    logit_w = torch.zeros(N, dtype=torch.float64)
    logit_w[logit_start:] = probs.double().cpu()
    node_influence = torch.zeros(N, dtype=torch.float64)
    complete = 0.0
    total_abs = kept_abs = 0.0
    # each target row's largest entries, filled in place (no list of chunks copied at the end)
    n_targets = F + len(tokens)
    store_rows = torch.empty(n_targets, dtype=torch.int32)
    store_cols = torch.zeros(n_targets, keep, dtype=torch.int32)
    store_weights = torch.zeros(n_targets, keep, dtype=torch.float32)
    filled = 0

    # targets in reverse topological order: logits, then each layer's features from the last
    logit_vecs = demeaned_unembedding(state.parts, tokens, D, state.embed)
    order: list[tuple[int, int, int, Tensor]] = []  # (node, layer, position, vector)
    for i in range(len(tokens)):
        order.append((logit_start + i, L, T - 1, logit_vecs[i]))
    for layer in reversed(range(L)):
        enc = state.transcoders.at(layer).encoder.weight.detach().float()
        for j, (pos, feat, _) in enumerate(active[layer].tolist()):
            order.append((starts[layer] + j, layer, int(pos), enc[int(feat)]))

    k_max = max((int(torch.bincount(a[:, 0].long()).max()) if len(a) else 0) for a in active)
    per_row = max(1, 4 * D * T * (6 * L + 4) + 4 * T * k_max)
    chunk = max(1, min(batch_size, memory_budget // per_row))
    index = 0
    while index < len(order):
        # a chunk: targets of one kind of depth (the logits, or one layer's features)
        layer = order[index][1]
        end = index
        while end < len(order) and end - index < chunk and order[end][1] == layer:
            end += 1
        batch = order[index:end]
        index = end
        rows = _rows(state, batch, active, starts, n_sources)  # (B, n_sources) float64
        targets = torch.tensor([t[0] for t in batch])
        magnitude = rows.abs()
        sums = magnitude.sum(1)
        weight = node_influence[targets] + logit_w[targets]
        node_influence[:n_sources] += (weight[:, None] * magnitude / sums.clamp_min(1e-10)[:, None]).sum(0)
        error_share = magnitude[:, error_start:token_start].sum(1) / sums.clamp_min(1e-10)
        complete += float(((1 - error_share) * weight).sum())
        top = magnitude.topk(keep, dim=1)
        values = rows.gather(1, top.indices)
        total_abs += float(sums.sum())
        kept_abs += float(top.values.sum())
        store_rows[filled : filled + len(batch)] = targets.int()
        store_cols[filled : filled + len(batch)] = top.indices.int()
        store_weights[filled : filled + len(batch)] = values.float()
        filled += len(batch)
    tokens_influence = float(node_influence[token_start:logit_start].sum())
    errors_influence = float(node_influence[error_start:token_start].sum())
    output = node_influence + logit_w
    # rows never computed (errors, tokens) have no error share: circuit-tracer counts them complete
    complete += float(output[error_start:logit_start].sum())
    replacement = (
        tokens_influence / (tokens_influence + errors_influence) if tokens_influence + errors_influence else 1.0
    )
    return AttributionGraph(
        input_ids=[int(t) for t in state.input_ids[0].tolist()],
        n_layers=L,
        features=features,
        activations=activations,
        logit_tokens=tokens.cpu(),
        logit_probabilities=probs.cpu(),
        rows=store_rows.repeat_interleave(keep),
        cols=store_cols.view(-1),
        weights=store_weights.view(-1),
        node_influence=node_influence,
        replacement_score=replacement,
        completeness=complete / float(output.sum()) if float(output.sum()) > 0 else 1.0,
        stored_share=kept_abs / total_abs if total_abs else 1.0,
        extra={"state": state},
    )


def _rows(
    state: PromptState,
    batch: list[tuple[int, int, int, Tensor]],
    active: list[Tensor],
    starts: list[int],
    n_sources: int,
) -> Tensor:
    """``(B, n_sources)``: the direct effect of every source on each target of ``batch`` (one
    frozen forward on ``B`` copies, cut at the targets' layer and last position, one backward)."""
    L, T = state.n_layers, state.n_pos
    B = len(batch)
    layer = batch[0][1]
    P = max(t[2] for t in batch) + 1
    if layer == L:  # logits read the last position
        P = T
    with torch.enable_grad():
        run = linear_forward(state, B, P, min(layer + 1, L), live=False)
        positions = torch.tensor([t[2] for t in batch], device=run.embed.device)
        vectors = torch.stack([t[3] for t in batch]).to(run.embed.device)
        read = run.final if layer == L else run.mlp_in[layer]
        value = (read[torch.arange(B), positions].float() * vectors).sum()
        sources = [run.embed] + run.written[:layer]
        grads = torch.autograd.grad(value, sources, allow_unused=True)
    out = torch.zeros(B, n_sources, dtype=torch.float64, device=run.embed.device)
    F = starts[-1]
    grads = [torch.zeros_like(s) if g is None else g.detach() for s, g in zip(sources, grads)]
    g_embed, g_written = grads[0].float(), grads[1:]
    out[:, F + L * T : F + L * T + P] = (g_embed * state.embed[0, :P].float()).sum(-1).double()
    for source_layer, g in enumerate(g_written):
        g = g.float()
        err = state.error(source_layer)[:P]
        out[:, F + source_layer * T : F + source_layer * T + P] = (g * err).sum(-1).double()
        slots = _slots(active[source_layer], P)
        if slots is not None:
            decoders, columns, pos, slot, act = slots
            sae = state.transcoders.at(source_layer)
            w = sae.W_dec.detach().float()[decoders]  # (P, k_max, D): each position's active decoder rows
            projected = torch.einsum("bpd,pkd->bpk", g, w)
            out[:, starts[source_layer] + columns] = (projected[:, pos, slot] * act).double()
    return out.cpu()


def _slots(active: Tensor, positions: int) -> tuple[Tensor, ...] | None:
    """A layer's active features (``(n, 2)`` position, feature; by position) before
    ``positions``, laid out ``(P, k_max)`` so that their decoder rows meet the gradient in one
    batched product: ``(decoders (P, k_max), columns, position, slot, activation)``. Activations
    come from ``active``'s third column."""
    inside = active[:, 0] < positions
    if not inside.any():
        return None
    chosen = active[inside]
    pos = chosen[:, 0].long()
    counts = torch.bincount(pos, minlength=positions)
    first = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(pos), device=pos.device) - first[pos]
    decoders = torch.zeros(positions, int(counts.max()), dtype=torch.long, device=pos.device)
    decoders[pos, slot] = chosen[:, 1].long()
    return decoders, inside.nonzero()[:, 0], pos, slot, chosen[:, 2].float()


# -- claims checked by intervention ---------------------------------------------------------------


@dataclass
class Claims:
    features: list[int]  # node indices checked
    predicted: Tensor  # the graph's predicted change of the target (logit − mean logit)
    measured: Tensor  # the real model's change
    spearman: float
    sign_agreement: float
    frozen_attention: Tensor | None = None  # the real model's change with every attention pattern held
    spearman_frozen_attention: float = float("nan")


def total_effects(state: PromptState, vector: Tensor) -> list[Tensor]:
    """Per layer ``(T, D)``: the gradient of ``vector · final_norm(r)[T-1]`` at the residual
    stream where that layer's MLP writes, through the linearised replacement model (every path
    through the prompt's active features): a feature's total effect is ``a · (g · d)``."""
    with torch.enable_grad():
        run = linear_forward(state, 1, state.n_pos, state.n_layers, live=True)
        value = (run.final[0, -1].float() * vector.to(run.final.device)).sum()
        grads = torch.autograd.grad(value, run.written)
    return [g[0].detach().float() for g in grads]


def check_claims(
    model: nn.Module,
    graph: AttributionGraph,
    top_k: int = 8,
    scale: float = 0.0,
    nodes: list[int] | None = None,
    frozen_attention: bool = True,
) -> Claims:
    """For the ``top_k`` features of the (pruned, if pruned) graph by influence: the change of
    the top logit (minus the mean logit) that the graph predicts when the feature is scaled by
    ``scale`` (``(scale − 1) a · (g · d)``, total effect through the linearised replacement
    model), against the change measured on the real model with that feature's contribution to
    its MLP's output scaled (``transcoders.spliced``), every feature one variant of one engine
    call. Agreement: Spearman's ρ and the share of signs that match. ``frozen_attention``: the
    same interventions again with every attention pattern held at the prompt's (an edit of
    ``blocks.{i}.attn.pattern``), which the graph assumes: where agreement rises, the graph's
    misses are effects through attention patterns (queries and keys), which it leaves out."""
    state: PromptState = graph.extra["state"]
    F = graph.n_features
    candidates = torch.arange(F)
    if graph.pruned is not None:
        candidates = candidates[graph.pruned.node_mask[:F]]
    if nodes is None:
        order = graph.node_influence[candidates].argsort(descending=True)
        nodes = candidates[order[:top_k]].tolist()
    if not nodes:
        return Claims([], torch.zeros(0), torch.zeros(0), float("nan"), float("nan"))
    D = state.embed.shape[-1]
    target = graph.logit_tokens[:1]
    vector = demeaned_unembedding(state.parts, target.to(state.embed.device), D, state.embed)[0]
    grads = total_effects(state, vector)
    predicted = []
    ablate = []
    for node in nodes:
        layer, pos, feat = (int(v) for v in graph.features[node])
        sae = state.transcoders.at(layer)
        a = float(graph.activations[node])
        predicted.append((scale - 1.0) * a * float(grads[layer][pos] @ sae.W_dec[feat].detach().float()))
        ablate.append((layer, feat, torch.tensor([pos]), scale))
    ids = state.input_ids
    read = torch.full((1, 1), ids.shape[1] - 1, device=ids.device)
    batch = {"input_ids": ids}
    with torch.no_grad():
        edits = spliced(state.transcoders, [[] for _ in nodes], ablate)
        varied = run_variants(model, batch, len(nodes), edits, read=read)[:, -1].float()
        clean = state.logits[-1]
        held = None
        if frozen_attention:  # the same interventions, every attention pattern held at the prompt's
            for layer, pattern in enumerate(state.patterns):
                edits[f"blocks.{layer}.attn.pattern"] = [
                    lambda t, variants, pattern=pattern: pattern.to(t.dtype).expand(t.shape[0], -1, -1, -1)[
                        ..., -t.shape[-2] :, :
                    ]
                ]
            held = run_variants(model, batch, len(nodes), edits, read=read)[:, -1].float()
    tok = int(target[0])

    def demeaned(logits: Tensor) -> Tensor:
        return logits[..., tok] - logits.mean(-1)

    measured = (demeaned(varied) - demeaned(clean)).cpu()
    predicted_t = torch.tensor(predicted)
    rho = float(spearman(predicted_t, measured)) if len(nodes) > 1 else float("nan")
    signs = float((torch.sign(predicted_t) == torch.sign(measured)).float().mean())
    claims = Claims(nodes, predicted_t, measured, rho, signs)
    if held is not None:
        claims.frozen_attention = (demeaned(held) - demeaned(clean)).cpu()
        if len(nodes) > 1:
            claims.spearman_frozen_attention = float(spearman(predicted_t, claims.frozen_attention))
    return claims


def traced(
    model: nn.Module,
    transcoders: Transcoders,
    input_ids: Tensor,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    max_sources: int | None = 1024,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    top_k: int = 8,
    scale: float = 0.0,
) -> AttributionGraph:
    """A prompt's graph, built, pruned and its claims checked (``extra["claims"]``); the prompt's
    activations are not kept past it."""
    graph = attribute(model, transcoders, input_ids, max_n_logits, desired_logit_prob, max_sources)
    graph.prune(node_threshold, edge_threshold)
    graph.extra["claims"] = check_claims(model, graph, top_k, scale)
    graph.extra.pop("state", None)
    return graph


# -- the graph file: circuit-tracer's frontend / Neuronpedia format ---------------------------------


def cantor_pairing(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def graph_json(
    graph: AttributionGraph,
    prompt_tokens: list[str],
    slug: str,
    scan: str = "faithful_train",
    prompt: str | None = None,
    info: dict[str, Any] | None = None,
    decode: Callable[[int], str] = str,
) -> dict[str, Any]:
    """The pruned graph as circuit-tracer's ``create_graph_files`` writes it for its frontend and
    Neuronpedia: ``metadata``, ``qParams``, ``nodes`` (ids ``{layer}_{feature}_{pos}``, error
    nodes ``0_{layer}_{pos}``, embeddings ``E_{token}_{pos}``, logits ``{n_layers+1}_{token}_{pos}``)
    and ``links`` ``{source, target, weight}`` (the signed direct effect). Nodes without links are
    left out, embeddings and logits kept."""
    pruned = graph.pruned or graph.prune()
    L, T = graph.n_layers, graph.n_pos
    F = graph.n_features
    probs = {int(t): float(p) for t, p in zip(graph.logit_tokens, graph.logit_probabilities)}
    kept = pruned.node_mask.clone()
    linked = torch.zeros_like(kept)
    linked[graph.rows[pruned.edge_mask]] = True
    linked[graph.cols[pruned.edge_mask]] = True
    nodes, ids = [], {}
    for index in kept.nonzero()[:, 0].tolist():
        kind, layer, pos, ident = graph.describe(index)
        if kind in ("feature", "error") and not linked[index]:
            continue
        if kind == "feature":
            node = {
                "node_id": f"{layer}_{ident}_{pos}",
                "feature": cantor_pairing(layer, ident),
                "layer": str(layer),
                "ctx_idx": pos,
                "feature_type": "cross layer transcoder",
                "jsNodeId": f"{layer}_{ident}-0",
                "activation": float(graph.activations[index]),
            }
        elif kind == "error":
            node = {
                "node_id": f"0_{layer}_{pos}",
                "feature": -1,
                "layer": str(layer),
                "ctx_idx": pos,
                "feature_type": "mlp reconstruction error",
                "jsNodeId": f"{layer}_{pos}-0",
            }
        elif kind == "token":
            node = {
                "node_id": f"E_{ident}_{pos}",
                "feature": pos,
                "layer": "E",
                "ctx_idx": pos,
                "feature_type": "embedding",
                "jsNodeId": f"E_{ident}-{pos}",
            }
        else:
            rank = index - (F + L * T + T)
            node = {
                "node_id": f"{L + 1}_{ident}_{T - 1}",
                "feature": ident,
                "layer": str(L + 1),
                "ctx_idx": T - 1,
                "feature_type": "logit",
                "token_prob": probs[ident],
                "is_target_logit": rank == 0,
                "jsNodeId": f"L_{ident}-{T - 1}",
                "clerp": f'Output "{decode(ident)}" (p={probs[ident]:.3f})',
            }
        node = {
            "token_prob": 0.0,
            "is_target_logit": False,
            "run_idx": 0,
            "reverse_ctx_idx": 0,
            "clerp": "",
            "influence": None if kind == "logit" else float(pruned.cumulative[index]),
            "activation": None,
        } | node
        ids[index] = node["node_id"]
        nodes.append(node)
    links = [
        {"source": ids[int(s)], "target": ids[int(t)], "weight": float(w)}
        for t, s, w in zip(graph.rows[pruned.edge_mask], graph.cols[pruned.edge_mask], graph.weights[pruned.edge_mask])
        if int(s) in ids and int(t) in ids
    ]
    metadata = {
        "slug": slug,
        "scan": scan,
        "transcoder_list": [],
        "prompt_tokens": prompt_tokens,
        "prompt": prompt if prompt is not None else "".join(prompt_tokens),
        "node_threshold": graph.thresholds[0],
        "schema_version": 1,
        "info": {
            "generator": {"name": "faithful_train"},
            "replacement_score": graph.replacement_score,
            "completeness_score": graph.completeness,
            "edge_threshold": graph.thresholds[1],
        }
        | (info or {}),
    }
    q_params = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": q_params, "nodes": nodes, "links": links}
