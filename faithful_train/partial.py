"""Partial forwards: a patched run resumes at the first block it changes.

An intervention at ``blocks.i.*`` leaves everything below block ``i`` as it was in the clean
forward, so the patched run can start from the clean ``blocks.i.resid_pre`` (recorded in the
step's forward) instead of re-running the embedding and blocks ``0..i-1``. ``blocks.i.resid_post``
is the same tensor as ``blocks.{i+1}.resid_pre``, so a patch there starts one block later still,
and ``embed`` is ``blocks.0.resid_pre``.

Models that can resume implement ``forward_from(layer, resid) -> logits`` (our transformer);
others (Hugging Face adapters) get a full forward.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from torch import Tensor, nn
from torch.nn.utils.stateless import _reparametrize_module

from faithful_train.modeling.interface import can_resume, n_layers
from faithful_train.sites import Edit, hooked

_BLOCK_SITE = re.compile(r"^blocks\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class ResumePlan:
    """Start a patched run at block ``layer``; edits on ``aliases``' keys move to their values."""

    layer: int
    aliases: Mapping[str, str]
    # no edit inside the last block (past its resid_pre): a caller that needs only the last
    # position's logits may run that block for the last position alone
    last_only: bool = False

    @property
    def site(self) -> str:
        """The clean activation the run resumes from (record it in the step's forward)."""
        return f"blocks.{self.layer}.resid_pre"


def plan_resume(model: nn.Module, site_names: Iterable[str]) -> ResumePlan | None:
    """The latest block a run that edits ``site_names`` can resume at, or ``None`` (full forward)."""
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


def run_patched(
    model: nn.Module,
    base_ids: Tensor,
    repeats: int,
    edits: Mapping[str, Sequence[Edit]],
    base_cache: Mapping[str, Tensor] | None = None,
    plan: ResumePlan | None = None,
    positions: Tensor | None = None,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Logits ``(repeats * B, P, vocab)`` at ``positions`` ``(B, P)`` (default: every position,
    ``(repeats * B, T, vocab)``) of ``base_ids`` tiled ``repeats`` times (padding
    ``attention_mask`` tiled too), with ``edits``.

    With a ``plan`` and the clean ``plan.site`` in ``base_cache``, only blocks ``plan.layer..``
    run; gradients still reach the layers below through the cached activation. Where no edit
    lies past the last block's ``resid_pre``, that block computes only the read positions.
    """
    positions = None if positions is None else positions.repeat(repeats, 1)
    mask = None if attention_mask is None else attention_mask.repeat(repeats, 1)
    if plan is None or base_cache is None or plan.site not in base_cache:
        with hooked(model, edits=edits):
            narrow = narrows_last_block(model, edits)
            return model(base_ids.repeat(repeats, 1), attention_mask=mask, positions=positions, narrow=narrow)
    moved: dict[str, list[Edit]] = defaultdict(list)
    for name, fns in edits.items():
        moved[plan.aliases.get(name, name)].extend(fns)
    resid = base_cache[plan.site]
    with hooked(model, edits=moved):
        tiled = resid.repeat(repeats, *([1] * (resid.dim() - 1)))
        return model.forward_from(plan.layer, tiled, mask, positions, narrow=plan.last_only)


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Run ``model`` with detached parameters: losses computed inside send no gradient to it
    (e.g. a DAS search that trains only the rotation)."""
    detached = {name: p.detach() for name, p in model.named_parameters()}
    with _reparametrize_module(model, detached, tie_weights=True):
        yield
