"""Time leave-one-document-out per example: the retrieval audit's batched variants against one
forward per ablation.

    make benchmarks            # or: .venv/bin/python benchmarks/retrieval.py

Model: dense-tiny's shape (d_model 64, 2 layers, 4 heads) on ``kv_retrieval`` with 4
documents. For a batch of B examples, "used" needs the answer's log-probability with each
document replaced by filler, plus a counterfactual document: 5 variants of every example.

- ours: every variant of the batch in one engine call (``run_variants``, 5 B rows);
- one forward per ablation, batched over examples: 5 forwards of B rows;
- one forward per ablation and example (ContextCite's loop over ablations of one prompt):
  5 B forwards of one row.

Timings are medians over interleaved rounds (``time_steps``), in ms per example, on one thread.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.pyvene_peer import time_steps  # noqa: E402
from faithful_train.intervene import evidence  # noqa: E402
from faithful_train.intervene.engine import run_variants  # noqa: E402
from faithful_train.modeling.transformer import Transformer, TransformerConfig  # noqa: E402
from faithful_train.tasks.kv_retrieval import KVRetrieval  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = KVRetrieval(parametric=True)
    torch.manual_seed(0)
    model = Transformer(
        TransformerConfig(
            vocab_size=task.vocab_size, max_seq_len=task.seq_len, d_model=64, n_layers=2, n_heads=4, d_mlp=256
        )
    ).eval()
    batch = task.sample(args.batch_size, 0)
    k, B = task.n_docs, args.batch_size
    cf, _ = task.counterfactual_evidence(batch, torch.Generator().manual_seed(1))
    spans = evidence.document_spans(batch, k)
    variants = [
        evidence.fill(batch["input_ids"], spans, torch.eye(k, dtype=torch.bool)[j], task.filler_token) for j in range(k)
    ] + [cf]
    stacked = torch.cat(variants)

    @torch.no_grad()
    def ours() -> torch.Tensor:
        return run_variants(model, batch, k + 1, {}, input_ids=stacked)

    @torch.no_grad()
    def per_ablation() -> list[torch.Tensor]:
        return [model(v)[:, -1] for v in variants]

    @torch.no_grad()
    def per_ablation_and_example() -> list[torch.Tensor]:
        return [model(v[i : i + 1])[:, -1] for v in variants for i in range(B)]

    reference = torch.cat(per_ablation())
    assert torch.allclose(ours()[:, 0], reference, atol=1e-5), "batched variants differ from per-ablation forwards"
    times = time_steps(
        {"ours": ours, "per_ablation": per_ablation, "per_ablation_and_example": per_ablation_and_example},
        warmup=2,
        rounds=args.rounds,
    )
    print(
        f"torch {torch.__version__}, {platform.machine()}, threads {args.threads}, batch {B}, "
        f"{k} documents + 1 counterfactual"
    )
    print("| leave-one-document-out | ms per example | × ours |")
    print("|---|---|---|")
    names = {
        "ours": "ours: every variant in one engine call",
        "per_ablation": "one forward per ablation (batched over examples)",
        "per_ablation_and_example": "one forward per ablation and example (ContextCite's loop)",
    }
    for name, label in names.items():
        print(f"| {label} | {times[name] / B:.3f} | {times[name] / times['ours']:.2f} |")


if __name__ == "__main__":
    main()
