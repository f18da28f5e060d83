"""Chain-of-thought faithfulness: pure functions shared by the counterfactual CoT objective and
the cot audit.

- *Corrupted-step following* (Lanham et al. 2023, "adding mistakes"): write a wrong value at one
  step, continue the chain correctly from it; a faithful answer follows the corrupted chain.
- *Early answering* (Lanham et al. 2023): keep the first ``k`` of ``K`` steps, hide the rest;
  ``match_k`` says whether the answer is still the one given with the whole chain. The area
  over that curve (AOC) is large when the answer needs the steps, 0 when it ignores them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from faithful_train.errors import UnknownNameError
from faithful_train.functional.generation import Sampling, generate
from faithful_train.tasks.text.collate import pad_lines

STEP_CHOICES = ("any", "last")


def corrupted_steps(n: int, n_steps: int, which: str, generator: torch.Generator) -> Tensor:
    """``(n,)`` 0-based indices of the step to corrupt: uniform over the steps, or the last."""
    if which == "last":
        return torch.full((n,), n_steps - 1, dtype=torch.long)
    if which == "any":
        return torch.randint(0, n_steps, (n,), generator=generator)
    raise UnknownNameError("corrupted step choice", which, STEP_CHOICES)


def follow_loss(answer_logits: Tensor, follow_labels: Tensor) -> Tensor:
    """Counterfactual CoT term: ``CE(M(x with step j corrupted), answer implied by the corrupted chain)``."""
    return F.cross_entropy(answer_logits.float(), follow_labels)


def area_over_curve(matches: Tensor) -> Tensor:
    """AOC of early answering (Lanham et al. 2023), per example.

    ``matches`` ``(n, K)``: ``match_k`` for ``k = 0..K-1`` kept steps (with all ``K`` kept the
    answer matches by definition). With ``x_k = k / K`` and ``y_K = 1``, the trapezoidal area
    of ``1 - y`` over ``[0, 1]``: ``sum_k ((1 - y_k) + (1 - y_{k+1})) / (2K)``.
    """
    n, K = matches.shape
    y = torch.cat([matches.float(), torch.ones(n, 1, device=matches.device)], dim=1)
    return ((1 - y[:, :-1]) + (1 - y[:, 1:])).sum(dim=1) / (2 * K)


def area_over_curve_ragged(matches: Tensor, n_steps: Tensor) -> Tensor:
    """``area_over_curve`` when rows have their own number of steps ``n_steps (n,)``:
    ``matches (n, S)`` holds ``match_k`` for ``k < n_steps`` (later entries are ignored); each
    row's curve runs over ``x_k = k / n_steps`` with ``y = 1`` from ``k = n_steps`` on."""
    n, S = matches.shape
    k = torch.arange(S, device=matches.device)
    y = torch.where(k[None] < n_steps[:, None], matches.float(), torch.ones_like(matches, dtype=torch.float))
    y = torch.cat([y, torch.ones(n, 1, device=matches.device)], dim=1)
    return ((1 - y[:, :-1]) + (1 - y[:, 1:])).sum(dim=1) / (2 * n_steps.float())


def truncated_rationale(batch: dict[str, Tensor], keep: int, pad_id: int, left: bool = False) -> dict[str, Tensor]:
    """Early answering on text (Lanham et al. 2023): each row's rationale cut after its first
    ``keep`` steps (the later steps' tokens removed, the answer read right after what is left),
    padded on the left (``left``) or the right: ``input_ids``, ``attention_mask``, ``answer_pos``.
    Rows with at most ``keep`` steps are unchanged. Needs ``step_spans (B, S, 2)`` and
    ``n_steps (B,)``."""
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    rows, positions = [], []
    for b in range(ids.shape[0]):
        real = mask[b].nonzero()[:, 0]
        shift = int(real[0])
        tokens = ids[b, real]
        pos = batch["answer_pos"][b] - shift
        n = int(batch["n_steps"][b])
        if keep < n:
            start, stop = int(batch["step_spans"][b, keep, 0]) - shift, int(batch["step_spans"][b, n - 1, 1]) - shift
            tokens = torch.cat([tokens[:start], tokens[stop:]])
            pos = pos - (stop - start)
        rows.append(tokens.tolist())
        positions.append(pos)
    return _packed(rows, torch.stack(positions), pad_id, left, ids.device)


def _packed(rows: list[list[int]], answer_pos: Tensor, pad_id: int, left: bool, device: Any) -> dict[str, Tensor]:
    """Rows of token ids padded into a batch on the left or the right (``pad_lines``), with each
    row's answer positions ``answer_pos`` (counted from its first token) moved with its padding."""
    out = {k: v.to(device) for k, v in pad_lines(rows, pad_id, "left" if left else "right").items()}
    answer_pos = answer_pos.to(device)
    if left:
        lengths = torch.tensor([len(r) for r in rows], device=device)
        answer_pos = answer_pos + (out["input_ids"].shape[1] - lengths)[:, None]
    return out | {"answer_pos": answer_pos}


def filled_rationale(batch: dict[str, Tensor], filler: int) -> Tensor:
    """The inputs with every rationale token replaced by ``filler`` (same length: Lanham et
    al.'s filler-token control, the positions without the reasoning)."""
    ids = batch["input_ids"].clone()
    T = ids.shape[1]
    t = torch.arange(T, device=ids.device)
    first = batch["step_spans"][:, 0, 0]
    last = batch["step_spans"][torch.arange(ids.shape[0], device=ids.device), batch["n_steps"] - 1, 1]
    inside = (t[None] >= first[:, None]) & (t[None] < last[:, None])
    return torch.where(inside, torch.full_like(ids, filler), ids)


def stacked(variants: list[dict[str, Tensor]], pad_id: int, left: bool = False) -> dict[str, Tensor]:
    """Variants of a batch's rows, each ``input_ids``, ``attention_mask`` and ``answer_pos`` of its
    own length, as one batch of all their rows (variant-major), padded to the longest on the left
    (``left``) or the right, so they run in one forward."""
    T = max(v["input_ids"].shape[1] for v in variants)
    ids, masks, positions = [], [], []
    for v in variants:
        extra = T - v["input_ids"].shape[1]
        sides = (extra, 0) if left else (0, extra)
        ids.append(F.pad(v["input_ids"], sides, value=pad_id))
        masks.append(F.pad(v["attention_mask"], sides, value=0))
        positions.append(v["answer_pos"] + (extra if left else 0))
    return {"input_ids": torch.cat(ids), "attention_mask": torch.cat(masks), "answer_pos": torch.cat(positions)}


def rationale_parts(batch: dict[str, Tensor]) -> tuple[list[Tensor], list[list[int]]]:
    """Per row: the prompt's tokens (before the first step) and the conclusion's (between the
    last step and the answer, ending at ``answer_pos``)."""
    prompts, conclusions = [], []
    mask = batch["attention_mask"].bool()
    for b in range(batch["input_ids"].shape[0]):
        start = int(mask[b].nonzero()[0, 0])
        first = int(batch["step_spans"][b, 0, 0])
        last = int(batch["step_spans"][b, int(batch["n_steps"][b]) - 1, 1])
        prompts.append(batch["input_ids"][b, start:first])
        conclusions.append(batch["input_ids"][b, last : int(batch["answer_pos"][b, 0]) + 1].tolist())
    return prompts, conclusions


def split_generation(tokens: list[int], conclusion: list[int]) -> tuple[int, tuple[int, ...]]:
    """``(answer, rationale)`` of a generated continuation: the token after the first
    ``conclusion`` and the tokens before it; ``(-1, all tokens)`` when there is no conclusion."""
    n = len(conclusion)
    for i in range(len(tokens) - n):
        if n and tokens[i : i + n] == conclusion:
            return tokens[i + n], tuple(tokens[:i])
    return -1, tuple(tokens)


def generated_rationales(
    model: torch.nn.Module, batch: dict[str, Tensor], sampling: Sampling, pad_id: int
) -> tuple[Tensor, list[tuple[int, ...]]]:
    """Each row's prompt alone (left-padded, batched), continued under ``sampling``: the answer
    it writes after the row's conclusion (``-1`` when the conclusion never comes) ``(B,)`` and
    the rationale it wrote before it (token ids)."""
    prompts, conclusions = rationale_parts(batch)
    device = batch["input_ids"].device
    left = pad_lines([p.tolist() for p in prompts], pad_id, "left")
    tokens, _ = generate(model, left["input_ids"].to(device), left["attention_mask"].to(device), sampling, pad_id)
    found = [split_generation(row, c) for row, c in zip(tokens.tolist(), conclusions)]
    return torch.tensor([a for a, _ in found], device=device), [r for _, r in found]


def generation_length(batch: dict[str, Tensor]) -> int:
    """Tokens from the first step to the answer in the batch's longest row, plus one."""
    first = batch["step_spans"][:, 0, 0]
    return int((batch["answer_pos"][:, 0] - first).max()) + 2


def answered_rationale(
    batch: dict[str, Tensor],
    rationales: list[tuple[int, ...]],
    keep: float = 1.0,
    filler: int | None = None,
    pad_id: int = 0,
    left: bool = False,
) -> dict[str, Tensor]:
    """Teacher-forced rows of ``prompt + rationale + conclusion`` for given (e.g. generated)
    rationales, the answer read right after the conclusion: ``input_ids``, ``attention_mask``,
    ``answer_pos (B, 1)``. ``keep`` in ``[0, 1]`` keeps the first ``floor(keep * n)`` of a
    rationale's ``n`` tokens (early answering on a rationale without step boundaries, Lanham et
    al.'s "fraction of the reasoning provided"); ``filler`` replaces every kept token by it
    (the filler-token control, same length)."""
    prompts, conclusions = rationale_parts(batch)
    rows = []
    for prompt, rationale, conclusion in zip(prompts, rationales, conclusions):
        kept = list(rationale[: int(keep * len(rationale))])
        if filler is not None:
            kept = [filler] * len(kept)
        rows.append(prompt.tolist() + kept + conclusion)
    answer_pos = torch.tensor([[len(r) - 1] for r in rows])
    return _packed(rows, answer_pos, pad_id, left, batch["input_ids"].device)
