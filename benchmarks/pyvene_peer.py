"""A pyvene peer for timing our interchange-intervention training (IIT) step.

This builds the IIT step the way pyvene users write it (pyvene 0.1.8, "Interchange Intervention
Training" and DAS tutorials) for one of our ``faithful_train.modeling.transformer.Transformer``
models, at the site of ``configs/quickstart.yaml``: the output of ``model.blocks[0]`` (our
``blocks.0.resid_post``), token position 3, two variables on dims ``[0, 32)`` and ``[32, 64)``.

Two modes:

* ``"vanilla"``: ``pv.VanillaIntervention`` with ``subspace_partition=[[0, 32], [32, 64]]``; a
  variable swaps its half of the residual stream from the source.
* ``"rotated"`` (DAS): ``pv.LowRankRotatedSpaceIntervention`` with ``low_rank_dimension=64``
  and the same partition over the rotated coordinates (what our ``das.OrthonormalBasis`` is),
  or, with ``rotation="full"``, ``pv.RotatedSpaceIntervention``. The rotation is trained
  together with the model.

One step (``pyvene_iit_step``) is: task loss on the base (``output_original_output=True``), plus,
for each variable, one intervenable forward (a source forward and an intervened base forward)
with the counterfactual cross-entropy at the last position; backward; optimizer step. The
interchange term is averaged over the variables used, as ``InterchangeObjective`` does.

Why one intervenable call per variable: in pyvene 0.1.8 a batch whose examples target
*different* subspaces (``subspaces=[[[0], [1], ...]]``) is silently wrong for
``VanillaIntervention`` and ``RotatedSpaceIntervention``: ``_do_intervention_by_swap`` swaps the
union of all examples' subspaces in every example (``LowRankRotatedSpaceIntervention`` takes a
per-example Python loop instead). So the two variables cannot share one forward by mixing
subspaces; ``check_against_hooks`` demonstrates it.

pyvene is not a dependency of faithful_train; it is imported lazily. Install it beside the
project's environment without touching it (its declared dependencies, datasets, accelerate,
plotnine, ..., are not needed to import it, and torch must not be replaced)::

    .venv/bin/pip install --no-deps --target .bench pyvene==0.1.8
    PYVENE_LIB=.bench .venv/bin/python benchmarks/pyvene_peer.py --check --time

Caveats of pyvene for a plain ``nn.Module``: it needs ``model.config`` and ``model.device``
(``_PyveneAdapter`` provides them, so our model is not modified), ``IntervenableModel`` freezes
the model on construction (``enable_model_gradients`` undoes that, as IIT needs), and every
intervenable forward removes *all* forward hooks registered on the wrapped model.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.peers import import_peer  # noqa: E402

DEFAULT_PARTITION: tuple[tuple[int, int], ...] = ((0, 32), (32, 64))
MODES = ("vanilla", "rotated")


def import_pyvene() -> Any:
    """Import pyvene, from the venv or ``$PYVENE_LIB`` (first on ``sys.path``); its import-time
    notice about nnsight is swallowed."""
    return import_peer("pyvene", "PYVENE_LIB", "pip install --no-deps --target .bench pyvene==0.1.8", first=True)


class _PyveneAdapter(nn.Module):
    """Wraps our model for pyvene, which reads ``model.config`` and ``model.device`` and calls
    ``model(**inputs)``. The wrapped model is the same object (shared parameters)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = None  # only read for pyvene's built-in HF model types

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids)


@dataclass
class PyveneIIT:
    """What ``build_pyvene_iit`` returns: the intervenable model and its optimizer (model
    parameters and, in rotated mode, the rotation), plus the step's settings."""

    intervenable: Any  # pyvene.IntervenableModel
    optimizer: torch.optim.Optimizer
    mode: str
    position: int
    partition: tuple[tuple[int, int], ...]
    weight: float = 1.0

    @property
    def n_variables(self) -> int:
        return len(self.partition)

    @property
    def intervention(self) -> nn.Module:
        return next(iter(self.intervenable.interventions.values()))


def build_pyvene_iit(
    model: nn.Module,
    mode: str = "vanilla",
    position: int = 3,
    layer: int = 0,
    partition: Sequence[Sequence[int]] = DEFAULT_PARTITION,
    rotation: str = "low_rank",
    lr: float = 2e-3,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.98),
    weight: float = 1.0,
    seed: int | None = None,
) -> PyveneIIT:
    """An ``IntervenableModel`` intervening on ``model.blocks[layer]``'s output at ``position``,
    one variable per ``partition`` range of (rotated) dimensions, with gradients on for the model
    (IIT), and an AdamW optimizer grouped like ``FaithfulModule.configure_optimizers`` (weight
    decay on the model's matrices only; none on biases, norms or the rotation).

    ``mode``: ``"vanilla"`` or ``"rotated"``; ``rotation`` (rotated mode): ``"low_rank"``
    (``LowRankRotatedSpaceIntervention``, a ``d x k`` orthonormal basis, ``k`` the largest
    partition stop) or ``"full"`` (``RotatedSpaceIntervention``, ``d x d``). ``seed`` seeds the
    rotation's initialisation.
    """
    pv = import_pyvene()
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
    partition = tuple((int(a), int(b)) for a, b in partition)
    width = model.cfg.d_model
    kwargs: dict[str, Any] = {"embed_dim": width, "subspace_partition": [list(p) for p in partition]}
    rng = torch.random.fork_rng() if seed is not None else contextlib.nullcontext()
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
        if mode == "vanilla":
            intervention = pv.VanillaIntervention(**kwargs)
        elif rotation == "low_rank":
            rank = max(b for _, b in partition)
            intervention = pv.LowRankRotatedSpaceIntervention(low_rank_dimension=rank, **kwargs)
        elif rotation == "full":
            intervention = pv.RotatedSpaceIntervention(**kwargs)
        else:
            raise ValueError(f"unknown rotation {rotation!r}; valid: low_rank, full")
    config = pv.IntervenableConfig(
        representations=[
            pv.RepresentationConfig(
                component=f"model.blocks[{layer}].output", unit="pos", max_number_of_units=1, intervention=intervention
            )
        ]
    )
    intervenable = pv.IntervenableModel(config, _PyveneAdapter(model))
    intervenable.enable_model_gradients()  # IIT trains the model (pyvene freezes it by default)

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2] + [p for p in intervention.parameters() if p.requires_grad]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas)
    return PyveneIIT(intervenable, optimizer, mode, position, partition, weight)


def _per_variable(value: Tensor | Sequence[Tensor], n: int, single_ndim: int, what: str) -> list[Tensor]:
    """One tensor per variable: ``value`` is a sequence (or stacked tensor) of ``n`` of them, or
    one tensor of ``single_ndim`` dims, shared (sources) or allowed for one variable (labels)."""
    if isinstance(value, Tensor) and value.dim() == single_ndim:
        if what == "counterfactual_labels" and n != 1:
            raise ValueError("counterfactual_labels: give one (B,) tensor per variable when several are used")
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{what}: {len(values)} given for {n} variables")
    return values


def pyvene_iit_forward(
    peer: PyveneIIT,
    base_ids: Tensor,
    source_ids: Tensor | Sequence[Tensor],
    variables: Sequence[int] | None = None,
    output_original_output: bool = True,
) -> tuple[Tensor | None, list[Tensor]]:
    """The pyvene forwards of one step: the base logits (B, T, V) (or None) and, per variable,
    the intervened base logits. ``source_ids``: one (B, T) batch for all variables or one per
    variable."""
    variables = list(range(peer.n_variables)) if variables is None else list(variables)
    sources = _per_variable(source_ids, len(variables), 2, "source_ids")
    batch = base_ids.shape[0]
    original, counterfactuals = None, []
    for i, (variable, source) in enumerate(zip(variables, sources)):
        orig, cf = peer.intervenable(
            {"input_ids": base_ids},
            [{"input_ids": source}],
            unit_locations={"sources->base": peer.position},
            subspaces=[[[variable]] * batch],  # one intervention; every example targets `variable`
            output_original_output=output_original_output and i == 0,
        )
        if i == 0:
            original = orig
        counterfactuals.append(cf)
    return original, counterfactuals


def pyvene_iit_step(
    peer: PyveneIIT,
    optimizer: torch.optim.Optimizer | None,
    base_ids: Tensor,
    source_ids: Tensor | Sequence[Tensor],
    counterfactual_labels: Tensor | Sequence[Tensor],
    labels: Tensor,
    mode: str | None = None,
    variables: Sequence[int] | None = None,
) -> float:
    """One IIT training step with pyvene; returns the loss.

    ``loss = CE(base logits[:, -1], labels) + weight * mean_v CE(intervened_v logits[:, -1],
    counterfactual_labels[v])`` over ``variables`` (default: all; pass ``[v]`` for one variable
    per step). ``source_ids``: (B, T), or one (B, T) per variable; ``counterfactual_labels``: one
    (B,) per variable (a single (B,) tensor when one variable is used). ``optimizer``: None uses
    ``peer.optimizer``; ``mode``, if given, must be the mode ``peer`` was built with.
    """
    if mode is not None and mode != peer.mode:
        raise ValueError(f"peer was built for mode {peer.mode!r}, not {mode!r}")
    optimizer = peer.optimizer if optimizer is None else optimizer
    variables = list(range(peer.n_variables)) if variables is None else list(variables)
    targets = _per_variable(counterfactual_labels, len(variables), 1, "counterfactual_labels")
    optimizer.zero_grad(set_to_none=True)
    original, counterfactuals = pyvene_iit_forward(peer, base_ids, source_ids, variables)
    task = F.cross_entropy(original[:, -1].float(), labels)
    iit = sum(F.cross_entropy(cf[:, -1].float(), t) for cf, t in zip(counterfactuals, targets)) / len(variables)
    loss = task + peer.weight * iit
    loss.backward()
    optimizer.step()
    return loss.item()


# --- reference with plain forward hooks, for the check and as a no-pyvene timing baseline ---


def hooked_interchange_logits(
    model: nn.Module,
    base_ids: Tensor,
    source_ids: Tensor,
    position: int,
    dims: Sequence[int] | None = None,
    basis: Tensor | None = None,
    layer: int = 0,
) -> Tensor:
    """Logits of ``base_ids`` with ``blocks[layer]``'s output at ``position`` patched from
    ``source_ids``: the entries ``dims`` (per example: ``dims`` may be one list per example), or,
    with a ``d x k`` ``basis`` and ``dims`` its columns, ``h + ((s - h) Q) Q^T``."""
    block = model.blocks[layer]
    cache: dict[str, Tensor] = {}
    handle = block.register_forward_hook(lambda _m, _i, out: cache.__setitem__("source", out))
    try:
        model(source_ids)
    finally:
        handle.remove()
    src = cache["source"][:, position]

    def edit(_m: nn.Module, _i: Any, out: Tensor) -> Tensor:
        h = out[:, position]
        if basis is not None:
            q = basis[:, list(dims)]
            new = h + ((src - h) @ q) @ q.T
        elif dims and isinstance(dims[0], Sequence):  # one dim list per example
            mask = torch.zeros_like(h, dtype=torch.bool)
            for row, d in enumerate(dims):
                mask[row, list(d)] = True
            new = torch.where(mask, src, h)
        else:
            new = h.clone()
            new[:, list(dims)] = src[:, list(dims)]
        out = out.clone()
        out[:, position] = new
        return out

    handle = block.register_forward_hook(edit)
    try:
        return model(base_ids)
    finally:
        handle.remove()


def rotation_basis(peer: PyveneIIT) -> Tensor:
    """The rotated mode's ``d x k`` matrix whose columns the variables' coordinates are along."""
    return peer.intervention.rotate_layer.weight


def hooked_iit_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    base_ids: Tensor,
    source_ids: Tensor,
    counterfactual_labels: Sequence[Tensor],
    labels: Tensor,
    partition: Sequence[Sequence[int]] = DEFAULT_PARTITION,
    position: int = 3,
    basis_fn: Any = None,
) -> float:
    """The same computation as ``pyvene_iit_step`` (same forwards) with plain hooks: a baseline
    that separates pyvene's overhead from the cost of its forwards."""
    optimizer.zero_grad(set_to_none=True)
    task = F.cross_entropy(model(base_ids)[:, -1].float(), labels)
    terms = []
    for (a, b), target in zip(partition, counterfactual_labels):
        basis = basis_fn() if basis_fn is not None else None
        logits = hooked_interchange_logits(model, base_ids, source_ids, position, range(a, b), basis)
        terms.append(F.cross_entropy(logits[:, -1].float(), target))
    loss = task + sum(terms) / len(terms)
    loss.backward()
    optimizer.step()
    return loss.item()


# --- data, check and timing ---


def tiny_model(seed: int = 0) -> nn.Module:
    from faithful_train.modeling.transformer import Transformer, TransformerConfig

    torch.manual_seed(seed)
    return Transformer(TransformerConfig(vocab_size=18, max_seq_len=4, d_model=64, n_layers=2, n_heads=4, d_mlp=256))


def hierarchical_equality_batch(batch_size: int, seed: int = 0) -> dict[str, Any]:
    """A hierarchical-equality batch with in-batch sources (``base[perm]``, as our objective
    uses) and each variable's counterfactual labels."""
    from faithful_train.tasks.hierarchical_equality import HierarchicalEquality

    task = HierarchicalEquality(n_symbols=16)
    generator = torch.Generator().manual_seed(seed)
    batch = task.generate(batch_size, generator)
    perm = torch.randperm(batch_size, generator=generator)
    base_vars = {v: batch[f"var/{v}"] for v in task.variables}
    cf_labels = [task.label_from_variables({**base_vars, v: base_vars[v][perm]}) for v in task.variables]
    return {
        "base_ids": batch["input_ids"],
        "source_ids": batch["input_ids"][perm],
        "labels": batch["labels"],
        "counterfactual_labels": cf_labels,
    }


def check_against_hooks(seed: int = 0) -> dict[str, float]:
    """Max |pyvene - hooks| over logits (and, for one full IIT loss, gradients) on a tiny random
    model, position 3; plus how far pyvene's mixed-subspace batch is from the correct one."""
    results: dict[str, float] = {}
    model = tiny_model(seed)
    data = hierarchical_equality_batch(16, seed)
    base, source = data["base_ids"], data["source_ids"]

    peer = build_pyvene_iit(model, "vanilla")
    for v, (a, b) in enumerate(peer.partition):
        _, (cf,) = pyvene_iit_forward(peer, base, source, [v], output_original_output=False)
        ref = hooked_interchange_logits(model, base, source, peer.position, range(a, b))
        results[f"vanilla/var{v}/logits"] = (cf - ref).abs().max().item()
    results["vanilla/patch_effect"] = (model(base) - ref).abs().max().item()  # the patch does something

    # one forward with per-example subspaces (half var0, half var1): pyvene swaps the union
    n = base.shape[0]
    mixed = [[0]] * (n // 2) + [[1]] * (n - n // 2)
    _, cf = peer.intervenable(
        {"input_ids": base}, [{"input_ids": source}], unit_locations={"sources->base": 3}, subspaces=[mixed]
    )
    dims = [list(range(*peer.partition[s[0]])) for s in mixed]
    results["vanilla/mixed_subspaces_vs_correct"] = (
        (cf - hooked_interchange_logits(model, base, source, 3, dims)).abs().max().item()
    )
    results["vanilla/mixed_subspaces_vs_swap_all"] = (
        (cf - hooked_interchange_logits(model, base, source, 3, range(64))).abs().max().item()
    )

    for rotation in ("low_rank", "full"):
        peer = build_pyvene_iit(model, "rotated", rotation=rotation, seed=seed)
        with torch.no_grad():  # a non-trivial rotation
            peer.intervention.rotate_layer.parametrizations.weight.original.normal_()
        for v, (a, b) in enumerate(peer.partition):
            _, (cf,) = pyvene_iit_forward(peer, base, source, [v], output_original_output=False)
            ref = hooked_interchange_logits(model, base, source, 3, range(a, b), rotation_basis(peer))
            results[f"rotated-{rotation}/var{v}/logits"] = (cf - ref).abs().max().item()

    # gradients of one full IIT loss (task + both variables), pyvene vs hooks, rotated low-rank
    peer = build_pyvene_iit(model, "rotated", seed=seed)
    params = list(model.parameters()) + list(peer.intervention.parameters())

    def grads(loss_fn: Any) -> list[Tensor]:
        for p in params:
            p.grad = None
        loss_fn().backward()
        return [p.grad.clone() for p in params]

    def pyvene_loss() -> Tensor:
        original, cfs = pyvene_iit_forward(peer, base, source)
        task = F.cross_entropy(original[:, -1], data["labels"])
        return task + sum(F.cross_entropy(c[:, -1], t) for c, t in zip(cfs, data["counterfactual_labels"])) / 2

    def hooks_loss() -> Tensor:
        task = F.cross_entropy(model(base)[:, -1], data["labels"])
        cfs = [
            hooked_interchange_logits(model, base, source, 3, range(a, b), rotation_basis(peer))
            for a, b in peer.partition
        ]
        return task + sum(F.cross_entropy(c[:, -1], t) for c, t in zip(cfs, data["counterfactual_labels"])) / 2

    g_pv, g_ref = grads(pyvene_loss), grads(hooks_loss)
    results["rotated-low_rank/iit_loss_grads"] = max((a - b).abs().max().item() for a, b in zip(g_pv, g_ref))
    return results


def time_steps(steps: dict[str, Any], warmup: int = 5, rounds: int = 30) -> dict[str, float]:
    """Median wall time in ms of each ``steps[name]()``, measured in interleaved rounds (one call
    of each per round) so that drifting load on a shared machine hits all of them alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def benchmark(batch_size: int = 128, rounds: int = 30, threads: int = 1) -> dict[str, float]:
    """ms/step (median) for pyvene IIT steps and the plain-hook baseline, on the quickstart's
    dense-tiny shape (d_model 64, 2 layers) with hierarchical-equality batches."""
    torch.set_num_threads(threads)
    data = hierarchical_equality_batch(batch_size)
    base, source, cf, labels = data["base_ids"], data["source_ids"], data["counterfactual_labels"], data["labels"]

    def pyvene_step(mode: str, variables: list[int] | None) -> Any:
        peer = build_pyvene_iit(tiny_model(), mode, seed=0)
        targets = cf if variables is None else cf[variables[0]]
        return lambda: pyvene_iit_step(peer, None, base, source, targets, labels, variables=variables)

    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.98), weight_decay=0.01)
    steps = {
        "pyvene vanilla, 2 variables (2 intervenable calls)": pyvene_step("vanilla", None),
        "pyvene vanilla, 1 variable per step": pyvene_step("vanilla", [0]),
        "pyvene rotated (low-rank DAS), 2 variables": pyvene_step("rotated", None),
        "pyvene rotated (low-rank DAS), 1 variable per step": pyvene_step("rotated", [0]),
        "plain hooks, same 5 forwards, vanilla, 2 variables": lambda: hooked_iit_step(
            model, optimizer, base, source, cf, labels
        ),
    }
    return time_steps(steps, rounds=rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare pyvene with plain hooks")
    parser.add_argument("--time", action="store_true", help="time the steps")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    pv = import_pyvene()
    print(
        f"pyvene {importlib.metadata.version('pyvene')} from {os.path.dirname(pv.__file__)}, torch {torch.__version__}"
    )
    if args.check or not args.time:
        for name, value in check_against_hooks().items():
            print(f"{name:48s} max abs diff {value:.3g}")
    if args.time:
        for name, ms in benchmark(args.batch_size, args.rounds, args.threads).items():
            print(f"{name:56s} {ms:7.2f} ms/step")


if __name__ == "__main__":
    main()
