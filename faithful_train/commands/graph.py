"""``faithful-train graph RUN_DIR --prompt "..."``: one attribution graph on demand, from a run's
transcoders (``saes/<label>/layer<i>/``, written by an ``sae`` objective with ``layers``) or a
folder of SAELens-layout transcoders (``--transcoders``), on the run's checkpoint; writes the
graph JSON (circuit-tracer's frontend / Neuronpedia format) and a PNG of the pruned graph."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from faithful_train.errors import ConfigError


def run_transcoders(run_dir: Path) -> Path:
    """The run's transcoder folder: ``saes/<label>/`` holding ``layer<i>/`` folders."""
    found = sorted(p for p in (run_dir / "saes").glob("*") if any(p.glob("layer*/cfg.json")))
    if not found:
        raise ConfigError(
            f"{run_dir} has no transcoders (saes/<label>/layer<i>/): train them with an sae objective with "
            "layers: all, or give --transcoders FOLDER"
        )
    if len(found) > 1:
        raise ConfigError(
            f"{run_dir} has several transcoder sets ({', '.join(p.name for p in found)}); choose one with --transcoders"
        )
    return found[0]


def prompt_ids(task: Any, prompt: str) -> list[int]:
    """The prompt's tokens: through the task's tokenizer (text), else its tokens by name or id,
    separated by spaces (a generated task's vocabulary, as ``token_name`` prints it)."""
    tokenizer = getattr(task, "tokenizer", None)
    if tokenizer is not None:
        return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    names = {task.token_name(i): i for i in range(task.vocab_size)}
    ids = []
    for word in prompt.split():
        if word in names:
            ids.append(names[word])
        elif re.fullmatch(r"\d+", word) and int(word) < task.vocab_size:
            ids.append(int(word))
        else:
            sample = ", ".join(list(names)[:8])
            raise ConfigError(f"--prompt: {word!r} is not a token of task {task.name} (tokens like {sample}, or ids)")
    return ids


def build_graph(
    run_dir: str | Path,
    prompt: str,
    ckpt: str | None = None,
    transcoders: str | None = None,
    out: str | None = None,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    max_sources: int | None = 1024,
    top_k: int = 8,
) -> dict[str, Any]:
    import torch

    from faithful_train.audits.graphs import plot_attribution_graph
    from faithful_train.commands.loading import load_run
    from faithful_train.functional.attribution_graphs import graph_json, traced
    from faithful_train.intervene.replacement import check_transcoders, prompt_too_long
    from faithful_train.intervene.transcoders import load_transcoders
    from faithful_train.io.files import atomic_write_json
    from faithful_train.modeling.interface import hidden_size, n_layers

    run_dir = Path(run_dir)
    model, task = load_run(run_dir, ckpt)
    folder = Path(transcoders) if transcoders else run_transcoders(run_dir)
    sets = load_transcoders(folder, hidden_size(model), n_layers(model))
    check_transcoders(model, sets, f"transcoders {folder}")
    ids = prompt_ids(task, prompt)
    if not ids:
        raise ConfigError("--prompt: no tokens")
    input_ids = torch.tensor([ids])
    prompt_too_long(model, input_ids)
    graph = traced(
        model, sets, input_ids, max_n_logits, desired_logit_prob, max_sources, node_threshold, edge_threshold, top_k
    )
    claims = graph.extra["claims"]
    names = [task.token_name(t) for t in ids]
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", prompt).strip("-")[:48] or "graph"
    out_dir = Path(out) if out else run_dir / "graphs" / "on-demand"
    info = {
        "intervention_agreement": claims.spearman,
        "intervention_sign_agreement": claims.sign_agreement,
        "transcoders": str(folder),
    }
    atomic_write_json(
        out_dir / f"{slug}.json", graph_json(graph, names, slug, info=info, decode=task.token_name, prompt=prompt)
    )
    plot_attribution_graph(graph, names, out_dir / f"{slug}.png", slug)
    return {
        "json": out_dir / f"{slug}.json",
        "png": out_dir / f"{slug}.png",
        "nodes": graph.n_nodes,
        "features": graph.n_features,
        "pruned_nodes": int(graph.pruned.node_mask.sum()),
        "pruned_edges": int(graph.pruned.edge_mask.sum()),
        "replacement_score": graph.replacement_score,
        "completeness": graph.completeness,
        "nodes_at_0.8": graph.nodes_for(0.8),
        "intervention_agreement": claims.spearman,
        "intervention_sign_agreement": claims.sign_agreement,
        "intervention_agreement_frozen_attention": claims.spearman_frozen_attention,
        "top_logits": [
            (task.token_name(int(t)), float(p)) for t, p in zip(graph.logit_tokens, graph.logit_probabilities)
        ],
    }


def format_graph(result: dict[str, Any]) -> str:
    lines = [
        f"{'nodes':<28}{result['nodes']} ({result['features']} active features)",
        f"{'pruned':<28}{result['pruned_nodes']} nodes, {result['pruned_edges']} edges",
        f"{'replacement_score':<28}{result['replacement_score']:.4f}",
        f"{'completeness':<28}{result['completeness']:.4f}",
        f"{'nodes_at_0.8':<28}{result['nodes_at_0.8']}",
        f"{'intervention_agreement':<28}{result['intervention_agreement']:.4f}",
        f"{'intervention_sign_agreement':<28}{result['intervention_sign_agreement']:.4f}",
        f"{'  with attention held':<28}{result['intervention_agreement_frozen_attention']:.4f}",
        f"{'top logits':<28}" + ", ".join(f"{t} ({p:.3f})" for t, p in result["top_logits"]),
        f"graph: {result['json']}",
        f"png:   {result['png']}",
    ]
    return "\n".join(lines) + "\n"
