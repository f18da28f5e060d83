"""Circuits in the graph JSON of EAP-IG and the MIB benchmark (Hanna et al.; Mueller et al. 2025).

The file is ``{"cfg": {n_layers, n_heads, parallel_attn_mlp, d_model}, "nodes": {name:
{in_graph, score}}, "edges": {name: {score, in_graph}}}`` with nodes ``input``, ``a<l>.h<h>``,
``m<l>``, ``logits`` and edges ``parent->child`` (``<q>``, ``<k>``, ``<v>`` into heads), every
edge of the sequential (non-parallel) residual graph listed, as ``Graph.from_json`` reads it.

We score nodes (heads and MLPs); an edge is in the graph when both its ends are (``input`` and
``logits`` always are) and its score is its child's node score (its parent's for ``logits``):
the graph carries node-level evidence, said so in ``cfg.scores``. Edge-level scores (EAP, EAP-IG,
exact edge patching) are the ``edges`` audit's, written by ``intervene.graph.Graph.write_json``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from faithful_train.intervene.graph import Graph
from faithful_train.io.files import atomic_write_text


def eap_node_name(label: str) -> str | None:
    """Our node label -> EAP-IG's (``blocks.1.attn.heads.h2`` -> ``a1.h2``, ``blocks.0.mlp.out``
    -> ``m0``), or ``None`` for a node EAP-IG's graph has no name for."""
    parts = label.split(".")
    if len(parts) == 5 and parts[0] == "blocks" and parts[2:4] == ["attn", "heads"] and parts[4][1:].isdigit():
        return f"a{parts[1]}.{parts[4]}"
    if len(parts) == 4 and parts[0] == "blocks" and parts[2:] == ["mlp", "out"]:
        return f"m{parts[1]}"
    return None


def eap_graph(n_layers: int, n_heads: int, d_model: int, scores: Mapping[str, float], in_graph: set[str]) -> dict:
    """The graph dict: ``scores`` and ``in_graph`` by EAP-IG node name."""
    nodes = {"input": {"in_graph": True, "score": 0.0}}
    for layer in range(n_layers):
        for name in [*(f"a{layer}.h{h}" for h in range(n_heads)), f"m{layer}"]:
            nodes[name] = {"in_graph": name in in_graph, "score": float(scores.get(name, 0.0))}
    nodes["logits"] = {"in_graph": True, "score": 0.0}
    graph = Graph(n_layers, n_heads)
    edges = {}
    for s, r in graph.edges:
        parent, child = graph.senders[s], graph.receivers[r].partition("<")[0]
        edges[graph.edge_name(s, r)] = _edge(nodes, parent, child)
    cfg = {"n_layers": n_layers, "n_heads": n_heads, "parallel_attn_mlp": False, "d_model": d_model, "scores": "nodes"}
    return {"cfg": cfg, "nodes": nodes, "edges": edges}


def _edge(nodes: dict, parent: str, child: str) -> dict:
    score = nodes[parent]["score"] if child == "logits" else nodes[child]["score"]
    return {"score": score, "in_graph": bool(nodes[parent]["in_graph"] and nodes[child]["in_graph"])}


def write_eap_graph(
    path: Path, n_layers: int, n_heads: int, d_model: int, scores: Mapping[str, float], circuit: set[str]
) -> None:
    """Write the graph of ``circuit`` (our node labels) with node ``scores`` (our labels)."""
    named = {eap_node_name(k): v for k, v in scores.items() if eap_node_name(k) is not None}
    members = {eap_node_name(k) for k in circuit} - {None}
    atomic_write_text(path, json.dumps(eap_graph(n_layers, n_heads, d_model, named, members)) + "\n")
