"""Time of integrated gradients at the embeddings, ours against captum's, on one batch.

    .venv/bin/python benchmarks/attribution.py [--rounds 30] [--batch-size 128] [--steps 32]

Model: the ``dense-tiny`` preset (d_model 64, 2 layers, 4 heads, d_mlp 256) sized for
hierarchical equality (vocab 18, 4 tokens), random weights, eval mode, float32; a batch of
hierarchical-equality prompts, attributing the logit of the label at the last position.

Both compute the same thing: Gauss-Legendre integrated gradients with a zero baseline at the
``embed`` site, ``--steps`` points, and the convergence delta (so ``f(x)`` and ``f(baseline)``).
captum: ``IntegratedGradients(lambda emb: model.forward_from(0, emb)[:, -1])`` with
``target=labels``, ``return_convergence_delta=True``, the embeddings computed in the step.
Ours: ``attribute_tokens`` (fast path: ``forward_from(0, z, last_only=True)``, one call of
``(steps + 2) * B`` rows, one ``autograd.grad``); also, for reference, ours on the generic
hooked path (a full forward of the repeated ``input_ids`` with the ``embed`` site edited).
Timings: medians over interleaved rounds (``time_steps``), one thread.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.pyvene_peer import time_steps  # noqa: E402
from faithful_train.functional.attribution import attribute_tokens, integrated_gradients, site_function  # noqa: E402
from faithful_train.modeling import build_model  # noqa: E402
from faithful_train.tasks.hierarchical_equality import HierarchicalEquality  # noqa: E402
from faithful_train.training.config import find_preset  # noqa: E402

TASK = HierarchicalEquality()
METHOD = "gausslegendre"


def make_model() -> torch.nn.Module:
    from omegaconf import OmegaConf

    return build_model(OmegaConf.load(find_preset("dense-tiny")), TASK.vocab_size, TASK.seq_len, seed=0).eval()


def captum_ig(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, steps: int) -> tuple[Any, Any]:
    from captum.attr import IntegratedGradients

    ig = IntegratedGradients(lambda emb: model.forward_from(0, emb)[:, -1])
    emb = model.embed(ids).detach()
    return ig.attribute(emb, target=labels, n_steps=steps, method=METHOD, return_convergence_delta=True)


def ours_ig(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, steps: int, fast: bool = True) -> Any:
    if fast:
        return attribute_tokens(model, ids, labels, steps=steps, quadrature=METHOD)
    emb, fn = site_function(model, ids, "embed", labels, fast=False)
    return integrated_gradients(fn, emb, steps=steps, method=METHOD)


def run(batch_size: int, steps: int, rounds: int, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = make_model()
    batch = TASK.generate(batch_size, torch.Generator().manual_seed(0))
    ids, labels = batch["input_ids"], batch["labels"]

    theirs, their_delta = captum_ig(model, ids, labels, steps)
    ours = ours_ig(model, ids, labels, steps)
    hooked = ours_ig(model, ids, labels, steps, fast=False)
    checks = {
        "max_abs_diff_attributions": (ours.features - theirs).abs().max().item(),
        "max_abs_attribution": theirs.abs().max().item(),
        "max_abs_diff_delta": (ours.delta - their_delta).abs().max().item(),
        "max_abs_delta_ours": ours.delta.abs().max().item(),
        "max_abs_delta_captum": their_delta.abs().max().item(),
        "max_abs_diff_hooked_vs_fast": (hooked.values - ours.features).abs().max().item(),
    }
    ms = time_steps(
        {
            "captum IntegratedGradients": lambda: captum_ig(model, ids, labels, steps),
            "ours (forward_from, last_only)": lambda: ours_ig(model, ids, labels, steps),
            "ours (generic hooked path)": lambda: ours_ig(model, ids, labels, steps, fast=False),
        },
        rounds=rounds,
    )
    return {"ms": ms, "checks": checks, "batch_size": batch_size, "steps": steps, "threads": threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    result = run(args.batch_size, args.steps, args.rounds, args.threads)
    import captum

    print(
        f"torch {torch.__version__}, captum {captum.__version__}, {platform.processor() or platform.machine()}, "
        f"threads {args.threads}, batch {args.batch_size}, {args.steps} steps {METHOD}, dense-tiny"
    )
    ms = result["ms"]
    captum_ms = ms["captum IntegratedGradients"]
    print("| attribution | ms | × captum |\n|---|---|---|")
    for name, value in ms.items():
        print(f"| {name} | {value:.2f} | {value / captum_ms:.3f} |")
    for name, value in result["checks"].items():
        print(f"{name:32s} {value:.3g}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
