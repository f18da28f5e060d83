"""Time per training step with the ``stability`` objective, as ratios to a plain step.

    make benchmarks            # or: .venv/bin/python benchmarks/stability_step.py [--rounds 40]

Model: the ``dense-tiny`` preset (d_model 64, 2 layers, 4 heads, d_mlp 256) on batches of the
``decoy_objects`` task (11 tokens; aligned perturbations and irrelevant-token marks, so every
term can run). Every step is a full training step: forward, answer cross-entropy, the
objective's term where there is one, backward, AdamW step. Our step is
``FaithfulModule.training_step`` without Lightning's logging. The stability term runs fresh
forwards of its ``fraction`` of the batch and of their perturbations and back-propagates
through the attribution (double backprop), so its cost grows with ``fraction`` (and with
``steps`` for integrated gradients); the right-reasons term is one input gradient of its
fraction, also back-propagated. Timings: medians over interleaved rounds (``time_steps``).
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

from benchmarks.interchange_step import optimizer_for, plain_step  # noqa: E402
from benchmarks.pyvene_peer import time_steps  # noqa: E402
from faithful_train.intervene.sites import run_with  # noqa: E402
from faithful_train.modeling import build_model  # noqa: E402
from faithful_train.objectives.base import StepContext  # noqa: E402
from faithful_train.objectives.stability import StabilityObjective  # noqa: E402
from faithful_train.tasks.decoy_objects import DecoyObjects  # noqa: E402
from faithful_train.training.config import find_preset  # noqa: E402

TASK = DecoyObjects()
VARIANTS: dict[str, dict[str, Any]] = {
    "stability, gradient x input, fraction 0.25 (configs/stability.yaml)": dict(stability=1.0, fraction=0.25),
    "stability, gradient x input, fraction 1": dict(stability=1.0, fraction=1.0),
    "stability, integrated gradients 8 steps, fraction 0.25": dict(
        stability=1.0, method="integrated_gradients", steps=8, fraction=0.25
    ),
    "right reasons 10, fraction 0.5 (configs/right-reasons-decoy.yaml before issue 29)": dict(
        stability=0.0, right_reasons=10.0, fraction=0.5
    ),
}


def make_model() -> torch.nn.Module:
    from omegaconf import OmegaConf

    return build_model(OmegaConf.load(find_preset("dense-tiny")), TASK.vocab_size, TASK.seq_len, seed=0).train()


def our_step(model: torch.nn.Module, batch: dict, **objective_kwargs: Any) -> Callable[[], float]:
    objective = StabilityObjective(**objective_kwargs)
    objective.bind(model, TASK)
    optimizer = optimizer_for(model.parameters())
    counter = iter(range(10**9))

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        logits, cache = run_with(model, batch["input_ids"])
        loss = F.cross_entropy(logits[:, -1].float(), batch["labels"])
        k = next(counter)
        loss = loss + objective.term(
            StepContext(batch, logits, cache, model, TASK, k, torch.Generator().manual_seed(k))
        )
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def run(batch_size: int, rounds: int, threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    batch = TASK.generate(batch_size, torch.Generator().manual_seed(0))
    steps = {"plain step": plain_step(make_model(), batch)}
    steps |= {name: our_step(make_model(), batch, **kwargs) for name, kwargs in VARIANTS.items()}
    return time_steps(steps, rounds=rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    ms = run(args.batch_size, args.rounds, args.threads)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads {args.threads}, "
        f"batch {args.batch_size}, dense-tiny, decoy_objects"
    )
    print("| step | ms/step | × plain |\n|---|---|---|")
    for name, value in ms.items():
        print(f"| {name} | {value:.2f} | {value / ms['plain step']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"ms_per_step": ms, "batch_size": args.batch_size}, indent=2))


if __name__ == "__main__":
    main()
