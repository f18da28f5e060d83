"""Time per training step of interchange-intervention training: ours against a plain step and
against pyvene, on the same model and batch.

    make benchmarks            # or: PYVENE_LIB=.bench .venv/bin/python benchmarks/interchange_step.py

Model: the quickstart's ``dense-tiny`` shape (d_model 64, 2 layers, 4 heads, d_mlp 256) on
hierarchical-equality batches of 128; alignment left/right = the two halves of
``blocks.0.resid_post`` at position 3 (``configs/quickstart.yaml``). Every step is a full
training step: forward(s), loss, backward, AdamW step. Timings are medians over interleaved
rounds (each round runs every variant once), so drifting load hits all variants alike.

Our step is exactly ``FaithfulModule.training_step`` without Lightning's logging: one recorded
forward, the task loss, ``objective.term`` (in-batch sources from that forward, all swaps in
one batched forward resumed at block 1), backward, optimizer step. pyvene's step is how its IIT
tutorials write it (``benchmarks/pyvene_peer.py``): per variable, one intervenable call that
runs the source and the intervened base.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.pyvene_peer import build_pyvene_iit, pyvene_iit_step, time_steps  # noqa: E402
from faithful_train.intervene.sites import run_with  # noqa: E402
from faithful_train.objectives.base import StepContext  # noqa: E402
from faithful_train.objectives.interchange import InterchangeObjective  # noqa: E402
from faithful_train.tasks.hierarchical_equality import HierarchicalEquality  # noqa: E402

ALIGNMENT = {
    "left": {"site": "blocks.0.resid_post", "positions": [3], "dims": [0, 32]},
    "right": {"site": "blocks.0.resid_post", "positions": [3], "dims": [32, 64]},
}
DAS = {  # 16-dim learned subspaces (as configs/iit-das.yaml), at position 3 like pyvene's
    "left": {"site": "blocks.0.resid_post", "positions": [3], "dims": [0, 16]},
    "right": {"site": "blocks.0.resid_post", "positions": [3], "dims": [16, 32]},
}
DAS_PARTITION = ((0, 16), (16, 32))


def make_model(seed: int = 0, d_model: int = 64, n_layers: int = 2) -> torch.nn.Module:
    from faithful_train.modeling.transformer import Transformer, TransformerConfig

    torch.manual_seed(seed)
    return Transformer(
        TransformerConfig(
            vocab_size=18, max_seq_len=4, d_model=d_model, n_layers=n_layers, n_heads=4, d_mlp=4 * d_model
        )
    )


def optimizer_for(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=2e-3, betas=(0.9, 0.98), weight_decay=0.01)


def plain_step(
    model: torch.nn.Module, batch: dict, optimizer: torch.optim.Optimizer | None = None
) -> Callable[[], float]:
    """Forward, answer cross-entropy, backward, optimizer step (AdamW at lr 2e-3 by default)."""
    optimizer = optimizer or optimizer_for(model.parameters())

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(batch["input_ids"])[:, -1].float(), batch["labels"])
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def our_step(model: torch.nn.Module, batch: dict, **objective_kwargs: Any) -> Callable[[], float]:
    task = HierarchicalEquality()
    objective = InterchangeObjective(**objective_kwargs)
    objective.bind(model, task)
    extra = list(objective.module().parameters()) if objective.module() is not None else []
    optimizer = optimizer_for(list(model.parameters()) + extra)
    sites = objective.sites()
    counter = iter(range(10**9))

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        logits, cache = run_with(model, batch["input_ids"], record=sites)
        loss = F.cross_entropy(logits[:, -1].float(), batch["labels"])
        k = next(counter)
        ctx = StepContext(batch, logits, cache, model, task, k, torch.Generator().manual_seed(k))
        loss = loss + objective.term(ctx)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def pyvene_step(model: torch.nn.Module, batch: dict, mode: str, variables: list[int] | None) -> Callable[[], float]:
    task = HierarchicalEquality()
    perm = torch.randperm(batch["input_ids"].shape[0], generator=torch.Generator().manual_seed(0))
    source = {k: v[perm] for k, v in batch.items()}
    targets = [task.counterfactual_labels(batch, source, [v]) for v in task.variables]
    targets = targets if variables is None else targets[variables[0]]
    partition = DAS_PARTITION if mode == "rotated" else ((0, 32), (32, 64))
    peer = build_pyvene_iit(model, mode, partition=partition, seed=0)
    return lambda: pyvene_iit_step(
        peer, None, batch["input_ids"], source["input_ids"], targets, batch["labels"], variables=variables
    )


def run(batch_size: int, rounds: int, threads: int, with_pyvene: bool) -> dict[str, float]:
    torch.set_num_threads(threads)
    batch = HierarchicalEquality().sample(batch_size, 0)
    steps = {
        "plain training step": plain_step(make_model(), batch),
        "ours: interchange, 2 variables": our_step(make_model(), batch, alignment=ALIGNMENT),
        "ours: interchange, 1 variable per step": our_step(
            make_model(), batch, alignment=ALIGNMENT, variables="sample"
        ),
        "ours: interchange, 2 variables, full forward (no resume)": our_step(
            make_model(), batch, alignment=ALIGNMENT, resume=False
        ),
        "ours: DAS (learned subspace), 2 variables": our_step(make_model(), batch, alignment=DAS, subspace="learned"),
        "ours: interchange + strict term": our_step(
            make_model(), batch, alignment=ALIGNMENT, strict=[{"site": "blocks.0.resid_post", "positions": [0, 1, 2]}]
        ),
    }
    if with_pyvene:
        steps |= {
            "pyvene: interchange, 2 variables": pyvene_step(make_model(), batch, "vanilla", None),
            "pyvene: interchange, 1 variable per step": pyvene_step(make_model(), batch, "vanilla", [0]),
            "pyvene: DAS (low-rank rotated), 2 variables": pyvene_step(make_model(), batch, "rotated", None),
        }
    return time_steps(steps, rounds=rounds)


def pyvene_available() -> bool:
    try:
        from benchmarks.pyvene_peer import import_pyvene

        import_pyvene()
        return True
    except ImportError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with_pyvene = pyvene_available()
    if not with_pyvene:
        print("pyvene not found (install: make benchmarks, or PYVENE_LIB=<dir>): timing ours only")
    ms = run(args.batch_size, args.rounds, args.threads, with_pyvene)
    plain = ms["plain training step"]
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads {args.threads}, "
        f"batch {args.batch_size}"
    )
    print("| step | ms/step | × plain |\n|---|---|---|")
    for name, value in ms.items():
        print(f"| {name} | {value:.2f} | {value / plain:.2f} |")
    pairs = [
        ("interchange, 2 variables", "ours: interchange, 2 variables", "pyvene: interchange, 2 variables"),
        (
            "interchange, 1 variable per step",
            "ours: interchange, 1 variable per step",
            "pyvene: interchange, 1 variable per step",
        ),
        (
            "DAS, 2 variables",
            "ours: DAS (learned subspace), 2 variables",
            "pyvene: DAS (low-rank rotated), 2 variables",
        ),
    ]
    if with_pyvene:
        for label, ours, theirs in pairs:
            print(f"pyvene / ours, {label}: {ms[theirs] / ms[ours]:.2f}×")
    if args.json:
        args.json.write_text(
            json.dumps({"ms_per_step": ms, "batch_size": args.batch_size, "threads": args.threads}, indent=2)
        )


if __name__ == "__main__":
    main()
