"""Time edge attribution and exact edge patching against a plain forward+backward and against a
one-forward-per-edge loop; measure peak memory against EAP-IG's difference tensor.

    make benchmarks            # or: .venv/bin/python benchmarks/edges.py

Model: our dense transformer, 4 layers, d_model 64, 4 heads, d_mlp 256, vocab 64 (weights at
std 0.3 so the metric is not ~0); B = 32 prompts of T = 16 tokens, the corrupted ones with two
tokens resampled; metric: the logit difference of two answers at the last position. The counts
of senders, receivers (heads' q, k, v apart) and edges are printed.

- *unit*: one forward and backward of the model on the batch (the loss is the metric);
- EAP, EAP-IG (inputs, 5 steps), EAP-IG (activations, 5 steps): ``functional.edges.edge_scores``
  for every edge, in units (EAP-IG per interpolation step: the goal is <= 3);
- exact: every edge knocked out alone, batched (``circuit_logits``, one call) and in a loop of
  one edge-level forward per edge.

Peak memory (``--memory``): each configuration in a fresh process, how much an EAP-IG (inputs,
5 steps) map grows the peak resident set, against a plain forward and backward, for 4, 8 and 16
heads at d_model 256, B = 32, T = 64 (senders grow with heads), beside the bytes of the
(B, T, n_senders, d_model) difference tensor EAP-IG allocates. EAP-IG itself (hannamw/EAP-IG) is not on the
package registries (``pip download eap-ig``: no distribution), so it is not run here.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.pyvene_peer import time_steps  # noqa: E402
from faithful_train.functional.circuits import answer_metric  # noqa: E402
from faithful_train.functional.edges import circuit_logits, edge_scores, knockouts, record  # noqa: E402
from faithful_train.intervene.edges import graph_forward, model_graph  # noqa: E402
from faithful_train.modeling.transformer import Transformer, TransformerConfig  # noqa: E402

ANSWERS = (3, 7)


def make(n_layers: int = 4, d_model: int = 64, n_heads: int = 4, batch: int = 32, length: int = 16):
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=64, d_model=d_model, n_heads=n_heads, n_layers=n_layers, d_mlp=4 * d_model)
    model = Transformer(cfg).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.3 if p.dim() > 1 else 0.02)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (batch, length), generator=g)
    bad = ids.clone()
    bad[:, [3, 9]] = torch.randint(0, 64, (batch, 2), generator=g)
    labels = torch.full((batch,), ANSWERS[0])
    return model, {"input_ids": ids, "labels": labels}, {"input_ids": bad}


def metric_fn(labels: torch.Tensor):
    return lambda logits: answer_metric("logit_diff", logits, labels, None, ANSWERS)


def unit(model: Transformer, batch: dict) -> None:
    model.zero_grad(set_to_none=True)
    B, T = batch["input_ids"].shape
    logits = model(batch["input_ids"], positions=torch.full((B, 1), T - 1))
    metric_fn(batch["labels"])(logits[:, 0][None]).sum().backward()


def run(rounds: int) -> dict[str, Any]:
    model, clean, bad = make()
    graph = model_graph(model)
    metric = metric_fn(clean["labels"])
    with torch.no_grad():
        corrupt = record(model, bad)[1].wide(model.graph_parts())
    everything = knockouts(graph, graph.edges)
    read = torch.full((clean["input_ids"].shape[0], 1), clean["input_ids"].shape[1] - 1)

    def loop() -> None:
        with torch.no_grad():
            for i in range(everything.shape[0]):
                graph_forward(model, clean["input_ids"], None, read, missing=everything[i : i + 1], corrupt=corrupt)

    def batched() -> None:
        with torch.no_grad():
            circuit_logits(model, clean, everything, corrupt)

    steps = {
        "unit": lambda: unit(model, clean),
        "eap": lambda: edge_scores(model, clean, metric, "eap", corrupted=bad),
        "eap-ig-inputs": lambda: edge_scores(model, clean, metric, "eap-ig-inputs", 5, corrupted=bad),
        "eap-ig-activations": lambda: edge_scores(model, clean, metric, "eap-ig-activations", 5, corrupted=bad),
        "exact batched": batched,
    }
    ms = time_steps(steps, warmup=1, rounds=rounds)
    ms["exact loop"] = time_steps({"loop": loop}, warmup=0, rounds=1)["loop"]
    scores = edge_scores(model, clean, metric, "eap-ig-inputs", 5, corrupted=bad)
    with torch.no_grad():
        exact = metric(circuit_logits(model, clean, everything, corrupt)).mean(1) - metric(
            circuit_logits(model, clean, torch.zeros(1, *everything.shape[1:]), corrupt)
        ).mean(1)
    ig = torch.stack([scores[s, r] for s, r in graph.edges]).float() / clean["input_ids"].shape[0]
    from faithful_train.functional.ranking import spearman

    return {
        "ms": ms,
        "senders": graph.n_senders,
        "receivers": graph.n_receivers,
        "edges": graph.n_edges,
        "spearman_ig_exact": float(spearman(ig[None], exact[None])[0]),
    }


def peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure_memory(heads: int, what: str) -> int:
    """Peak RSS growth (KiB) of ``what`` (``unit`` or ``eap-ig``) in this fresh process: the peak
    after it minus the peak before it (after a warm-up plain step, so imports and the model count
    in neither)."""
    torch.set_num_threads(1)
    model, clean, bad = make(d_model=256, n_heads=heads, batch=32, length=64)
    unit(model, clean)
    before = peak_rss_kib()
    if what == "unit":
        unit(model, clean)
    else:
        edge_scores(model, clean, metric_fn(clean["labels"]), "eap-ig-inputs", 5, corrupted=bad)
    return peak_rss_kib() - before


def memory() -> list[dict[str, Any]]:
    rows = []
    for heads in (4, 8, 16):
        growth = {}
        for what in ("unit", "eap-ig"):
            done = subprocess.run(
                [sys.executable, __file__, "--measure", str(heads), what], capture_output=True, text=True, check=True
            )
            growth[what] = int(done.stdout.strip())
        model, clean, _ = make(d_model=256, n_heads=heads, batch=32, length=64)
        graph = model_graph(model)
        eap_ig = 32 * 64 * graph.n_senders * 256 * 4  # their (B, T, n_forward, d_model) float32 tensor
        rows.append(
            {
                "heads": heads,
                "senders": graph.n_senders,
                "ours_eap_ig_peak_growth_mib": growth["eap-ig"] / 1024,
                "plain_step_peak_growth_mib": growth["unit"] / 1024,
                "eap_ig_difference_tensor_mib": eap_ig / 2**20,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory", action="store_true", help="also measure peak memory (fresh processes)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(measure_memory(int(args.measure[0]), args.measure[1]))
        return
    torch.set_num_threads(args.threads)
    result = run(args.rounds)
    ms = result["ms"]
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads {args.threads}; "
        f"4 layers x 4 heads, d_model 64, batch 32 x 16 tokens: {result['senders']} senders, "
        f"{result['receivers']} receivers, {result['edges']} edges"
    )
    print("| what | ms | in units (forward+backward) |\n|---|---|---|")
    for name in ("unit", "eap", "eap-ig-inputs", "eap-ig-activations", "exact batched", "exact loop"):
        print(f"| {name} | {ms[name]:.1f} | {ms[name] / ms['unit']:.2f} |")
    print(f"EAP-IG (inputs), per interpolation step: {ms['eap-ig-inputs'] / 5 / ms['unit']:.2f} units (goal <= 3)")
    print(f"exact: loop / batched = {ms['exact loop'] / ms['exact batched']:.1f}x")
    print(f"Spearman(EAP-IG, exact single-edge effects) over all edges: {result['spearman_ig_exact']:.3f}")
    if args.memory:
        result["memory"] = memory()
        print(
            "| heads | senders | ours: EAP-IG map, peak growth MiB | plain F+B, peak growth MiB | EAP-IG's tensor MiB |"
        )
        print("|---|---|---|---|---|")
        for row in result["memory"]:
            print(
                f"| {row['heads']} | {row['senders']} | {row['ours_eap_ig_peak_growth_mib']:.1f} | "
                f"{row['plain_step_peak_growth_mib']:.1f} | {row['eap_ig_difference_tensor_mib']:.1f} |"
            )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
