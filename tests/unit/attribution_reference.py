"""Independent references for attribution graphs.

- ``dense_adjacency``: the adjacency of the replacement model by autograd through the *real*
  model's own forward, one target at a time, with circuit-tracer's freezing done by hooks
  (every norm module's output recomputed with its scale taken from the clean run, the attention
  pattern detached at ``attn.pattern``, each MLP output replaced by its clean value plus a zero
  leaf whose gradient is the gradient where features write);
- circuit-tracer's ``graph.py`` functions, verbatim in substance (``normalize_matrix``,
  ``compute_influence``, ``prune_graph``, ``compute_graph_scores``), on dense matrices.
"""

from __future__ import annotations

import torch
from torch import nn

from faithful_train.intervene.sites import run_with


def _norm_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("RMSNorm")]


def _frozen(module: nn.Module, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.LayerNorm):
        centred = x - x.mean(-1, keepdim=True)
        std = (ref.var(-1, unbiased=False, keepdim=True) + module.eps).sqrt()
        return centred / std * module.weight + module.bias
    eps = getattr(module, "variance_epsilon", None) or module.eps
    rms = (ref.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    return module.weight * (x / rms)


def dense_adjacency(model: nn.Module, transcoders, ids: torch.Tensor, graph) -> torch.Tensor:
    """``(N, N)``: rows for every feature and logit node of ``graph`` (its node order)."""
    L = graph.n_layers
    norms = _norm_modules(model)
    clean_in: dict[int, torch.Tensor] = {}
    handles = [
        m.register_forward_hook(lambda mod, a, o, i=i: clean_in.__setitem__(i, a[0].detach()))
        for i, m in enumerate(norms)
    ]
    try:
        names = [f"blocks.{i}.{s}" for i in range(L) for s in ("mlp.in", "mlp.out")] + ["embed"]
        _, clean = run_with(model, ids, record=names)
    finally:
        for h in handles:
            h.remove()
    F = graph.n_features
    N = graph.n_nodes
    A = torch.zeros(N, N, dtype=torch.float64)
    for target in list(range(F)) + list(range(N - graph.n_logits, N)):
        deltas = [torch.zeros_like(clean[f"blocks.{i}.mlp.out"], requires_grad=True) for i in range(L)]
        d_embed = torch.zeros_like(clean["embed"], requires_grad=True)
        seen: dict[str, torch.Tensor] = {}

        def keep(name, seen=seen):
            def fn(t):
                seen[name] = t
                return t

            return fn

        edits = {"embed": lambda t, d_embed=d_embed: clean["embed"] + d_embed}
        for i in range(L):
            edits[f"blocks.{i}.mlp.out"] = lambda t, i=i, deltas=deltas: clean[f"blocks.{i}.mlp.out"] + deltas[i]
            edits[f"blocks.{i}.mlp.in"] = keep(f"blocks.{i}.mlp.in")
            edits[f"blocks.{i}.attn.pattern"] = lambda t: t.detach()
        frozen = [
            m.register_forward_hook(lambda mod, a, o, i=i: _frozen(mod, a[0], clean_in[i])) for i, m in enumerate(norms)
        ]
        try:
            logits, _ = run_with(model, ids, edits=edits)
        finally:
            for h in frozen:
                h.remove()
        kind, layer, pos, ident = graph.describe(target)
        if kind == "feature":
            sae = transcoders.at(layer)
            value = seen[f"blocks.{layer}.mlp.in"][0, pos] @ sae.encoder.weight[ident]
        else:
            last = logits[0, -1]
            value = last[ident] - last.mean()
        grads = torch.autograd.grad(value, [d_embed, *deltas], allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for x, g in zip([d_embed, *deltas], grads)]
        g_embed, g_layers = grads[0][0], [g[0] for g in grads[1:]]
        for source in range(N - graph.n_logits):
            s_kind, s_layer, s_pos, s_ident = graph.describe(source)
            if s_kind == "feature":
                sae = transcoders.at(s_layer)
                write = graph.activations[source] * sae.W_dec[s_ident].detach()
                A[target, source] = float(g_layers[s_layer][s_pos] @ write.to(g_layers[s_layer].dtype))
            elif s_kind == "error":
                sae = transcoders.at(s_layer)
                recon = sae.decode(sae.encode(clean[f"blocks.{s_layer}.mlp.in"][0]))
                err = (clean[f"blocks.{s_layer}.mlp.out"][0] - recon).detach()
                A[target, source] = float(g_layers[s_layer][s_pos] @ err[s_pos])
            else:
                A[target, source] = float(g_embed[s_pos] @ clean["embed"][0, s_pos].detach())
    return A


# -- circuit-tracer's graph.py ----------------------------------------------------------------------


def normalize_matrix(matrix):
    normalized = matrix.abs()
    return normalized / normalized.sum(dim=1, keepdim=True).clamp(min=1e-10)


def compute_influence(A, logit_weights, max_iter=1000):
    current_influence = logit_weights @ A
    influence = current_influence
    iterations = 0
    while current_influence.any():
        if iterations >= max_iter:
            raise RuntimeError("no convergence")
        current_influence = current_influence @ A
        influence += current_influence
        iterations += 1
    return influence


def compute_node_influence(adjacency_matrix, logit_weights):
    return compute_influence(normalize_matrix(adjacency_matrix), logit_weights)


def compute_edge_influence(pruned_matrix, logit_weights):
    normalized_pruned = normalize_matrix(pruned_matrix)
    pruned_influence = compute_influence(normalized_pruned, logit_weights)
    pruned_influence += logit_weights
    return normalized_pruned * pruned_influence[:, None]


def find_threshold(scores, threshold):
    sorted_scores = torch.sort(scores, descending=True).values
    cumulative_score = torch.cumsum(sorted_scores, dim=0) / torch.sum(sorted_scores)
    threshold_index = int(torch.searchsorted(cumulative_score, threshold).item())
    threshold_index = min(threshold_index, len(cumulative_score) - 1)
    return sorted_scores[threshold_index]


def prune_graph(adjacency, logit_probabilities, n_features, n_tokens, node_threshold=0.8, edge_threshold=0.98):
    n_logits = len(logit_probabilities)
    logit_weights = torch.zeros(adjacency.shape[0], dtype=adjacency.dtype)
    logit_weights[-n_logits:] = logit_probabilities
    node_influence = compute_node_influence(adjacency, logit_weights)
    node_mask = node_influence >= find_threshold(node_influence, node_threshold)
    node_mask[-n_logits - n_tokens :] = True
    pruned_matrix = adjacency.clone()
    pruned_matrix[~node_mask] = 0
    pruned_matrix[:, ~node_mask] = 0
    edge_scores = compute_edge_influence(pruned_matrix, logit_weights)
    edge_mask = edge_scores >= find_threshold(edge_scores.flatten(), edge_threshold)
    old_node_mask = node_mask.clone()
    node_mask[: -n_logits - n_tokens] &= edge_mask[:, : -n_logits - n_tokens].any(0)
    node_mask[:n_features] &= edge_mask[:n_features].any(1)
    while not torch.all(node_mask == old_node_mask):
        old_node_mask[:] = node_mask
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[: -n_logits - n_tokens] &= edge_mask[:, : -n_logits - n_tokens].any(0)
        node_mask[:n_features] &= edge_mask[:n_features].any(1)
    return node_mask, edge_mask, node_influence


def compute_graph_scores(adjacency, logit_probabilities, n_features, n_tokens, n_layers):
    n_logits = len(logit_probabilities)
    error_start = n_features
    error_end = error_start + n_tokens * n_layers
    token_end = error_end + n_tokens
    logit_weights = torch.zeros(adjacency.shape[0], dtype=adjacency.dtype)
    logit_weights[-n_logits:] = logit_probabilities
    normalized_matrix = normalize_matrix(adjacency)
    node_influence = compute_influence(normalized_matrix, logit_weights)
    token_influence = node_influence[error_end:token_end].sum()
    error_influence = node_influence[error_start:error_end].sum()
    replacement_score = token_influence / (token_influence + error_influence)
    non_error_fractions = 1 - normalized_matrix[:, error_start:error_end].sum(dim=-1)
    output_influence = node_influence + logit_weights
    completeness_score = (non_error_fractions * output_influence).sum() / output_influence.sum()
    return float(replacement_score), float(completeness_score)
