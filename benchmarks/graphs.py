"""Build an attribution graph for a 4-layer model at T = 64, 256, 1024 tokens: time and peak
memory, against circuit-tracer's dense adjacency (``4 N^2`` float32 bytes for the matrix, and
about four such matrices while pruning: ``4 * 4 N^2`` bytes, the issue's estimate).

    make benchmarks            # or: .venv/bin/python benchmarks/graphs.py [--lengths 64 256]

Model: our dense transformer, 4 layers, d_model 64, 4 heads, d_mlp 256, vocab 512, context 1024;
a TopK transcoder per layer (512 latents, k = 8), random (decoders at std 0.1, so every row has
weight). Each length runs in a fresh process (``--measure T``): the peak resident set it adds
over the built model, the time of ``attribute`` (every feature, error, token and logit row, by
batched backward passes; ``max_sources`` 1024 entries kept per row) and of ``prune``.
circuit-tracer itself needs TransformerLens models and its own transcoder files; it is not run.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from faithful_train.functional.attribution_graphs import attribute  # noqa: E402
from faithful_train.intervene.sae import SparseAutoencoder  # noqa: E402
from faithful_train.intervene.transcoders import Transcoders  # noqa: E402
from faithful_train.modeling.transformer import Transformer, TransformerConfig  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(length: int, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=512, d_model=64, n_heads=4, n_layers=4, d_mlp=256, max_seq_len=1024)
    model = Transformer(cfg).eval()
    sets = Transcoders({i: SparseAutoencoder(64, 512, k=8, d_out=64) for i in range(4)}).eval()
    for sae in sets.values():
        sae.W_dec.data.normal_(0, 0.1)
    ids = torch.randint(1, 512, (1, length), generator=torch.Generator().manual_seed(1))
    attribute(model, sets, ids[:, :8])  # warm-up
    before = peak_rss_mib()
    start = time.perf_counter()
    graph = attribute(model, sets, ids)
    built = time.perf_counter() - start
    start = time.perf_counter()
    pruned = graph.prune()
    pruning = time.perf_counter() - start
    n = graph.n_nodes
    return {
        "tokens": length,
        "nodes": n,
        "features": graph.n_features,
        "attribute_s": built,
        "prune_s": pruning,
        "peak_growth_mib": peak_rss_mib() - before,
        "dense_matrix_mib": 4 * n * n / 2**20,
        "circuit_tracer_estimate_mib": 4 * 4 * n * n / 2**20,
        "kept_entries": int((graph.weights != 0).sum()),
        "stored_share": graph.stored_share,
        "pruned_nodes": int(pruned.node_mask.sum()),
        "pruned_edges": int(pruned.edge_mask.sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--measure", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.threads)))
        return
    rows = []
    for length in args.lengths:
        done = subprocess.run(
            [sys.executable, __file__, "--measure", str(length), "--threads", str(args.threads)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads {args.threads}; "
        "4 layers, d_model 64, transcoders 512 latents, k 8"
    )
    print(
        "| T | nodes | features | attribute s | prune s | peak growth MiB | dense N² MiB | "
        "circuit-tracer 4·N²·4 MiB | ours / estimate |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['tokens']} | {r['nodes']} | {r['features']} | {r['attribute_s']:.1f} | {r['prune_s']:.2f} | "
            f"{r['peak_growth_mib']:.0f} | {r['dense_matrix_mib']:.0f} | {r['circuit_tracer_estimate_mib']:.0f} | "
            f"{r['peak_growth_mib'] / r['circuit_tracer_estimate_mib']:.1%} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
