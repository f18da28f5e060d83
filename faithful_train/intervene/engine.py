"""The batched-variants engine: every forward with edits runs here.

A *variant* of a batch is the batch with some sites edited. Interchange swaps, circuit
ablations, patching sweeps, expert masks, ERASER removals and attribution's site function are
all sets of variants. ``run_variants`` runs ``K`` of them over a batch of ``B`` rows:

- it stacks them into ``K * B`` rows (variant-major: rows ``k*B .. (k+1)*B`` are variant ``k``);
- it resumes at the first block any edit touches: everything below is the clean forward,
  computed once on ``B`` rows (or taken from the caller's cache, e.g. the training step's
  forward) and tiled, so gradients still reach the layers below;
- in the last block it computes only the positions it reads (when no edit lies past that
  block's ``resid_pre``);
- it chunks the variants so that one forward's activations stay within a memory budget.

Edits are ``VariantEdit``s: ``fn(activation, variants) -> replacement``, where ``activation`` holds
the rows of the variants ``variants`` (a ``range`` of variant indices; ``len(variants) * B`` rows).
``per_variant`` builds one from edits of single variants; a caller with a vectorised form (a
mask per variant) writes it directly.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.stateless import _reparametrize_module

from faithful_train.intervene.sites import Edit, hooked
from faithful_train.modeling.interface import can_resume, hidden_size, n_layers, resid_before
from faithful_train.tasks.batch import answer_positions

VariantEdit = Callable[[Tensor, range], Tensor]

# bytes one forward's activations may take (an estimate, see ``variants_per_chunk``)
MEMORY_BUDGET = 2 << 30
# activations kept per block and row, in units of the residual stream (attention, MLP, norms
# and what autograd keeps for backward)
_ACTIVATIONS_PER_BLOCK = 16

_BLOCK_SITE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def per_variant(edits: Mapping[int, Edit | Sequence[Edit]], block: int) -> VariantEdit:
    """A ``VariantEdit`` from edits of single variants: ``edits[k]`` (a function, or several
    applied in order) rewrites variant ``k``'s ``block`` rows; other variants pass unchanged."""
    fns = {k: [fn] if callable(fn) else list(fn) for k, fn in edits.items()}

    def apply(t: Tensor, variants: range) -> Tensor:
        pieces, start = [], 0  # runs of unedited variants pass as one slice
        for i, k in enumerate(variants):
            if k not in fns:
                continue
            if start < i:
                pieces.append(t[start * block : i * block])
            part = t[i * block : (i + 1) * block]
            for fn in fns[k]:
                part = fn(part)
            pieces.append(part)
            start = i + 1
        if not pieces:
            return t
        if start < len(variants):
            pieces.append(t[start * block :])
        return torch.cat(pieces)

    return apply


def every_variant(fn: Edit) -> VariantEdit:
    """The same edit on every variant's rows (e.g. an edit that is already per row)."""
    return lambda t, _variants: fn(t)


@dataclass(frozen=True)
class ResumePlan:
    """Start an edited run at block ``layer``; edits on ``aliases``' keys move to their values."""

    layer: int
    aliases: Mapping[str, str]
    # no edit inside the last block (past its resid_pre): a run that reads a few positions
    # may run that block for those positions alone
    last_only: bool = False

    @property
    def site(self) -> str:
        """The clean activation the run resumes from (record it in the step's forward)."""
        return f"blocks.{self.layer}.resid_pre"

    def clean(self, cache: Mapping[str, Tensor] | None) -> Tensor | None:
        """The clean resume activation from ``cache`` under any of its names, or ``None``."""
        if not cache:
            return None
        if self.site in cache:
            return cache[self.site]
        return next((cache[name] for name, alias in self.aliases.items() if alias == self.site and name in cache), None)


def plan_resume(model: nn.Module, site_names: Iterable[str]) -> ResumePlan | None:
    """The latest block a run that edits ``site_names`` can resume at, or ``None`` (full forward).

    ``blocks.i.resid_post`` is ``blocks.{i+1}.resid_pre`` and ``embed`` is ``blocks.0.resid_pre``,
    so edits there resume one block later (or at block 0)."""
    if not can_resume(model):
        return None
    layers = n_layers(model)
    layer, aliases = layers, {}
    for name in site_names:
        if name == "embed":
            aliases[name], start = "blocks.0.resid_pre", 0
        else:
            match = _BLOCK_SITE.match(name)
            if match is None:  # e.g. "final": no block to resume at
                return None
            i, rest = int(match[1]), match[2]
            start = i + 1 if rest == "resid_post" and i + 1 < layers else i
            aliases[name] = f"blocks.{i + 1}.resid_pre" if start == i + 1 else name
        layer = min(layer, start)
    if layer >= layers:
        return None
    last = f"blocks.{layers - 1}."
    last_only = all(not a.startswith(last) or a == f"{last}resid_pre" for a in aliases.values())
    return ResumePlan(layer, aliases, last_only)


def narrows_last_block(model: nn.Module, site_names: Iterable[str]) -> bool:
    """Whether a forward that edits ``site_names`` may run its last block at the read positions
    only: no edit past that block's ``resid_pre`` (those sites would have fewer positions)."""
    layers = n_layers(model)
    if layers is None:
        return False
    last = f"blocks.{layers - 1}."
    return all(name != "final" and (not name.startswith(last) or name == f"{last}resid_pre") for name in site_names)


def variants_per_chunk(count: int, rows: int, row_bytes: int, budget: int) -> int:
    """How many variants (of ``rows`` rows each, ``row_bytes`` per row) one forward may run."""
    return max(1, min(count, budget // max(1, rows * row_bytes)))


def run_variants(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    count: int,
    edits: Mapping[str, VariantEdit | Sequence[VariantEdit]],
    read: Tensor | None = None,
    cache: Mapping[str, Tensor] | None = None,
    input_ids: Tensor | None = None,
    resume: bool = True,
    memory_budget: int | None = None,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Logits ``(count * B, P, vocab)`` of ``count`` edited variants of ``batch`` at the positions
    ``read`` ``(B, P)`` (default: the answer positions), variant-major.

    ``cache``: clean activations of ``batch`` (e.g. recorded in the step's forward); the run
    resumes from the clean ``resid_pre`` of the first edited block, computed once on ``B`` rows
    if the cache lacks it. ``input_ids`` ``(count * B, T)``: per-variant inputs (e.g. teacher-forced
    counterfactual answers, or a document removed), run in full, with their own
    ``attention_mask`` ``(count * B, T)`` if given. ``resume=False`` forces full forwards.
    """
    ids = batch["input_ids"]
    B, T = ids.shape
    mask = batch.get("attention_mask")
    read = answer_positions(batch) if read is None else read
    edits = {name: [fn] if callable(fn) else list(fn) for name, fn in edits.items()}
    plan = plan_resume(model, edits) if resume and input_ids is None else None
    if plan is not None:
        start = plan.clean(cache)
        if start is None:
            start = resid_before(model, plan.layer, ids, mask)
        moved: dict[str, list[VariantEdit]] = defaultdict(list)
        for name, fns in edits.items():
            moved[plan.aliases.get(name, name)].extend(fns)
        edits, blocks_run = moved, n_layers(model) - plan.layer
        row_bytes = start[0].numel() * start.element_size() * (blocks_run * _ACTIVATIONS_PER_BLOCK + 1)
    else:
        width = hidden_size(model) or 1024  # a model that does not say: assume a wide one
        row_bytes = T * width * 4 * ((n_layers(model) or 1) * _ACTIVATIONS_PER_BLOCK + 1)
    step = variants_per_chunk(count, B, row_bytes, MEMORY_BUDGET if memory_budget is None else memory_budget)
    narrow = plan.last_only if plan is not None else narrows_last_block(model, edits)
    out = []
    for first in range(0, count, step):
        variants = range(first, min(count, first + step))
        k = len(variants)
        bound = {name: [_bind(fn, variants) for fn in fns] for name, fns in edits.items()}
        tiled_mask = None if mask is None else mask.repeat(k, 1)
        if attention_mask is not None:
            tiled_mask = attention_mask[first * B : (first + k) * B]
        with hooked(model, edits=bound):
            if plan is not None:
                resid = start.repeat(k, *([1] * (start.dim() - 1)))
                out.append(model.forward_from(plan.layer, resid, tiled_mask, read.repeat(k, 1), narrow=narrow))
            else:
                rows = ids.repeat(k, 1) if input_ids is None else input_ids[first * B : (first + k) * B]
                out.append(model(rows, attention_mask=tiled_mask, positions=read.repeat(k, 1), narrow=narrow))
    return out[0] if len(out) == 1 else torch.cat(out)


def _bind(fn: VariantEdit, variants: range) -> Edit:
    return lambda t: fn(t, variants)


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Run ``model`` with detached parameters: losses computed inside send no gradient to it
    (e.g. a DAS search that trains only the rotation)."""
    detached = {name: p.detach() for name, p in model.named_parameters()}
    with _reparametrize_module(model, detached, tie_weights=True):
        yield
