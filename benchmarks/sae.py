"""The online SAE's cost, and parity and throughput against EleutherAI's sparsify.

    make benchmarks            # or: SPARSIFY_LIB=.bench .venv/bin/python benchmarks/sae.py

1. **Cost per training step** (``configs/sae.yaml``'s shape: dense-tiny, domain_mixture, batch
   128, a TopK SAE of 128 latents, k 16, on ``blocks.1.resid_post``): a full step with the
   ``sae`` objective (forward recording the site, answer loss, SAE term, backward, AdamW,
   decoder upkeep) against a plain step, as a ratio; and with ``max_rows: 256`` (a random
   third of the step's 768 tokens).
2. **Throughput on the same activations** against sparsify's ``SparseCoder`` (a peer only,
   installed beside the venv: ``make .bench/sparsify``): SAE training steps (forward, FVU,
   backward, Adam step, decoder upkeep) on the same fixed rows, same weights, same k, in
   tokens per second.
3. ``--parity IN OUT`` (used by ``tests/unit/intervene/test_sae_parity.py``, in a process of its own so
   sparsify's packages never enter the test's): sparsify's outputs and gradients for the
   weights and rows in ``IN``.

Timings are medians over interleaved rounds (``time_steps``), one thread.
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.interchange_step import plain_step  # noqa: E402
from benchmarks.peers import import_peer  # noqa: E402
from benchmarks.pyvene_peer import time_steps  # noqa: E402
from faithful_train.intervene.sae import SparseAutoencoder  # noqa: E402
from faithful_train.intervene.sites import run_with  # noqa: E402
from faithful_train.modeling import build_model  # noqa: E402
from faithful_train.objectives.base import StepContext  # noqa: E402
from faithful_train.objectives.sae import SaeObjective  # noqa: E402
from faithful_train.tasks.domain_mixture import DomainMixture  # noqa: E402
from faithful_train.training.config import find_preset  # noqa: E402

TASK = DomainMixture()


def sparsify() -> Any:
    """The ``sparsify`` package, from the environment or ``$SPARSIFY_LIB``; ``None`` if absent."""
    try:
        return import_peer("sparsify", "SPARSIFY_LIB", "make .bench/sparsify")
    except ImportError:
        return None


def make_model() -> torch.nn.Module:
    from omegaconf import OmegaConf

    return build_model(OmegaConf.load(find_preset("dense-tiny")), TASK.vocab_size, TASK.seq_len, seed=0).train()


def sae_step(model: torch.nn.Module, batch: dict, max_rows: int | None = None) -> Callable[[], float]:
    objective = SaeObjective(
        site="blocks.1.resid_post", expansion=2, k=16, lr=1e-3, auxk_alpha=0.25, dead_after=2000, max_rows=max_rows
    )
    objective.bind(model, TASK)
    optimizer = torch.optim.AdamW(
        [{"params": list(model.parameters())}, {"params": list(objective.sae.parameters()), "lr": 1e-3}], lr=2e-3
    )
    counter = iter(range(10**9))

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        logits, cache = run_with(model, batch["input_ids"], record=objective.sites())
        loss = F.cross_entropy(logits[:, -1].float(), batch["labels"])
        k = next(counter)
        loss = loss + objective.term(
            StepContext(batch, logits, cache, model, TASK, k, torch.Generator().manual_seed(k))
        )
        loss.backward()
        objective.sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        objective.sae.set_decoder_norm_to_unit_norm()
        return loss.item()

    return step


def ours_training(sae: SparseAutoencoder, rows: torch.Tensor) -> Callable[[], float]:
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        out = sae(rows)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        sae.set_decoder_norm_to_unit_norm()
        return out.fvu.item()

    return step


def theirs_training(coder: Any, rows: torch.Tensor) -> Callable[[], float]:
    optimizer = torch.optim.Adam(coder.parameters(), lr=1e-3)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        coder.set_decoder_norm_to_unit_norm()
        out = coder(rows)
        out.fvu.backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        return out.fvu.item()

    return step


def sparsify_coder(peer: Any, sae: SparseAutoencoder) -> Any:
    """sparsify's ``SparseCoder`` holding ``sae``'s weights."""
    coder = peer.SparseCoder(sae.d_in, peer.SparseCoderConfig(num_latents=sae.n_latents, k=sae.k))
    with torch.no_grad():
        coder.encoder.weight.copy_(sae.encoder.weight)
        coder.encoder.bias.copy_(sae.encoder.bias)
        coder.W_dec.copy_(sae.W_dec)
        coder.b_dec.copy_(sae.b_dec)
    return coder


def parity(src: str, dst: str) -> int:
    peer = sparsify()
    if peer is None:
        print("sparsify is not importable")
        return 3
    data = torch.load(src)
    sae = SparseAutoencoder(data["d_in"], data["n_latents"], k=data["k"])
    sae.load_state_dict(data["state"], strict=False)
    coder = sparsify_coder(peer, sae)
    out = coder(data["rows"], dead_mask=data["dead"])
    (out.fvu + out.auxk_loss).backward()
    latents = torch.zeros(data["rows"].shape[0], sae.n_latents).scatter(-1, out.latent_indices, out.latent_acts.float())
    torch.save(
        {
            "reconstruction": out.sae_out.detach(),
            "latents": latents.detach(),
            "fvu": out.fvu.detach(),
            "auxk": out.auxk_loss.detach(),
            "grad_W_dec": coder.W_dec.grad,
            "grad_b_dec": coder.b_dec.grad,
            "grad_W_enc": coder.encoder.weight.grad,
        },
        dst,
    )
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parity", nargs=2, metavar=("IN", "OUT"))
    args = parser.parse_args()
    if args.parity:
        sys.exit(parity(*args.parity))
    torch.set_num_threads(args.threads)
    batch = TASK.generate(args.batch_size, torch.Generator().manual_seed(0))
    steps = {"plain step": plain_step(make_model(), batch), "with the sae objective": sae_step(make_model(), batch)}
    steps["with the sae objective, max_rows 256"] = sae_step(make_model(), batch, max_rows=256)
    times = time_steps(steps, rounds=args.rounds)
    print(f"torch {torch.__version__}, {platform.machine()}, threads {args.threads}, batch {args.batch_size}")
    print("| step (configs/sae.yaml's shape) | ms | × plain |\n|---|---|---|")
    for name, value in times.items():
        print(f"| {name} | {value:.2f} | {value / times['plain step']:.2f} |")
    peer = sparsify()
    if peer is None:
        print("sparsify is not importable (make .bench/sparsify): no throughput comparison")
        return
    print(
        "\n| SAE training on the same rows | d_in | latents | k | rows "
        "| ours (tokens/s) | sparsify (tokens/s) | ours / sparsify |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    for d_in, n_latents, k, n in ((64, 512, 16, 4096), (256, 4096, 32, 4096)):
        torch.manual_seed(0)
        rows = torch.randn(n, d_in)
        sae = SparseAutoencoder(d_in, n_latents, k=k)
        coder = sparsify_coder(peer, sae)
        timed = time_steps(
            {"ours": ours_training(sae, rows), "sparsify": theirs_training(coder, rows)},
            rounds=max(5, args.rounds // 3),
        )
        ours, theirs = n / (timed["ours"] / 1000), n / (timed["sparsify"] / 1000)
        print(f"| | {d_in} | {n_latents} | {k} | {n} | {ours:,.0f} | {theirs:,.0f} | {ours / theirs:.2f} |")


if __name__ == "__main__":
    main()
