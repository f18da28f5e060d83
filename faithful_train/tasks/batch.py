"""The text structure of a batch, and the one place that knows where its answer is.

A batch is a dict of tensors (DESIGN.md §7). Every task provides ``input_ids`` and ``labels``;
text tasks add the rest:

    input_ids       (B, T) long   prompt tokens, then the answer's tokens but the last
                                  (teacher forcing), padded left or right
    attention_mask  (B, T) long   1 on real tokens, 0 on padding (absent: no padding)
    labels          (B,)   long   the first answer token (what single-token figures score)
    answer_ids      (B, A) long   every answer token (absent: ``labels``, one token)
    answer_pos      (B, A) long   the position whose logits predict each answer token
                                  (absent: the last position)
    answer_mask     (B, A) bool   which of the A slots hold a token (answers differ in length)
    span/<name>     (B, 2) long   token ``[start, stop)`` of a named span, in the padded row
    tool_ids        (B,)   long   the tool a row calls: the model emits it as the token of
                                  ``span/tool`` (predicted at the position before it)

Generated tasks carry only ``input_ids`` and ``labels``: one answer token, predicted at the last
position, no padding. The helpers below give both kinds of batch the same view, so no code
outside this module indexes the last position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

Batch = dict[str, Tensor]


def attention_mask(batch: Batch) -> Tensor | None:
    """The padding mask ``(B, T)``, or ``None`` when the batch has no padding."""
    return batch.get("attention_mask")


def answer_positions(batch: Batch) -> Tensor:
    """``(B, A)`` positions whose logits predict the answer tokens (default: the last position)."""
    if "answer_pos" in batch:
        return batch["answer_pos"]
    ids = batch["input_ids"]
    return torch.full((ids.shape[0], 1), ids.shape[1] - 1, dtype=torch.long, device=ids.device)


def answer_position(batch: Batch) -> Tensor:
    """``(B,)`` the position that predicts the first answer token (a prompt's last token)."""
    return answer_positions(batch)[:, 0]


def answer_targets(batch: Batch) -> Tensor:
    """``(B, A)`` answer token ids (0 in empty slots)."""
    return batch["answer_ids"] if "answer_ids" in batch else batch["labels"][:, None]


def answer_mask(batch: Batch) -> Tensor:
    """``(B, A)`` True where a slot holds an answer token."""
    if "answer_mask" in batch:
        return batch["answer_mask"].bool()
    return torch.ones(answer_targets(batch).shape, dtype=torch.bool, device=batch["labels"].device)


def tool_call(batch: Batch) -> tuple[Tensor, Tensor] | None:
    """``(positions (B,), tool ids (B,))`` of a batch whose rows call a tool: the position whose
    logits pick the tool (the one before ``span/tool``) and the tool's token; ``None`` if none."""
    if "tool_ids" not in batch or "span/tool" not in batch:
        return None
    return batch["span/tool"][:, 0] - 1, batch["tool_ids"]


def gather_positions(values: Tensor, positions: Tensor) -> Tensor:
    """``values[b, positions[b, p]]``: ``(B, T, ...)`` and ``(B, P)`` -> ``(B, P, ...)``."""
    index = positions.view(*positions.shape, *([1] * (values.dim() - 2))).expand(*positions.shape, *values.shape[2:])
    return values.gather(1, index)


def tile(batch: Batch, repeats: int, keys: tuple[str, ...] = ("attention_mask", "answer_pos")) -> dict[str, Tensor]:
    """``keys`` of ``batch`` repeated ``repeats`` times along the batch (variant-major rows)."""
    return {k: batch[k].repeat(repeats, *([1] * (batch[k].dim() - 1))) for k in keys if k in batch}


def first_answer_logits(answer_logits: Tensor) -> Tensor:
    """``(N, A, vocab)`` -> ``(N, vocab)``: the logits of the first answer token."""
    return answer_logits[:, 0]


def position_ids(mask: Tensor | None, length: int, device: torch.device) -> Tensor:
    """Position of each token among the real tokens of its row (padding gets 0), so an example
    gets the same positions however it is padded; ``(1, T)`` without a mask."""
    if mask is None:
        return torch.arange(length, device=device)[None]
    return (mask.long().cumsum(1) - 1).clamp_min(0)


def last_real_position(mask: Tensor | None, length: int, batch_size: int, device: torch.device) -> Tensor:
    """``(B,)`` the last real token of each row (left or right padding)."""
    if mask is None:
        return torch.full((batch_size,), length - 1, dtype=torch.long, device=device)
    idx = torch.arange(length, device=device)
    return (mask.bool() * idx).amax(1)


def pad_to(batch: Batch, length: int, pad_id: int = 0) -> Batch:
    """``batch`` right-padded to ``length`` tokens (an ``attention_mask`` added if needed); answer
    positions and spans stay where they are."""
    ids = batch["input_ids"]
    extra = length - ids.shape[1]
    if extra <= 0:
        return batch
    mask = batch.get("attention_mask", torch.ones_like(ids))
    padded = dict(batch)
    padded["input_ids"] = F.pad(ids, (0, extra), value=pad_id)
    padded["attention_mask"] = F.pad(mask, (0, extra), value=0)
    return padded


def pad_and_stack(batches: list[Batch]) -> tuple[list[Batch], Batch]:
    """Pad every batch to the longest and stack their ``input_ids`` (and ``attention_mask``, if
    any has one): ``(padded batches, stacked)``."""
    length = max(b["input_ids"].shape[1] for b in batches)
    padded = [pad_to(b, length) for b in batches]
    stacked = {"input_ids": torch.cat([b["input_ids"] for b in padded])}
    if any("attention_mask" in b for b in padded):
        stacked["attention_mask"] = torch.cat(
            [b.get("attention_mask", torch.ones_like(b["input_ids"])) for b in padded]
        )
    return padded, stacked


ROW_KEYS = ("input_ids", "attention_mask", "labels", "answer_ids", "answer_pos", "answer_mask")


def as_variant(base: Batch, variant: Tensor | Batch) -> Batch:
    """A variant of ``base``'s rows as a batch: new ``input_ids`` of the same layout keep
    ``base``'s padding and answer positions; a dict (a paraphrase) carries its own."""
    if isinstance(variant, Tensor):
        return {k: base[k] for k in ROW_KEYS if k in base and k != "input_ids"} | {"input_ids": variant}
    return variant


def stack_rows(batches: list[Batch]) -> Batch:
    """The rows of several batches as one (padded to the longest): the keys every model call
    reads (``ROW_KEYS``)."""
    padded, stacked = pad_and_stack(batches)
    for key in ROW_KEYS[2:]:
        if all(key in b for b in padded):
            stacked[key] = torch.cat([b[key] for b in padded])
    if "answer_pos" not in stacked and "attention_mask" in stacked:
        # rows without answer positions answer at their own last token (before padding)
        stacked["answer_pos"] = torch.cat([answer_positions(b) for b in batches])
    return stacked


def prefixed(batch: Batch, prefix: str) -> Batch:
    return {f"{prefix}/{k}": v for k, v in batch.items()}


def unprefixed(batch: Batch, prefix: str) -> Batch:
    start = f"{prefix}/"
    return {k[len(start) :]: v for k, v in batch.items() if k.startswith(start)}


def pad_columns(values: Tensor, length: int, fill: float | bool) -> Tensor:
    """``(B, T)`` per-token values right-padded to ``length`` columns with ``fill``."""
    extra = length - values.shape[1]
    if extra <= 0:
        return values
    return torch.cat([values, torch.full((values.shape[0], extra), fill, dtype=values.dtype, device=values.device)], 1)


TOKEN_KEYS = ("input_ids", "attention_mask", "irrelevant")  # (B, T) per-token tensors


def _group(key: str) -> tuple[str, str] | None:
    """``(prefix, kind)`` of a per-token (``tokens``) or position (``positions``) key: rows that
    share a prefix (``""``, ``pair.IO/``, ``source.``) share a padding length."""
    if "span/" in key:
        return key[: key.index("span/")], "positions"
    for name in (*TOKEN_KEYS, "answer_pos", "step_spans"):
        if key.endswith(name):
            return key[: -len(name)], "tokens" if name in TOKEN_KEYS else "positions"
    return None


def trim_padding(batch: Batch) -> Batch:
    """``batch`` without the columns that are padding in every row (after cutting a longer set
    into chunks), for each set of rows it carries (``pair.<v>/...`` sources, perturbations);
    positions (answers, spans, ``step_spans``) move with a cut on the left."""
    cuts: dict[str, tuple[int, int]] = {}
    for key, value in batch.items():
        group = _group(key)
        if group is None or not key.endswith("attention_mask"):
            continue
        real = value.bool().any(0)
        if real.any():
            columns = real.nonzero()[:, 0]
            cuts[group[0]] = (int(columns[0]), int(columns[-1]) + 1)
    out = {}
    for key, value in batch.items():
        group = _group(key)
        if group is None or group[0] not in cuts:
            out[key] = value
            continue
        start, stop = cuts[group[0]]
        if group[1] == "tokens":
            out[key] = value[:, start:stop]
        else:  # -1 marks a span a row does not have (``step_spans`` past its last step)
            out[key] = torch.where(value >= 0, value - start, value)
    return out
