"""Time per training step of an MoE model with and without the router objective, and what the
router audit adds at its cadence, as ratios to a plain step.

    make benchmarks            # or: .venv/bin/python benchmarks/router_step.py

Models: ``moe-tiny`` (ours: d_model 64, 2 layers, 4 experts, top-2, d_mlp 128) on the
domain-mixture batches of ``configs/moe-router.yaml``, and ``mixtral-tiny`` (Hugging Face,
the same sizes). Every step is a full training step: forward, loss, backward, AdamW step.
Timings are medians over interleaved rounds (``time_steps``), so drifting load hits every
variant alike. The optimizer steps at learning rate 0, so the variants cannot drift apart in
routing (which experts run is most of an MoE step's cost); bias balancing still moves its
bias, as it would in training.

Our step is ``FaithfulModule.training_step`` without Lightning's logging: one forward that
records the router logits, the task loss, ``objective.term``, backward, optimizer step, then
the bias update of ``on_train_batch_end`` where bias balancing is on. The peer is Hugging
Face's own auxiliary loss (``output_router_logits=True``, ``load_balancing_loss_func``), the
same load-balance term our pooled one equals.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.interchange_step import plain_step as interchange_plain_step  # noqa: E402
from benchmarks.pyvene_peer import time_steps  # noqa: E402
from faithful_train.audits.router import RouterAudit  # noqa: E402
from faithful_train.intervene.sites import run_with  # noqa: E402
from faithful_train.modeling import build_model  # noqa: E402
from faithful_train.objectives.base import StepContext  # noqa: E402
from faithful_train.objectives.router import RouterObjective  # noqa: E402
from faithful_train.tasks.domain_mixture import DomainMixture  # noqa: E402
from faithful_train.training.config import find_preset  # noqa: E402

TASK = DomainMixture(n_symbols=8, n_operands=4)
ALL_TERMS = dict(load_balance=0.01, z_loss=0.001, entropy=0.01, alignment=0.5, concept="domain")


def make_model(preset: str) -> torch.nn.Module:
    from omegaconf import OmegaConf

    return build_model(OmegaConf.load(find_preset(preset)), TASK.vocab_size, TASK.seq_len, seed=0).train()


def optimizer_for(model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW doing all its work at learning rate 0: the weights, so the routing and the experts
    that run (which decide an MoE step's cost), stay the same in every variant and round."""
    return torch.optim.AdamW(model.parameters(), lr=0.0, betas=(0.9, 0.98), weight_decay=0.01)


def plain_step(model: torch.nn.Module, batch: dict) -> Callable[[], float]:
    return interchange_plain_step(model, batch, optimizer_for(model))


def our_step(model: torch.nn.Module, batch: dict, **objective_kwargs: Any) -> Callable[[], float]:
    objective = RouterObjective(**objective_kwargs)
    objective.bind(model, TASK)
    optimizer = optimizer_for(model)
    sites = objective.sites()
    trainer, pl_module = SimpleNamespace(world_size=1), SimpleNamespace(model=model)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        logits, cache = run_with(model, batch["input_ids"], record=sites)
        loss = F.cross_entropy(logits[:, -1].float(), batch["labels"])
        loss = loss + objective.term(StepContext(batch, logits, cache, model, TASK, 0, torch.Generator()))
        loss.backward()
        optimizer.step()
        objective.on_train_batch_end(trainer, pl_module)
        return loss.item()

    return step


def hf_aux_step(model: torch.nn.Module, batch: dict) -> Callable[[], float]:
    """Hugging Face's own load-balancing loss, as its models add it (coefficient 0.01)."""
    optimizer = optimizer_for(model)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        out = model.hf_model(input_ids=batch["input_ids"], output_router_logits=True, use_cache=False)
        loss = F.cross_entropy(out.logits[:, -1].float(), batch["labels"]) + 0.01 * out.aux_loss
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def audit_seconds(preset: str, n_examples: int, repeats: int = 3) -> float:
    """Median wall time of one router audit (every figure, ablations included)."""
    model = make_model(preset)
    audit = RouterAudit(n_examples=n_examples)
    audit.bind(model, TASK)
    audit.evaluate(model, TASK)  # builds the audit set
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        audit.evaluate(model, TASK)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def balanced_twins(batch: dict, warm_steps: int = 300) -> tuple[Callable[[], float], Callable[[], float]]:
    """A bias-balancing step and a plain step on a model that routes the same way: bias
    balancing changes which experts run (so the experts' cost), so its overhead is measured
    against a plain step with the selection bias that balancing converged to."""
    model = make_model("moe-tiny")
    balancing = our_step(model, batch, **ALL_TERMS, bias_rate=0.001)
    for _ in range(warm_steps):
        balancing()
    twin = make_model("moe-tiny")
    for layer in twin.moe_layers():
        twin.selection_bias(layer).copy_(model.selection_bias(layer))
    return balancing, plain_step(twin, batch)


def run(batch_size: int, rounds: int, threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    batch = TASK.sample(batch_size, 0)
    balancing, balanced_plain = balanced_twins(batch)
    return time_steps(
        {
            "moe-tiny: plain step": plain_step(make_model("moe-tiny"), batch),
            "moe-tiny: router, load balance + z-loss": our_step(
                make_model("moe-tiny"), batch, load_balance=0.01, z_loss=0.001
            ),
            "moe-tiny: router, all four terms": our_step(make_model("moe-tiny"), batch, **ALL_TERMS),
            "moe-tiny balanced: plain step": balanced_plain,
            "moe-tiny balanced: router, all four terms + bias balancing": balancing,
            "mixtral-tiny: plain step": plain_step(make_model("mixtral-tiny"), batch),
            "mixtral-tiny: transformers' aux loss": hf_aux_step(make_model("mixtral-tiny"), batch),
            "mixtral-tiny: router, load balance": our_step(make_model("mixtral-tiny"), batch, load_balance=0.01),
            "mixtral-tiny: router, all four terms": our_step(make_model("mixtral-tiny"), batch, **ALL_TERMS),
        },
        rounds=rounds,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--audit-every", type=int, default=500, help="audit cadence of configs/moe-router.yaml")
    parser.add_argument("--audit-examples", type=int, default=1024)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    ms = run(args.batch_size, args.rounds, args.threads)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads {args.threads}, "
        f"batch {args.batch_size}"
    )
    print("| step | ms/step | × plain |\n|---|---|---|")
    for name, value in ms.items():
        plain = ms[name.split(":")[0] + ": plain step"]  # against the plain step of the same model
        print(f"| {name} | {value:.2f} | {value / plain:.3f} |")
    audit_ms = 1000 * audit_seconds("moe-tiny", args.audit_examples)
    plain = ms["moe-tiny: plain step"]
    per_step = audit_ms / args.audit_every
    print(
        f"router audit ({args.audit_examples} examples, all figures): {audit_ms:.0f} ms; "
        f"every {args.audit_every} steps that is {per_step:.2f} ms/step = {per_step / plain:.3f} × a plain step"
    )
    if args.json:
        args.json.write_text(
            json.dumps({"ms_per_step": ms, "audit_ms": audit_ms, "batch_size": args.batch_size}, indent=2)
        )


if __name__ == "__main__":
    main()
